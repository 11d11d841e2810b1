"""A bf16 model at bf16 cost: SRLoRA against PEFT LoRA on one LLaMA-7B-shaped block.

    python bench/bf16.py --out=docs/bench/bf16_cpu.json     # ~10 min on one CPU thread
    python bench/bf16.py --quick                            # smoke run, small shapes

Three measurements, all on a bf16 model (random weights; the costs do not depend on the values):
  memory   parameter + buffer bytes of the block wrapped by SRLoRA (r, r_target; basis included),
           with and without srlora_precision.compensate() and with residual_dtype="float32", over PEFT LoRA (r).
  step     forward, squared-output loss, backward, AdamW step, zero_grad of one fixed batch, in bf16
           without autocast; SRLoRA adds tracker.update() and its recompose() amortized over the switch
           interval of a --total_steps run.  Methods are timed in interleaved rounds (rotating order);
           each ratio is the median over rounds of that round's ratio.
  drift    ||effective weight - that of an fp64 twin|| after N switches, over one bf16 rounding of W,
           ||round(W) - W||, on a hidden x hidden bf16 layer; A and B change like training between switches.
The block: LLaMA's q, k, v, o (hidden x hidden) and gate, up, down (hidden <-> ffn) projections, RMSNorm
and causal attention without rotary embeddings (they do not touch the adapted maps).
"""
import copy
import gc
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError, has, median, timed
import srlora_precision
from srlora import ImportanceTracker, SRLoRALinear, apply_srlora, recompose, switch_steps
from srlora_export import record_switches

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Bf16Config:
    device: str = "auto"          # auto (cuda if available), cpu or cuda
    models: str = "llama_block"   # the one model this script knows
    quick: bool = False           # smoke run: hidden 256, ffn 688, 2 rounds
    hidden: int = 4096            # LLaMA-7B
    ffn: int = 11008              # LLaMA-7B
    heads: int = 32               # LLaMA-7B
    r: int = 8                    # the setting
    alpha: float = 8.0
    r_target: int = 64            # the setting
    gamma: float = 0.5
    total_steps: int = 1000       # sets the switch interval recompose() is amortized over
    batch: int = 1
    seq: int = 64                 # batch x seq tokens per step: small, so one CPU thread takes ~1 s a step
    rounds: int = 12
    warmup: int = 2               # untimed steps per method before the rounds
    drift_switches: str = "1,4,16,64"  # N at which the drift is read
    drift_dim: int = 2048         # the drift layer is drift_dim x drift_dim
    threads: int = 1              # torch CPU threads, as in step_time.py
    methods: str = "lora,srlora,srlora_recorded,peft_lora"  # timed; srlora_recorded: record_switches (srlora_hf); lora is this project's LoRA (init="lora"), also bf16
    out: str = ""                 # write the JSON here too


class RMSNorm(nn.Module):
    def __init__(self, dim, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


class LlamaBlock(nn.Module):
    def __init__(self, hidden, ffn, heads, dtype):
        super().__init__()
        lin = lambda i, o: nn.Linear(i, o, bias=False, dtype=dtype)   # noqa: E731
        self.heads = heads
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(hidden, dtype), RMSNorm(hidden, dtype)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (lin(hidden, hidden) for _ in range(4))
        self.gate_proj, self.up_proj, self.down_proj = lin(hidden, ffn), lin(hidden, ffn), lin(ffn, hidden)

    def forward(self, x):                                                     # (B, T, hidden)
        B, T, C = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)           # (B, heads, T, head_dim)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, C))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def wrap(method, base, cfg, compensate=False, **kw):
    model = copy.deepcopy(base)
    if method == "srlora_recorded":                    # what srlora_hf.apply_srlora gives: adapter-sized saves
        return record_switches(wrap("srlora", base, cfg, compensate, **kw))
    if method == "peft_lora":
        import peft
        return peft.get_peft_model(model, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                          target_modules=list(TARGETS)))
    model = apply_srlora(model, targets=TARGETS, r=cfg.r, alpha=cfg.alpha, gamma=cfg.gamma,
                         r_target=cfg.r_target if method == "srlora" else cfg.r,
                         init="lora" if method == "lora" else "pissa", **kw)
    return srlora_precision.compensate(model) if compensate else model


def memory(base, cfg, methods):
    """MiB of parameters + buffers, each variant built alone."""
    variants = {"base": None, "srlora": {}, "srlora_recorded": {}, "srlora_compensate": {"compensate": True},
                "srlora_fp32_residual": {"residual_dtype": "float32"}}
    if "peft_lora" in methods:
        variants["peft_lora"] = None
    out = {}
    for name, kw in variants.items():
        method = name if name in ("peft_lora", "srlora_recorded") else "srlora"
        model = base if name == "base" else wrap(method, base, cfg, **(kw or {}))
        out[name] = round(param_bytes(model) / 2**20, 1)
        del model
        gc.collect()
    return out


def step_time(base, cfg, device, methods):
    x = torch.randn(cfg.batch, cfg.seq, cfg.hidden, generator=torch.Generator().manual_seed(0)).to(device, base.q_proj.weight.dtype)
    built = {}
    for m in methods:
        model = wrap(m, base, cfg).to(device).train()
        tracker = ImportanceTracker(model) if m.startswith("srlora") else None
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        built[m] = (model, opt, tracker)

    def make_step(model, opt, tracker):
        def step():
            model(x).float().pow(2).mean().backward()
            if tracker is not None:
                tracker.update()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = {m: make_step(*built[m]) for m in methods}
    for m in methods:
        for _ in range(cfg.warmup):
            steps[m]()
    rounds = []
    for i in range(cfg.rounds):
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        rounds.append({m: timed(steps[m], device) for m in order})
    result = {"tokens": cfg.batch * cfg.seq, "rounds": cfg.rounds}
    for m in ("srlora", "srlora_recorded"):
        if m not in methods:
            continue
        model, opt, tracker = built[m]
        interval = switch_steps(cfg.total_steps, cfg.r, cfg.r_target, cfg.gamma)[0]
        recompose_s = median([timed(lambda: recompose(model, tracker, opt), device)
                              for _ in range(3)])
        result.update({f"{m.replace('srlora', 'recompose')}_ms": round(recompose_s * 1e3, 2), "interval": interval})
        for row in rounds:
            row[f"{m}_amortized"] = row[m] + recompose_s / interval
    names = list(rounds[0])
    result["step_ms_median"] = {m: round(median([r[m] for r in rounds]) * 1e3, 2) for m in names}
    result["ratios"] = {f"{a}/{b}": round(median([r[a] / r[b] for r in rounds]), 4)
                        for a, b in (("srlora_amortized", "peft_lora"), ("srlora_recorded_amortized", "peft_lora"),
                                     ("srlora_recorded_amortized", "srlora_amortized"), ("srlora_amortized", "lora"),
                                     ("lora", "peft_lora")) if a in names and b in names}
    result["step_ms_rounds"] = [{m: round(t * 1e3, 2) for m, t in r.items()} for r in rounds]
    return result


@torch.no_grad()
def drift(cfg, device):
    """{compensate: {N: drift / one bf16 rounding of W}} on one drift_dim x drift_dim bf16 layer."""
    ns = sorted(int(n) for n in cfg.drift_switches.split(","))
    k = max(1, round(cfg.gamma * cfg.r))
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(cfg.drift_dim, cfg.drift_dim, bias=False)
    base.weight.copy_(torch.randn(cfg.drift_dim, cfg.drift_dim, generator=g) / math.sqrt(cfg.drift_dim))
    base = base.to(device, torch.bfloat16)
    out = {}
    for compensate in (False, True):
        layer = SRLoRALinear(copy.deepcopy(base), r=cfg.r, alpha=cfg.alpha, r_target=cfg.r + k * ns[-1])
        twin = copy.deepcopy(layer).double()                 # the same start, every switch in fp64
        if compensate:
            layer = srlora_precision.compensate(nn.Sequential(layer))[0]
        g = torch.Generator().manual_seed(1)
        out[str(compensate)] = {}
        for i in range(1, ns[-1] + 1):
            for name in ("lora_A", "lora_B"):                # a training-like change of A and B
                t = getattr(twin, name)
                step = 0.02 * t.abs().mean() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(device)
                getattr(layer, name).add_(step.float())
                t.add_(step)
            slots = torch.randperm(cfg.r, generator=g)[:k].to(device)
            layer.recycle(slots)
            twin.recycle(slots)
            if i in ns:
                one = (twin.weight.to(torch.bfloat16).double() - twin.weight).norm()
                d = (layer.effective_weight().double() - twin.effective_weight()).norm()
                out[str(compensate)][i] = round((d / one).item(), 3)
        del layer, twin
    return out


def main(cfg: Bf16Config):
    device, _ = common.start(cfg, ("llama_block",))
    if cfg.quick:
        cfg = common.replace(cfg, hidden=256, ffn=688, heads=4, rounds=2, warmup=1, drift_dim=256,
                             drift_switches="1,4,16")
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    if set(methods) - {"lora", "srlora", "srlora_recorded", "peft_lora"}:
        raise UserError(f"--methods={cfg.methods}: use any of lora, srlora, srlora_recorded, peft_lora")
    if "peft_lora" in methods and not has("peft"):
        methods.remove("peft_lora")
    result = {"benchmark": "bf16", "env": common.environment(device), "config": vars(cfg),
              "model": f"one LLaMA block: hidden {cfg.hidden}, FFN {cfg.ffn}, seven projections, bf16, random weights"}
    base = LlamaBlock(cfg.hidden, cfg.ffn, cfg.heads, torch.bfloat16).to(device)
    base.requires_grad_(False)
    result["memory_mib"] = mem = memory(base, cfg, methods)
    if "peft_lora" in mem:
        result["memory_ratios"] = {f"{k}/peft_lora": round(mem[k] / mem["peft_lora"], 4)
                                   for k in ("srlora", "srlora_recorded", "srlora_compensate", "srlora_fp32_residual")}
    result["step"] = step_time(base, cfg, device, methods)
    del base
    gc.collect()
    result["drift_over_one_rounding"] = drift(cfg, device)
    result["env"]["load_average_1min_end"] = round(__import__("os").getloadavg()[0], 2)
    common.write_json(result, cfg.out)


if __name__ == "__main__":
    common.cli(main, Bf16Config, __doc__)
