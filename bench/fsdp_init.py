"""Seconds to wrap one LLaMA-7B-shaped block with apply_srlora: one process, and 2 ranks that spread the SVDs.

    python bench/fsdp_init.py                                  # one process: every SVD here
    torchrun --nproc_per_node=2 bench/fsdp_init.py             # 2 ranks: spread_factors against every rank doing all

The block: the seven projections of a LLaMA-7B block (q, k, v, o: 4096 x 4096; gate, up: 11008 x 4096;
down: 4096 x 11008) in fp32, random weights, apply_srlora(r=8, r_target=64, svd="auto", which is the
seeded randomized SVD at these widths).  One thread per process.  On 2 ranks, rounds alternate between
decompose=spread_factors (each weight's SVD on one rank, then broadcast) and the default (every rank
decomposes all seven), timed from a barrier to the moment the last rank holds its wrapped block; the
two wrapped blocks are compared bit for bit.  Each run merges its result into the JSON file under
"one_process" or "two_ranks", with the load average at its start and end: the machine may be shared.
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root
from srlora import apply_srlora  # noqa: E402

HIDDEN, FFN = int(os.environ.get("HIDDEN", 4096)), int(os.environ.get("FFN", 11008))
ROUNDS = int(os.environ.get("ROUNDS", 2))
OUT = os.environ.get("OUT", str(Path(__file__).resolve().parents[1] / "docs" / "bench" / "fsdp_init_cpu.json"))
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class Block(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        for name, (out, inp) in dict(q=(h, h), k=(h, h), v=(h, h), o=(h, h), gate=(f, h), up=(f, h),
                                     down=(h, f)).items():
            setattr(self, name, nn.Linear(inp, out, bias=False))


def wrapped(decompose=None):
    """(seconds until every rank holds its wrapped block, its state dict); the block built untimed."""
    import torch.distributed as dist
    torch.manual_seed(0)
    block = Block(HIDDEN, FFN)
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    apply_srlora(block, targets=TARGETS, r=8, r_target=64, decompose=decompose)
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - t0, block.state_dict()


def main():
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    load_start = round(os.getloadavg()[0], 2)
    record = {"hidden": HIDDEN, "ffn": FFN, "dtype": "float32", "r": 8, "r_target": 64, "svd": "auto",
              "torch_threads_per_process": 1, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_1min_start": load_start}
    if world == 1:
        seconds = [wrapped()[0] for _ in range(ROUNDS)]
        key, record = "one_process", {**record, "command": "python bench/fsdp_init.py", "seconds": seconds,
                                      "median_s": statistics.median(seconds)}
    else:
        import torch.distributed as dist
        from srlora_fsdp import spread_factors
        dist.init_process_group("gloo")
        spread, every, same = [], [], []
        for _ in range(ROUNDS):                                   # interleaved: the load drifts over minutes
            t_spread, a = wrapped(spread_factors)
            t_every, b = wrapped()
            spread.append(t_spread)
            every.append(t_every)
            same.append(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
        agree = [None] * world
        dist.all_gather_object(agree, all(same))
        key, record = "two_ranks", {**record, "command": "torchrun --nproc_per_node=2 bench/fsdp_init.py",
                                    "spread_seconds": spread, "every_rank_all_seconds": every,
                                    "spread_median_s": statistics.median(spread),
                                    "every_rank_all_median_s": statistics.median(every),
                                    "bitwise_equal_on_every_rank": all(agree)}
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank:
            return
    record["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    results = json.loads(Path(OUT).read_text()) if Path(OUT).exists() else {}
    results[key] = record
    Path(OUT).parent.mkdir(parents=True, exist_ok=True)
    Path(OUT).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({key: record}, indent=2))


if __name__ == "__main__":
    main()
