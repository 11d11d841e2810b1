"""The mechanism, isolated: does recomposition help when the task needs an update of rank R > r?

    python experiments/synthetic.py            # about 3 CPU-minutes on one core; writes docs/results/synthetic/

A "pretrained" network: an MLP of `depth` square tanh layers (the last one linear), each weight
W0 = U diag(s) V^T with random orthogonal U, V and a decaying spectrum s_i = 1 / sqrt(1 + i).  The
teacher is the same network with a rank-R change added to every layer, dW* = P diag(c) Q^T, of one of
two kinds:
  random     P, Q random orthonormal: a generic rank-R change, unrelated to W0's singular directions;
  principal  P = U[:, :R] M, Q = V[:, :R]: a change inside W0's top-R singular subspace, i.e. in the
             directions SRLoRA visits (with r_target >= R).
The student starts from W0 and trains only its adapters, with Adam, on fresh Gaussian inputs each
step, to match the teacher's outputs (mean squared error).  Reported per method, kind and R, over
seeds: the held-out loss at the end (the learning rate picked per method from a small grid, by the
mean over seeds), and the entropy effective rank (Roy and Vetterli, 2007) of the learned change
dW = W_final - W0, averaged over layers: exp(H(p)) with p = sigma / sum(sigma).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from srlora import ImportanceTracker, apply_srlora, recompose, srlora_layers  # noqa: E402
from srlora_switch import AdaptiveSchedule, SlotRule, switch_steps_within  # noqa: E402

OUT = ROOT / "docs" / "results" / "synthetic"

# method: (apply_srlora settings, recompose settings).  r and r_target are filled in from the flags;
# "lora_rt" is LoRA with rank r_target, the upper reference with the same span and more parameters.
# SRLoRA's switch settings: srlora_switch.SlotRule options, plus "stop" (switch_steps_within) and
# "adaptive" (AdaptiveSchedule).
METHODS = {
    "lora": ({"init": "lora"}, None),
    "pissa": ({"init": "pissa", "r_target": "r"}, None),
    "srlora": ({"init": "pissa"}, {}),
    "srlora_relative": ({"init": "pissa"}, {"score": "relative"}),
    "srlora_grace1": ({"init": "pissa"}, {"grace": 1}),
    "srlora_stop0.75": ({"init": "pissa"}, {"stop": 0.75}),
    "srlora_adaptive": ({"init": "pissa"}, {"adaptive": 0.5}),   # AdaptiveSchedule ratio 0.5 (srlora's default is 0.1)
    "lora_rt": ({"init": "lora", "r": "r_target"}, None),
}


def orthonormal(n, k, gen):
    return torch.linalg.qr(torch.randn(n, k, generator=gen)).Q


class MLP(nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights)
        with torch.no_grad():
            for layer, w in zip(self.layers, weights):
                layer.weight.copy_(w)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.tanh(x) if i < len(self.layers) - 1 else x
        return x


def pretrained_and_teacher(d, depth, R, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    s = 1.0 / torch.arange(1, d + 1).float().sqrt()                      # decaying spectrum, s_0 = 1
    W0, Wt = [], []
    for _ in range(depth):
        U, V = orthonormal(d, d, gen), orthonormal(d, d, gen)
        w0 = U @ torch.diag(s) @ V.T * math.sqrt(d) / s.norm()               # rows of unit-ish gain
        c = 0.5 * w0.norm() / math.sqrt(R) * torch.ones(R)                  # |dW*|_F = |W0|_F / 2 for every R
        if kind == "random":
            P, Q = orthonormal(d, R, gen), orthonormal(d, R, gen)
        else:
            P, Q = U[:, :R] @ orthonormal(R, R, gen), V[:, :R]
        W0.append(w0)
        Wt.append(w0 + P @ torch.diag(c) @ Q.T)
    return W0, Wt


def effective_rank(dW):
    sigma = torch.linalg.svdvals(dW.double())
    p = sigma / sigma.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def train(W0, teacher, method, args, lr, seed):
    settings, switch = METHODS[method]
    ranks = {"r": args.r, "r_target": args.r_target}
    cfg = {k: ranks[v] if isinstance(v, str) and v in ranks else v for k, v in settings.items()}
    # moments="keep": the default when docs/results/synthetic was run (CHOICES.md: the default is "reset" now)
    cfg = {"r": args.r, "alpha": cfg.get("r", args.r), "r_target": args.r_target, "gamma": args.gamma,
           "svd": "full", "moments": "keep", **cfg}
    if cfg["init"] == "lora" or switch is None:
        cfg["r_target"] = cfg["r"]
    torch.manual_seed(seed)
    model = apply_srlora(MLP(W0), targets=("layers.0", "layers.1", "layers.2")[:args.depth], **cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    tracker = ImportanceTracker(model) if switch is not None else None
    switch = dict(switch or {})
    stop, ratio = switch.pop("stop", 1.0), switch.pop("adaptive", None)
    rule = SlotRule(**switch)
    switches = set(switch_steps_within(args.steps, cfg["r"], cfg["r_target"], cfg["gamma"], stop)) if tracker else set()
    schedule = AdaptiveSchedule(args.steps, cfg["r"], cfg["r_target"], cfg["gamma"], ratio=ratio) if ratio else None
    gen = torch.Generator().manual_seed(1000 + seed)
    for step in range(1, args.steps + 1):
        lr_now = lr * min(1.0, step / args.warmup) * (1 - step / (args.steps + 1))
        for g in opt.param_groups:
            g["lr"] = lr_now
        x = torch.randn(args.batch, args.d, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tracker:
            tracker.update()
        opt.step()
        if schedule is not None:
            due = schedule.due(step, tracker)
            if due:
                recompose(model, tracker, opt, layers=due)
        elif step in switches:
            recompose(model, tracker, opt, select=rule)
    x = torch.randn(4096, args.d, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        test = float((model(x) - teacher(x)).pow(2).mean())
        eranks = [effective_rank(layer.effective_weight() - w0) for (_, layer), w0 in zip(srlora_layers(model), W0)]
    return {"test_loss": test if math.isfinite(test) else float("inf"), "erank": float(np.mean(eranks))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=64, help="width of every layer")
    parser.add_argument("--depth", type=int, default=3, help="number of adapted layers (at most 3)")
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--r_target", type=int, default=32)
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--ranks", default="2,8,32", help="teacher change ranks R")
    parser.add_argument("--kinds", default="random,principal")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lrs", default="0.03", help="Adam learning rates tried per method (comma-separated; the best is reported)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    rows = []
    for kind in args.kinds.split(","):
        for R in map(int, args.ranks.split(",")):
            nets = [pretrained_and_teacher(args.d, args.depth, R, kind, seed) for seed in range(args.seeds)]
            base_loss = []
            for W0, Wt in nets:
                x = torch.randn(4096, args.d, generator=torch.Generator().manual_seed(7))
                with torch.no_grad():
                    base_loss.append(float((MLP(W0)(x) - MLP(Wt)(x)).pow(2).mean()))
            for method in args.methods.split(","):
                for lr in map(float, args.lrs.split(",")):
                    runs = [train(W0, MLP(Wt), method, args, lr, seed) for seed, (W0, Wt) in enumerate(nets)]
                    rows.append({"kind": kind, "R": R, "method": method, "lr": lr, "start_loss": base_loss,
                                 "test_loss": [r["test_loss"] for r in runs], "erank": [r["erank"] for r in runs]})
                    print(f"{kind:9s} R={R:2d} {method:17s} lr={lr:<6g} loss {np.mean(rows[-1]['test_loss']):.4f} "
                          f"(start {np.mean(base_loss):.4f})  erank {np.mean(rows[-1]['erank']):.1f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "results.json").write_text(json.dumps({"config": config, "runs": rows}, indent=1) + "\n")
    print(f"wrote {out / 'results.json'} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
