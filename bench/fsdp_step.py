"""Step time and one recompose()'s time with SRLoRA under FSDP2 against DDP, on 2 ranks.

    torchrun --nproc_per_node=2 bench/fsdp_step.py

The model: a pure-torch stack of BLOCKS pre-norm residual MLP blocks (LayerNorm, up: D -> 4D, GELU,
down: 4D -> D; D=512, 4 blocks by default) and a linear head, fp32, random weights, SRLoRA (r=8,
r_target=64) on every up and down.  FSDP2: fully_shard per block and on the model, then shard_basis;
DDP: DistributedDataParallel over the whole model.  A step: forward on this rank's half of a batch
of BATCH x TOKENS vectors, cross-entropy, backward, tracker.update(), AdamW step, zero_grad.
Rounds interleave the two (STEPS steps of FSDP2, then of DDP, ...), so load that drifts over the run
hits both alike; each round's time per step is taken from a barrier to a barrier, and the medians
over rounds are reported.  recompose() is timed the same way, one switch per round.  One thread per
rank, gloo on the CPU.  Rank 0 writes the JSON with the load average at the start and the end.
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root
from srlora import ImportanceTracker, apply_srlora, recompose  # noqa: E402

D, BLOCKS = int(os.environ.get("D", 512)), int(os.environ.get("BLOCKS", 4))
BATCH, TOKENS = int(os.environ.get("BATCH", 8)), int(os.environ.get("TOKENS", 64))
ROUNDS, STEPS = int(os.environ.get("ROUNDS", 10)), int(os.environ.get("STEPS", 5))
OUT = os.environ.get("OUT", str(Path(__file__).resolve().parents[1] / "docs" / "bench" / "fsdp_step_cpu.json"))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d, n_blocks):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def setup(kind):
    """(module to call, model, optimizer, tracker) for "fsdp" or "ddp"; the same weights for both."""
    from srlora_fsdp import spread_factors
    torch.manual_seed(0)
    model = apply_srlora(Net(D, BLOCKS), targets=("up", "down"), r=8, r_target=64, decompose=spread_factors)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard
        from srlora_fsdp import shard_basis
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        shard_basis(model)
        module = model
    else:
        module = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return module, model, optimizer, ImportanceTracker(model)      # the tracker after fully_shard


def timed(fn):
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    load_start = round(os.getloadavg()[0], 2)
    runs = {kind: setup(kind) for kind in ("fsdp", "ddp")}
    g = torch.Generator().manual_seed(1 + rank)                      # each rank its own half batch
    x = torch.randn(BATCH // world, TOKENS, D, generator=g)
    y = torch.randint(0, 10, (BATCH // world, TOKENS), generator=g)

    def steps(kind):
        module, _, optimizer, tracker = runs[kind]
        for _ in range(STEPS):
            F.cross_entropy(module(x).flatten(0, 1), y.flatten()).backward()
            tracker.update()
            optimizer.step()
            optimizer.zero_grad()

    def switch(kind):
        _, model, optimizer, tracker = runs[kind]
        recompose(model, tracker, optimizer)

    for kind in runs:                                                # warm-up, untimed
        steps(kind)
    step_s = {kind: [] for kind in runs}
    switch_s = {kind: [] for kind in runs}
    for i in range(ROUNDS):
        for kind in runs:
            step_s[kind].append(timed(lambda: steps(kind)) / STEPS)
            if i < 14:                                               # (64 - 8) / 4 switches: then r_target is reached
                switch_s[kind].append(timed(lambda: switch(kind)))
    if rank == 0:
        median = {kind: statistics.median(v) for kind, v in step_s.items()}
        result = {"command": "torchrun --nproc_per_node=2 bench/fsdp_step.py", "world": world, "backend": "gloo",
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                  "cpu_cores": os.cpu_count(), "torch_threads_per_rank": 1,
                  "model": {"d": D, "blocks": BLOCKS, "ffn": 4 * D, "dtype": "float32", "r": 8, "r_target": 64,
                            "adapted_layers": 2 * BLOCKS},
                  "batch": {"examples": BATCH, "tokens": TOKENS, "per_rank": BATCH // world},
                  "rounds": ROUNDS, "steps_per_round": STEPS,
                  "step_ms_median": {k: round(v * 1e3, 2) for k, v in median.items()},
                  "step_ms_rounds": {k: [round(t * 1e3, 2) for t in v] for k, v in step_s.items()},
                  "fsdp_over_ddp_step": round(median["fsdp"] / median["ddp"], 3),
                  "recompose_ms_median": {k: round(statistics.median(v) * 1e3, 2) for k, v in switch_s.items()},
                  "recompose_ms_rounds": {k: [round(t * 1e3, 2) for t in v] for k, v in switch_s.items()},
                  "load_average_1min_start": load_start, "load_average_1min_end": round(os.getloadavg()[0], 2)}
        Path(OUT).parent.mkdir(parents=True, exist_ok=True)
        Path(OUT).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
