"""Bytes on disk of one save, and what the SRLoRA adapter costs to load and to keep while training.

    python bench/adapter_size.py --out=docs/bench/adapter_size_cpu.json   # ~5 min on one CPU thread
    python bench/adapter_size.py --quick                                  # smoke run, small shapes

Two parts, both bf16 with random weights (sizes and times do not depend on the values):
  model   a bf16 Llama (hidden 512, 2 blocks) saved four ways: the model, the SRLoRA adapter
          (save_pretrained), the whole SRLoRA state dict, PEFT LoRA adapters of rank r and r_target.
  block   one LLaMA-7B-shaped block (hidden 4096, FFN 11008, the seven projections; bench/bf16.py's):
          - bytes: the SRLoRA adapter written after 14 switches (A and B moved like training between
            them), PEFT LoRA adapters of rank r and r_target written by PEFT, and the block's own
            weights written by safetensors: all measured files, none computed;
          - load: a fresh apply_srlora (the SVD of W0, svd="auto", randomized at these widths) and
            load_adapter (the replay of the switches), timed; the replayed W checked bit for bit;
          - a Trainer checkpoint's weights file: the adapter and the importance EMAs (srlora_hf);
          - memory while training: parameters + buffers of the block under SRLoRA with and without
            record_switches' fused_A / fused_B, and under PEFT LoRA (rank r), plus the gradients and
            AdamW moments of the trainable tensors (3 x their fp32 bytes, the same rule for both) and,
            for SRLoRA, the tracker's two EMAs (2 x).
Then the byte formula per adapted (m x n) layer and its value for LLaMA-2-7B (32 such blocks):
  SRLoRA adapter   4 r_target (m + n)  + 8 r + 24   (A, B and the fused pairs in fp32; indices, next_index)
  PEFT LoRA        4 rank (m + n)                    (its adapters are fp32 on a bf16 base too)
"""
import copy
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import common
from bf16 import TARGETS, LlamaBlock
from srlora import PAPER_TARGETS, ImportanceTracker, apply_srlora as plain_apply, n_recycle, srlora_layers
from srlora_export import load_adapter, record_switches, save_adapter
from srlora_hf import apply_srlora, tracker_tensors


@dataclass
class AdapterSizeConfig:
    r: int = 8                    # the setting
    r_target: int = 64            # the setting
    hidden: int = 4096            # LLaMA-7B
    ffn: int = 11008              # LLaMA-7B
    heads: int = 32               # LLaMA-7B
    quick: bool = False           # smoke run: block hidden 256, ffn 688
    threads: int = 1              # torch CPU threads, as in the other benchmarks
    out: str = ""                 # write the JSON here too


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix in (".safetensors", ".json", ".bin"))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def mib(n):
    return round(n / 2**20, 2)


def small_model(cfg, tmp):
    """MiB of each save of a bf16 Llama, hidden 512, 2 blocks."""
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, dtype="bfloat16")
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    sizes = {}
    base.save_pretrained(f"{tmp}/base")
    sizes["model"] = folder_bytes(f"{tmp}/base")
    model = apply_srlora(copy.deepcopy(base), r=cfg.r, r_target=cfg.r_target)
    model.save_pretrained(f"{tmp}/srlora")
    sizes["srlora_adapter"] = folder_bytes(f"{tmp}/srlora")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{tmp}/whole.safetensors")
    sizes["srlora_whole_state_dict"] = os.path.getsize(f"{tmp}/whole.safetensors")
    for rank in (cfg.r, cfg.r_target):
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, target_modules=list(PAPER_TARGETS["llama"])))
        peft.save_pretrained(f"{tmp}/lora{rank}")
        sizes[f"peft_lora_r{rank}"] = folder_bytes(f"{tmp}/lora{rank}")
    return {k: mib(v) for k, v in sizes.items()}


@torch.no_grad()
def switch_all(model, cfg, g):
    """Every switch a run makes (Eq. 13), with a training-like change of A and B before each."""
    k = n_recycle(cfg.r, 0.5)
    for _ in range((cfg.r_target - cfg.r) // k):
        for _, layer in srlora_layers(model):
            for p in (layer.lora_A, layer.lora_B):
                p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
            layer.recycle(torch.randperm(cfg.r, generator=g)[:k])
    return (cfg.r_target - cfg.r) // k


def training_bytes(model, tracker=False):
    """Parameters + buffers, and the gradients and AdamW moments (exp_avg, exp_avg_sq) of what trains,
    plus for SRLoRA (tracker=True) the ImportanceTracker's two EMAs per adapter entry."""
    held = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    trainable = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    return held, held + (5 if tracker else 3) * trainable


def block(cfg, tmp):
    base = LlamaBlock(cfg.hidden, cfg.ffn, cfg.heads, torch.bfloat16).requires_grad_(False)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, f"{tmp}/block.safetensors")
    out = {"block_bytes": os.path.getsize(f"{tmp}/block.safetensors")}
    wrap = lambda: plain_apply(copy.deepcopy(base), targets=TARGETS, r=cfg.r, alpha=float(cfg.r),  # noqa: E731
                               r_target=cfg.r_target)

    start = time.perf_counter()
    model = wrap()                                                    # the SVD a load repeats
    out["wrap_s"] = round(time.perf_counter() - start, 1)
    without = training_bytes(model, tracker=True)
    record_switches(model)
    with_fused = training_bytes(model, tracker=True)
    out["switches"] = switch_all(model, cfg, torch.Generator().manual_seed(0))
    save_adapter(model, f"{tmp}/srlora")
    out["srlora_adapter_bytes"] = folder_bytes(f"{tmp}/srlora")
    # a Trainer checkpoint's weights: the adapter and the tracker's EMAs (srlora_hf.SRLoRACallback)
    save_adapter(model, f"{tmp}/checkpoint", extra=tracker_tensors(ImportanceTracker(model)))
    out["srlora_checkpoint_bytes"] = folder_bytes(f"{tmp}/checkpoint")

    start = time.perf_counter()
    fresh = wrap()
    mid = time.perf_counter()
    load_adapter(fresh, f"{tmp}/srlora")
    out["load_s"] = {"apply_srlora (SVD of W0)": round(mid - start, 1),
                     "load_adapter (replay)": round(time.perf_counter() - mid, 2)}
    out["replayed_w_bit_for_bit"] = all(torch.equal(a.weight, b.weight) and torch.equal(a.lora_A, b.lora_A)
                                        for (_, a), (_, b) in zip(srlora_layers(model), srlora_layers(fresh)))
    del model, fresh
    gc.collect()

    for rank in (cfg.r, cfg.r_target):
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS)))
        peft.save_pretrained(f"{tmp}/lora{rank}")
        out[f"peft_lora_r{rank}_bytes"] = folder_bytes(f"{tmp}/lora{rank}")
        if rank == cfg.r:
            peft_r = training_bytes(peft)
        del peft
        gc.collect()
    lora_rt, lora_r = out[f"peft_lora_r{cfg.r_target}_bytes"], out[f"peft_lora_r{cfg.r}_bytes"]
    out["adapter_ratios"] = {f"srlora/peft_lora_r{cfg.r_target}": round(out["srlora_adapter_bytes"] / lora_rt, 4),
                             f"srlora/peft_lora_r{cfg.r}": round(out["srlora_adapter_bytes"] / lora_r, 3),
                             "srlora/block": round(out["srlora_adapter_bytes"] / out["block_bytes"], 4),
                             f"srlora_checkpoint/peft_lora_r{cfg.r_target}": round(out["srlora_checkpoint_bytes"] / lora_rt, 4),
                             "srlora_checkpoint/block": round(out["srlora_checkpoint_bytes"] / out["block_bytes"], 4)}
    names = ("srlora_without_fused", "srlora_with_fused", f"peft_lora_r{cfg.r}")
    out["memory_mib"] = {"params_and_buffers": {n: mib(b[0]) for n, b in zip(names, (without, with_fused, peft_r))},
                         "with_grads_adamw_and_tracker": {n: mib(b[1]) for n, b in zip(names, (without, with_fused, peft_r))}}
    out["memory_ratios"] = {f"{kind}: {n}/peft_lora_r{cfg.r}": round(b[i] / peft_r[i], 4)
                            for i, kind in enumerate(("params_and_buffers", "with_grads_adamw_and_tracker"))
                            for n, b in zip(names[:2], (without, with_fused))}
    return out


def llama2_7b_formula(cfg):
    maps = 4 * [(4096, 4096)] + 3 * [(11008, 4096)]                  # q, k, v, o; gate, up, down
    srlora = 32 * sum(4 * cfg.r_target * (m + n) + 8 * cfg.r + 24 for m, n in maps)
    peft = {rank: 32 * sum(4 * rank * (m + n) for m, n in maps) for rank in (cfg.r, cfg.r_target)}
    model_bytes = 2 * (32 * sum(m * n for m, n in maps) + 2 * 32000 * 4096 + 65 * 4096)
    return {"srlora_adapter_gb": round(srlora / 1e9, 3), f"peft_lora_r{cfg.r}_gb": round(peft[cfg.r] / 1e9, 3),
            f"peft_lora_r{cfg.r_target}_gb": round(peft[cfg.r_target] / 1e9, 3), "model_gb": round(model_bytes / 1e9, 2)}


def main(cfg: AdapterSizeConfig):
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    if cfg.quick:
        cfg = common.replace(cfg, hidden=256, ffn=688, heads=4)
    result = {"benchmark": "adapter_size", "env": common.environment(torch.device("cpu")), "config": vars(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        result["model_mib"] = small_model(cfg, tmp)
        result["block"] = {"shape": f"hidden {cfg.hidden}, FFN {cfg.ffn}, seven projections, bf16", **block(cfg, tmp)}
    result["llama2_7b_formula"] = llama2_7b_formula(cfg)
    result["env"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    common.write_json(result, cfg.out)


if __name__ == "__main__":
    common.cli(main, AdapterSizeConfig, __doc__)
