"""SRLoRA on a 4-bit base against PEFT's QLoRA: memory and step time on one LLaMA-7B-shaped block.

    python bench/qlora.py --out=docs/bench/qlora_cpu.json     # ~10 min on one CPU thread
    python bench/qlora.py --device=cuda --out=docs/bench/qlora_cuda.json   # on a GPU (bench/gpu.sh)
    python bench/qlora.py --quick                             # smoke run, small shapes

The base is a one-block LlamaForCausalLM (hidden 4096, FFN 11008, the seven projections; vocab 256,
random bf16 weights), loaded by transformers with BitsAndBytesConfig(load_in_4bit=True, NF4, bf16
compute), as a QLoRA user loads a model.  Three adapters on it, each on its own fresh load:
  peft_qlora        PEFT LoRA (rank r) on the 4-bit layers: QLoRA
  srlora_keep       srlora_hf.apply_srlora(quantized="keep"): W0 stays 4-bit, the change as factors
  srlora_keep_switched  the same after every switch of a run (r_target reached): its forward then adds
                    a low-rank product of rank r + 2 (r_target - r) instead of 2 r
  srlora_dequantize srlora_hf.apply_srlora(quantized="dequantize"): the adapted maps become dense bf16
SRLoRA keeps its basis in bf16 (residual_dtype="bfloat16"), and records its switches (as srlora_hf does).
  memory  the bytes of the model's state (parameters, buffers and bitsandbytes' quantization state,
          each storage once), plus the gradients and AdamW moments of what trains (3 x its fp32
          bytes) and, for SRLoRA, the tracker's two EMAs per adapter entry (2 x).
  step    forward, cross-entropy, backward, tracker.update() for SRLoRA, AdamW step, zero_grad on one
          fixed batch; methods timed in interleaved rounds (rotating order), each ratio the median of
          the rounds' ratios.  A CPU's 4-bit kernels are not a GPU's: read the ratios, not the times.
"""
import gc
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import common
from common import median, timed
from adapter_size import switch_all
from srlora import PAPER_TARGETS, ImportanceTracker
import srlora_hf

METHODS = ("peft_qlora", "srlora_keep", "srlora_keep_switched", "srlora_dequantize")


@dataclass
class QloraConfig:
    device: str = "cpu"           # cpu or cuda
    r: int = 8                    # the setting
    r_target: int = 64            # the setting
    hidden: int = 4096            # LLaMA-7B
    ffn: int = 11008              # LLaMA-7B
    heads: int = 32               # LLaMA-7B
    batch: int = 1
    seq: int = 64
    rounds: int = 6
    warmup: int = 1               # untimed steps per method before the rounds
    quick: bool = False           # smoke run: hidden 256, ffn 688, 2 rounds
    threads: int = 1              # torch CPU threads, as in the other benchmarks
    out: str = ""                 # write the JSON here too


def state_bytes(model) -> int:
    """Bytes of model.state_dict(): parameters, buffers and the 4-bit layers' absmax and code books,
    each storage counted once (what the model holds, whatever names it goes by)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def load(folder, cfg):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, device_map=cfg.device, dtype=torch.bfloat16)


def wrap(method, folder, cfg):
    model = load(folder, cfg)
    if method == "peft_qlora":
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.r, lora_dropout=0.0,
                                                target_modules=list(PAPER_TARGETS["llama"]))), None
    model = srlora_hf.apply_srlora(model, r=cfg.r, alpha=float(cfg.r), r_target=cfg.r_target, residual_dtype="bfloat16",
                                   svd="lowrank", quantized=method.removeprefix("srlora_").removesuffix("_switched"))
    if method.endswith("_switched"):
        switch_all(model, cfg, torch.Generator().manual_seed(0))
    return model, ImportanceTracker(model)


def training_bytes(model, tracker) -> dict:
    held = state_bytes(model)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return {"state": held, "training": held + 3 * trainable + (2 * trainable if tracker else 0)}


def main(cfg: QloraConfig):
    torch.set_num_threads(cfg.threads)
    if cfg.quick:
        cfg = common.replace(cfg, hidden=256, ffn=688, heads=4, rounds=2)
    from transformers import LlamaConfig, LlamaForCausalLM
    device = common.pick_device(cfg.device)
    result = {"benchmark": "qlora", "env": common.environment(device), "config": vars(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=cfg.hidden, intermediate_size=cfg.ffn, num_hidden_layers=1,
                             num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        gc.collect()
        models, memory = {}, {}
        for method in METHODS:
            print(f"qlora: wrapping {method}", file=sys.stderr, flush=True)
            model, tracker = wrap(method, tmp, cfg)
            memory[method] = training_bytes(model, tracker)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            models[method] = (model, tracker, opt)
    ids = torch.randint(0, 256, (cfg.batch, cfg.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step(method):
        model, tracker, opt = models[method]
        model(ids, labels=ids).loss.backward()
        if tracker is not None:
            tracker.update()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for method in METHODS:
        for _ in range(cfg.warmup):
            step(method)
    rounds = []
    for i in range(cfg.rounds):
        order = METHODS[i % len(METHODS):] + METHODS[:i % len(METHODS)]
        rounds.append({m: timed(lambda: step(m), device) for m in order})
        print(f"qlora: round {i + 1}/{cfg.rounds}: " + ", ".join(f"{m} {t:.2f} s" for m, t in rounds[-1].items()),
              file=sys.stderr, flush=True)
    mib = lambda n: round(n / 2**20, 2)                      # noqa: E731
    result["block"] = f"hidden {cfg.hidden}, FFN {cfg.ffn}, one block, NF4 with bf16 compute"
    result["memory_mib"] = {m: {k: mib(v) for k, v in memory[m].items()} for m in METHODS}
    result["memory_ratios"] = {f"{m}/peft_qlora ({k})": round(memory[m][k] / memory["peft_qlora"][k], 3)
                               for m in METHODS[1:] for k in ("state", "training")}
    result["step"] = {"tokens": cfg.batch * cfg.seq, "rounds": cfg.rounds,
                      "median_ms": {m: round(median([r[m] for r in rounds]) * 1e3, 1) for m in METHODS},
                      "ratios": {f"{m}/peft_qlora": round(median([r[m] / r["peft_qlora"] for r in rounds]), 3)
                                 for m in METHODS[1:]}}
    result["env"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    common.write_json(result, cfg.out)


if __name__ == "__main__":
    common.cli(main, QloraConfig, __doc__)
