"""Wrap time of apply_srlora versus r_target, full versus randomized SVD, and PEFT PiSSA init.

    python bench/init_time.py --out=docs/bench/init_time_cpu.json     # CPU: MiniLM-L6, 2-block DeBERTa shape, a LLaMA-7B block
    python bench/init_time.py --device=cuda --out=docs/bench/init_time_cuda.json   # GPU: DeBERTa-v3-base (72 layers)
    python bench/init_time.py --quick                                 # smoke run

Each measurement deep-copies the model (untimed), then times apply_srlora (or peft.get_peft_model
with init_lora_weights="pissa" / "pissa_niter_4", r=8) on it: the SVDs, the residual W0 - B A and
the module swap.  svd="auto" is what a user gets (top_singular: the exact SVD when the layer's
smaller side is at most AUTO_FULL_MAX = 1024 or the sketch of about 2 r_target columns is more than
half of it, the randomized one otherwise); "full" and "lowrank" force one algorithm.  Every
configuration is measured once per round and the rounds are interleaved; the table holds medians.
The LLaMA-7B-shaped block (four 4096x4096 attention maps, 11008x4096 gate/up, 4096x11008 down)
shows the cost per layer at 7B width; on CPU it is wrapped with the randomized SVD only,
because one exact 4096x4096 SVD alone takes minutes on two cores (--llama_full adds it).
Prints one JSON object and writes it to --out.
"""
import copy
import gc
from dataclasses import dataclass

import torch
import torch.nn as nn

import common
from common import UserError, has, median, timed
from srlora import apply_srlora, matches, srlora_layers

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class InitConfig:
    device: str = "auto"          # auto (cuda if available), cpu or cuda
    models: str = "minilm,deberta,llama_block"  # which models to wrap, comma-separated
    quick: bool = False           # smoke run: one round, two r_targets, a 1-block DeBERTa, no LLaMA block
    r: int = 8                    # adapter rank, the paper's value
    r_targets: str = "8,32,64,128,512"  # wrap with svd="auto" at each; 512 is the paper's SST-2 setting
    compare_r_targets: str = "64,512"   # also force svd="full" and svd="lowrank" at these
    deberta_layers: int = 0       # 0: 2 blocks on CPU, 12 on CUDA (72 adapted layers, as in the issue)
    rounds: int = 0               # 0: 3 on CPU, 5 on CUDA
    llama_full: bool = False      # on CPU, also time the exact SVD on the LLaMA block (minutes)
    threads: int = 1              # torch CPU threads; 1 because two threads were 4x slower and noisy on a shared 2-core machine
    out: str = ""                 # write the JSON here too


class LlamaBlock(nn.Module):
    """The seven linear maps of one LLaMA-7B decoder block, random weights (no forward needed)."""

    def __init__(self, C=4096, H=11008):
        super().__init__()
        lin = lambda i, o: nn.Linear(i, o, bias=False, device="meta")
        self.self_attn = nn.ModuleDict(dict(q_proj=lin(C, C), k_proj=lin(C, C), v_proj=lin(C, C), o_proj=lin(C, C)))
        self.mlp = nn.ModuleDict(dict(gate_proj=lin(C, H), up_proj=lin(C, H), down_proj=lin(H, C)))
        for m in self.modules():                      # materialize with a cheap random fill
            if isinstance(m, nn.Linear):
                m.weight = nn.Parameter(torch.randn(m.out_features, m.in_features) / m.in_features ** 0.5)


def wrap(base, targets, method, r, r_target, device):
    """Seconds to adapt a fresh copy of base; `method` is an svd= value or a PEFT init name."""
    model = copy.deepcopy(base).to(device)
    common.sync(device)
    if method.startswith("peft_"):
        import peft
        config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=list(targets), init_lora_weights=method[5:])
        seconds = timed(lambda: peft.get_peft_model(model, config), device)
    else:
        seconds = timed(lambda: apply_srlora(model, targets=targets, r=r, alpha=r, r_target=r_target, svd=method),
                        device)
    n_layers = len(srlora_layers(model)) if not method.startswith("peft_") else None
    del model
    gc.collect()
    return seconds, n_layers


def ints(text, flag):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{flag}={text}: give comma-separated integers, e.g. --{flag}=8,64,512") from None


def bench_model(name, cfg, device):
    cpu = device.type == "cpu"
    if name == "minilm":
        base, targets, desc = common.minilm(pretrained=not cfg.quick)
    elif name == "deberta":
        base, targets, desc = common.deberta(cfg.deberta_layers or (1 if cfg.quick else 2 if cpu else 12))
    else:
        base, targets, desc = LlamaBlock(), LLAMA_TARGETS, "LLaMA-7B block: 4 x (4096x4096), 2 x (11008x4096), 1 x (4096x11008), random"
    r_targets = [8, 64] if cfg.quick else ints(cfg.r_targets, "r_targets")
    compare = [] if cfg.quick else ints(cfg.compare_r_targets, "compare_r_targets")
    if min(r_targets + compare + [cfg.r]) < cfg.r:
        raise UserError(f"every r_target must be >= r={cfg.r}; r_target == r is PiSSA")
    configs = [("auto", rt) for rt in r_targets] + [(m, rt) for rt in compare for m in ("full", "lowrank")]
    if has("peft"):
        configs += [("peft_pissa_niter_4", cfg.r), ("peft_pissa", cfg.r)]
    if name == "llama_block" and cpu and not cfg.llama_full:
        configs = [("lowrank", 64)] + [c for c in configs if c[0] == "peft_pissa_niter_4"]
    rounds = 1 if cfg.quick or (name == "llama_block" and cpu) else cfg.rounds or (3 if cpu else 5)
    base.requires_grad_(False)
    times, n_layers = {c: [] for c in configs}, None
    for i in range(rounds):
        order = configs[i % len(configs):] + configs[:i % len(configs)]
        for method, rt in order:
            seconds, n = wrap(base, targets, method, cfg.r, rt, device)
            times[(method, rt)].append(seconds)
            n_layers = n or n_layers
    rows = [{"method": method, "r_target": rt, "seconds": round(median(ts), 4),
             "ms_per_layer": round(median(ts) * 1e3 / n_layers, 3), "all_seconds": [round(t, 4) for t in ts]}
            for (method, rt), ts in times.items()]
    shapes = sorted({tuple(m.weight.shape) for n, m in base.named_modules()
                     if isinstance(m, nn.Linear) and matches(n, targets)})
    result = {"model": desc, "adapted_layers": n_layers, "weight_shapes": [list(s) for s in shapes],
              "rounds": rounds, "rows": rows}
    by = {(r["method"], r["r_target"]): r["seconds"] for r in rows}
    ratios = {}
    if ("peft_pissa_niter_4", cfg.r) in by:
        for rt in r_targets:
            if rt <= 64 and ("auto", rt) in by:
                ratios[f"auto r_target={rt} / peft pissa_niter_4"] = round(by[("auto", rt)] / by[("peft_pissa_niter_4", cfg.r)], 4)
        if ("lowrank", 64) in by:
            ratios["lowrank r_target=64 / peft pissa_niter_4"] = round(by[("lowrank", 64)] / by[("peft_pissa_niter_4", cfg.r)], 4)
    if ("peft_pissa", cfg.r) in by:
        for key in (("auto", 512), ("full", 512), ("lowrank", 512)):
            if key in by:
                ratios[f"{key[0]} r_target=512 / peft pissa (full SVD)"] = round(by[key] / by[("peft_pissa", cfg.r)], 4)
    result["ratios"] = ratios
    return result


def svd_reference(device, quick, full):
    """The issue's two reference points: one 4096x4096 matrix, exact SVD and svd_lowrank(q=64)."""
    W = torch.randn(4096, 4096, device=device)
    out = {"svd_lowrank_q64_4096_ms": round(timed(lambda: torch.svd_lowrank(W, q=64, niter=4), device) * 1e3, 2)}
    if full:
        out["linalg_svd_4096_ms"] = round(timed(lambda: torch.linalg.svd(W, full_matrices=False), device) * 1e3, 2)
    return out


def main(cfg: InitConfig):
    device, models = common.start(cfg, ("minilm", "deberta", "llama_block"))
    if cfg.quick:
        models = [m for m in models if m != "llama_block"]
    result = {"benchmark": "init_time", "env": common.environment(device), "config": dict(vars(cfg)),
              "peft_available": has("peft"), "models": {}}
    if device.type == "cuda":                        # first CUDA use pays for context and kernel loading
        torch.linalg.svd(torch.randn(64, 64, device=device))
        torch.cuda.synchronize(device)
    for name in models:
        result["models"][name] = bench_model(name, cfg, device)
    if not cfg.quick:
        result["svd_reference"] = svd_reference(device, cfg.quick, full=device.type == "cuda" or cfg.llama_full)
    result["env"]["load_average_1min_end"] = round(__import__("os").getloadavg()[0], 2)
    common.write_json(result, cfg.out)


if __name__ == "__main__":
    common.cli(main, InitConfig, __doc__)
