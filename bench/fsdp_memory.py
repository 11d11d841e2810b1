"""Bytes per rank of SRLoRA's frozen residual W and basis U, S, Vh under FSDP2, against one process.

    python bench/fsdp_memory.py                                          # one process, no FSDP
    torchrun --nproc_per_node=2 bench/fsdp_memory.py                     # fully_shard only
    torchrun --nproc_per_node=2 bench/fsdp_memory.py --shard_basis       # fully_shard + shard_basis

The model: the seven projections of one LLaMA block (q, k, v, o: hidden x hidden; gate, up: ffn x hidden;
down: hidden x ffn) in bf16, random weights, apply_srlora(r=8, r_target=64).  Counts the bytes each rank
holds (DTensor local shards), measured from the tensors, not computed from the shapes.  Prints one JSON
line per rank.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root
from srlora import apply_srlora, srlora_layers  # noqa: E402

HIDDEN, FFN = int(os.environ.get("HIDDEN", 1024)), int(os.environ.get("FFN", 2752))


class Block(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        for name, (out, inp) in dict(q=(h, h), k=(h, h), v=(h, h), o=(h, h), gate=(f, h), up=(f, h),
                                     down=(h, f)).items():
            setattr(self, name, nn.Linear(inp, out, bias=False, dtype=torch.bfloat16))


def held(t):
    return (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().nbytes()


def main():
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.manual_seed(0)
    model = apply_srlora(Block(HIDDEN, FFN), targets=("q", "k", "v", "o", "gate", "up", "down"), r=8, r_target=64)
    if world > 1:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        from srlora_fsdp import shard_basis
        dist.init_process_group("gloo")
        fully_shard(model)
        if "--shard_basis" in sys.argv:
            shard_basis(model)
    bytes_ = {key: sum(held(getattr(layer, key)) for _, layer in srlora_layers(model)) for key in ("weight", "U", "S", "Vh")}
    print(json.dumps({"world": world, "rank": int(os.environ.get("RANK", 0)), "shard_basis": "--shard_basis" in sys.argv,
                      "hidden": HIDDEN, "ffn": FFN, "MiB": {k: round(v / 2**20, 3) for k, v in bytes_.items()},
                      "W_plus_basis_MiB": round(sum(bytes_.values()) / 2**20, 3)}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
