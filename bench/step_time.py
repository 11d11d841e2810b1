"""Training-step time of LoRA, PiSSA, SRLoRA (this project) and PEFT LoRA, side by side.

    python bench/step_time.py --out=docs/bench/step_time_cpu.json     # CPU: MiniLM-L6 and a 2-block DeBERTa shape
    python bench/step_time.py --device=cuda --out=docs/bench/step_time_cuda.json   # GPU: DeBERTa-v3-base at 32 x 128
    python bench/step_time.py --quick                                 # smoke run, a few seconds

One step is forward, cross-entropy, backward, AdamW step and zero_grad on one fixed random batch;
SRLoRA adds tracker.update() every step.  All methods of a model live in memory at once and are
timed in interleaved rounds (A B C D, then B C D A, ...), so a slow spell of a shared machine hits
all of them alike; each ratio is the median over rounds of that round's ratio.  SRLoRA's
recompose() is timed on its own (median of a few calls, with the optimizer passed, as in
training) and amortized over its switch interval: switch_steps(total_steps, r, r_target, gamma).
PEFT LoRA (r, alpha, same targets, no dropout) is wrapped around the very same base model.
On CUDA each method's peak memory is measured alone first, with nothing else on the device.
Prints one JSON object and writes it to --out.
"""
import copy
import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common
from common import UserError, has, median, timed
from srlora import ImportanceTracker, apply_srlora, recompose, switch_steps


@dataclass
class StepConfig:
    device: str = "auto"          # auto (cuda if available), cpu or cuda
    models: str = "minilm,deberta"  # which models to time, comma-separated
    quick: bool = False           # smoke run: tiny batch, 2 rounds of 1 step
    r: int = 8                    # adapter rank, the paper's value
    alpha: float = 8.0            # scaling alpha / r = 1, as in the paper
    r_target: int = 64            # SRLoRA's target rank; 64 is the memory target setting
    gamma: float = 0.5            # fusion ratio: r' = 4 slots recycled per switch
    total_steps: int = 1000       # run length that sets the switch interval the recompose cost is spread over
    batch: int = 0                # 0: 16 on CPU (NOTES.md's MiniLM setting), 32 on CUDA
    seq: int = 0                  # 0: 64 tokens for MiniLM on CPU, 128 otherwise
    deberta_layers: int = 0       # 0: 2 blocks on CPU (fits 2 cores), 12 on CUDA (DeBERTa-v3-base)
    rounds: int = 0               # 0: 24 (MiniLM) / 16 (DeBERTa) on CPU, 20 on CUDA
    steps: int = 0                # steps per method per round; 0: 1 on CPU (short rounds pair up better under load), 10 on CUDA
    warmup: int = 3               # untimed steps per method before the rounds
    recompose_calls: int = 5      # recompose() calls timed (each really recycles r' slots per layer)
    threads: int = 1              # torch CPU threads; 1 because two-thread steps ran 4x slower and far noisier on a shared 2-core machine
    methods: str = "lora,pissa,srlora,peft_lora"  # peft_lora is skipped when peft is not importable
    out: str = ""                 # write the JSON here too


def build(method, base, targets, cfg, device):
    """(model, optimizer, tracker) for one method, from a deep copy of base."""
    model = copy.deepcopy(base).to(device)
    tracker = None
    if method == "peft_lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                           target_modules=list(targets)))
    else:
        apply_srlora(model, targets=targets, r=cfg.r, alpha=cfg.alpha, gamma=cfg.gamma,
                     r_target=cfg.r_target if method == "srlora" else cfg.r,
                     init="lora" if method == "lora" else "pissa")
        if method == "srlora":
            tracker = ImportanceTracker(model)
    for name, p in model.named_parameters():
        if any(h in name.split(".") for h in common.HEAD):
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    return model, opt, tracker


def make_step(model, opt, tracker, inputs, labels):
    def step():
        loss = F.cross_entropy(common.logits_of(model(**inputs)), labels)
        loss.backward()
        if tracker is not None:
            tracker.update()                         # Eq. (3)-(5), no host sync
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def adapter_counts(model):
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_A" in name or "lora_B" in name)
    return n, sum(p.numel() for p in model.parameters())


def peak_memory(method, base, targets, cfg, device, inputs, labels):
    """Peak CUDA memory (MiB) of a few steps of `method` with nothing else on the device."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model, opt, tracker = build(method, base, targets, cfg, device)
    step = make_step(model, opt, tracker, inputs, labels)
    for _ in range(3):
        step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    del model, opt, tracker, step
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def bench_model(name, cfg, device):
    cpu = device.type == "cpu"
    if name == "minilm":
        base, targets, desc = common.minilm(pretrained=not cfg.quick)
        seq = cfg.seq or (64 if cpu else 128)
    else:
        layers = cfg.deberta_layers or (1 if cfg.quick else 2 if cpu else 12)
        base, targets, desc = common.deberta(layers)
        seq = cfg.seq or 128
    batch = cfg.batch or (2 if cfg.quick else 16 if cpu else 32)
    seq = 16 if cfg.quick and not cfg.seq else seq
    if name == "deberta" and cpu and not cfg.batch and not cfg.quick:
        batch = 4                                     # 4 x 128 tokens keeps a 2-block step near 0.5 s on 2 cores
    rounds = cfg.rounds or (2 if cfg.quick else (24 if name == "minilm" else 16) if cpu else 20)
    steps = cfg.steps or (1 if cfg.quick or cpu else 10)
    warmup = 1 if cfg.quick else cfg.warmup
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    unknown = set(methods) - {"lora", "pissa", "srlora", "peft_lora"}
    if unknown:
        raise UserError(f"--methods has {sorted(unknown)}; use lora, pissa, srlora, peft_lora")
    if "peft_lora" in methods and not has("peft"):
        methods.remove("peft_lora")
    inputs, labels = common.batch_for(base, batch, seq, device)
    base.to(device)
    result = {"model": desc, "batch": batch, "seq": seq, "rounds": rounds, "steps_per_round": steps,
              "base_params": sum(p.numel() for p in base.parameters()), "methods": methods}

    if device.type == "cuda":                         # memory first, one method at a time
        result["peak_memory_mib"] = {m: round(peak_memory(m, base, targets, cfg, device, inputs, labels), 1)
                                     for m in methods}

    built = {m: build(m, base, targets, cfg, device) for m in methods}
    result["adapter_params"] = {m: adapter_counts(built[m][0])[0] for m in methods}
    step_fns = {m: make_step(*built[m], inputs, labels) for m in methods}
    for m in methods:                                 # warm-up: allocator, kernels, AdamW state
        for _ in range(warmup):
            step_fns[m]()
    common.sync(device)

    def run_steps(fn):
        return lambda: [fn() for _ in range(steps)]

    per_round = []
    for i in range(rounds):
        order = methods[i % len(methods):] + methods[:i % len(methods)]   # rotate the start each round
        per_round.append({m: timed(run_steps(step_fns[m]), device) / steps for m in order})

    if "srlora" in methods:                           # recompose, timed alone, on the trained SRLoRA model
        model, opt, tracker = built["srlora"]
        switches = switch_steps(cfg.total_steps, cfg.r, cfg.r_target, cfg.gamma)
        calls = min(cfg.recompose_calls, len(switches)) if switches else 0
        times = [timed(lambda: recompose(model, tracker, opt), device) for _ in range(calls)]
        interval = switches[0] if switches else None
        recompose_s = median(times)
        # tracker.update() alone, on real gradients: a low-noise measure of the per-step extra work
        F.cross_entropy(common.logits_of(model(**inputs)), labels).backward()
        update_s = median([timed(tracker.update, device) for _ in range(20)])
        opt.zero_grad(set_to_none=True)
        result["tracker_update_ms"] = round(update_s * 1e3, 3)
        result["srlora_schedule"] = {"total_steps": cfg.total_steps, "r_target": cfg.r_target,
                                     "n_switch": len(switches), "interval": interval}
        result["recompose_ms"] = round(recompose_s * 1e3, 3) if recompose_s is not None else None
        for row in per_round:
            row["srlora_amortized"] = row["srlora"] + (recompose_s / interval if interval else 0.0)

    names = list(per_round[0])
    result["step_ms_median"] = {m: round(median([row[m] for row in per_round]) * 1e3, 3) for m in names}
    ratios = {}
    for num, den in (("srlora_amortized", "lora"), ("srlora_amortized", "peft_lora"), ("srlora", "lora"),
                     ("pissa", "lora"), ("lora", "peft_lora"), ("srlora_amortized", "pissa")):
        if num in names and den in names:
            ratios[f"{num}/{den}"] = round(median([row[num] / row[den] for row in per_round]), 4)
    if "tracker_update_ms" in result and "lora" in names:
        extra = result["tracker_update_ms"] + (result["recompose_ms"] or 0) / (interval or 1)
        ratios["1 + (tracker.update + recompose/interval) / lora"] = round(1 + extra / result["step_ms_median"]["lora"], 4)
    if "recompose_ms" in result and result["recompose_ms"] is not None and "srlora" in names:
        ratios["recompose/srlora_step"] = round(result["recompose_ms"] / result["step_ms_median"]["srlora"], 4)
    if "peak_memory_mib" in result and "peft_lora" in methods and "srlora" in methods:
        ratios["peak_memory srlora/peft_lora"] = round(
            result["peak_memory_mib"]["srlora"] / result["peak_memory_mib"]["peft_lora"], 4)
    result["ratios"] = ratios
    result["step_ms_rounds"] = [{m: round(t * 1e3, 3) for m, t in row.items()} for row in per_round]
    del built, step_fns
    gc.collect()
    return result


def main(cfg: StepConfig):
    device, models = common.start(cfg, ("minilm", "deberta"))
    if cfg.r_target < cfg.r:
        raise UserError(f"--r_target={cfg.r_target} is smaller than --r={cfg.r}; use r_target >= r")
    result = {"benchmark": "step_time", "env": common.environment(device),
              "config": {k: v for k, v in vars(cfg).items()}, "peft_available": has("peft"), "models": {}}
    for name in models:
        result["models"][name] = bench_model(name, cfg, device)
    result["env"]["load_average_1min_end"] = round(__import__("os").getloadavg()[0], 2)
    common.write_json(result, cfg.out)


if __name__ == "__main__":
    common.cli(main, StepConfig, __doc__)
