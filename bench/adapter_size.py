"""Bytes on disk of one save: the SRLoRA adapter against a PEFT LoRA adapter and the whole model.

    python bench/adapter_size.py            # a bf16 Llama, hidden 512, 2 blocks, r 8, r_target 64; ~20 s

Writes each save into a temporary folder and prints its bytes, then the byte formula per adapted
(m x n) layer and its value for LLaMA-2-7B (32 blocks, hidden 4096, FFN 11008, the seven maps):
  SRLoRA adapter   4 r_target (m + n)  + 8 r + 24   (A, B and the fused pairs in fp32; indices, next_index)
  PEFT LoRA        4 rank (m + n)                    (its adapters are fp32 on a bf16 base too)
"""
import copy
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from srlora import PAPER_TARGETS
from srlora_hf import apply_srlora

R, R_TARGET = 8, 64


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix in (".safetensors", ".json", ".bin"))


def main():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, dtype="bfloat16")
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        base.save_pretrained(f"{tmp}/base")
        sizes["the model (bf16)"] = folder_bytes(f"{tmp}/base")
        model = apply_srlora(copy.deepcopy(base), r=R, r_target=R_TARGET)
        model.save_pretrained(f"{tmp}/srlora")
        sizes["SRLoRA adapter (save_pretrained)"] = folder_bytes(f"{tmp}/srlora")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{tmp}/whole.safetensors")
        sizes["SRLoRA whole state dict"] = os.path.getsize(f"{tmp}/whole.safetensors")
        for rank in (R, R_TARGET):
            peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, target_modules=list(PAPER_TARGETS["llama"])))
            peft.save_pretrained(f"{tmp}/lora{rank}")
            sizes[f"PEFT LoRA adapter, rank {rank}"] = folder_bytes(f"{tmp}/lora{rank}")
    lora = sizes[f"PEFT LoRA adapter, rank {R_TARGET}"]
    for name, size in sizes.items():
        print(f"{name:36s} {size / 2**20:8.2f} MiB  {size / lora:6.2f}x PEFT LoRA rank {R_TARGET}")

    maps = 4 * [(4096, 4096)] + 3 * [(11008, 4096)]                  # q, k, v, o; gate, up, down
    srlora = 32 * sum(4 * R_TARGET * (m + n) + 8 * R + 24 for m, n in maps)
    peft = {rank: 32 * sum(4 * rank * (m + n) for m, n in maps) for rank in (R, R_TARGET)}
    model_bytes = 2 * (32 * sum(m * n for m, n in maps) + 2 * 32000 * 4096 + 65 * 4096)
    print(f"LLaMA-2-7B, bf16, r={R}, r_target={R_TARGET}: SRLoRA adapter {srlora / 1e9:.3f} GB, PEFT LoRA rank {R} "
          f"{peft[R] / 1e9:.3f} GB ({srlora / peft[R]:.1f}x), rank {R_TARGET} {peft[R_TARGET] / 1e9:.3f} GB "
          f"({srlora / peft[R_TARGET]:.3f}x), the model {model_bytes / 1e9:.1f} GB (1/{model_bytes / srlora:.0f})")


if __name__ == "__main__":
    main()
