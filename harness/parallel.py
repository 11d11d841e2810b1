"""How the training loop runs on the processes torchrun starts: DDP, where every rank holds the whole
model, or FSDP2 (--fsdp), where every rank holds 1/N of each weight (srlora_fsdp.py).  harness/loop.py
calls these; nothing here knows about runs, flags or logs.

FSDP2 in the loop:  apply_srlora(..., decompose=spread_factors) -> shard(model) -> optimizer and
ImportanceTracker -> steps as usual (every rank evaluates: a forward needs all of them) ->
save_sharded / load_sharded, a torch.distributed.checkpoint folder per checkpoint.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from srlora import srlora_layers


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def start(fsdp: bool = False):
    """(rank, world size), starting torch.distributed when torchrun launched several processes, or
    one under --fsdp (fully_shard needs a process group even for one rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (world > 1 or fsdp) and launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def stop():
    if dist.is_initialized():
        dist.barrier()           # rank 0 may still be writing plots: no rank tears gloo down under the other
        dist.destroy_process_group()


# --- FSDP2 -------------------------------------------------------------------------------------

def transformer_blocks(model: nn.Module) -> list:
    """The children of every nn.ModuleList that holds SRLoRA layers: a transformer's blocks
    (BERT's encoder.layer, ViT's blocks, Llama's model.layers), each its own FSDP unit."""
    blocks, names = [], []
    for name, module in model.named_modules():                      # parents first: outermost lists only
        if isinstance(module, nn.ModuleList) and not any(name.startswith(b + ".") for b in names):
            for i, child in enumerate(module):
                if srlora_layers(child):
                    blocks.append(child)
                    names.append(f"{name}.{i}")
    return blocks


def shard(model: nn.Module) -> nn.Module:
    """fully_shard every transformer block, then the model (the rest: embeddings, head), then cut
    the SVD basis into the same row blocks (srlora_fsdp.shard_basis).  Returns model, sharded in place."""
    from torch.distributed.fsdp import fully_shard
    from srlora_fsdp import shard_basis
    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return shard_basis(model)


def forward_module(model: nn.Module, world: int, fsdp: bool) -> nn.Module:
    """The module the batches go through: DDP's wrapper on several ranks, else the model itself
    (one process, or FSDP2, whose fully_shard made the model its own wrapper)."""
    return nn.parallel.DistributedDataParallel(model) if world > 1 and not fsdp else model


def gradient_sync(module: nn.Module, sync: bool, fsdp: bool):
    """A context in which backward() reduces gradients over the ranks only if `sync`: the last
    micro-batch of a step.  `module` is the DDP wrapper, or the model itself under FSDP2."""
    if fsdp:
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync or not isinstance(module, nn.parallel.DistributedDataParallel) \
        else module.no_sync()


def grad_norm(params, fsdp: bool) -> torch.Tensor:
    """The norm of all gradients together; under FSDP2 each rank holds a part, summed over the ranks."""
    grads = [p.grad.to_local() if fsdp else p.grad for p in params if p.grad is not None]   # DTensor: this rank's rows
    squares = torch.stack(torch._foreach_norm(grads)).square().sum()
    if fsdp and dist.is_initialized():
        dist.all_reduce(squares)
    return squares.sqrt()


def first_non_finite(state: dict, fsdp: bool):
    """The name of the first floating tensor of `state` holding NaN or inf, or None; under FSDP2
    each rank checks its rows and the ranks agree, so that all of them stop or none."""
    names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
    local = [state[k].to_local() if hasattr(state[k], "to_local") else state[k] for k in names]   # DTensor: its rows
    finite = torch.stack([torch.isfinite(t).all() for t in local]) if local else torch.ones(0, dtype=torch.bool)
    if fsdp and dist.is_initialized():
        finite = finite.to(torch.uint8)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    bad = (~finite.bool()).nonzero().flatten().tolist()
    return names[bad[0]] if bad else None


def save_sharded(path, model, optimizer, tracker, step: int, loop_state: dict) -> None:
    """A checkpoint folder: every rank's shards of model, optimizer and tracker (srlora_fsdp.save_checkpoint)
    and loop.pt, the rest of the loop's state from rank 0 (scheduler, data order, RNG, best metrics).
    Written to a fresh temporary folder and renamed when every rank is done, so a crash leaves the previous checkpoint."""
    from srlora_fsdp import save_checkpoint
    path, rank = Path(path), dist.get_rank()
    # A fresh folder under a unique name (mkdtemp: mkdir, which never follows a symlink), made by
    # rank 0 and sent to the others; the previous checkpoint moves aside under a name of the same kind.
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    names = [tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp") if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    tmp = Path(names[0])
    old = tmp.with_name(tmp.name + ".old")
    save_checkpoint(str(tmp), model, optimizer, tracker, step)
    if rank == 0:
        torch.save(loop_state, tmp / "loop.pt")
    dist.barrier()
    if rank == 0:
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded(path, model, optimizer, tracker) -> dict:
    """Read what save_sharded wrote into the sharded model, its optimizer and tracker, on any number of
    ranks (torch.distributed.checkpoint reshards); returns loop.pt's state."""
    from srlora_fsdp import load_checkpoint
    from harness.weights import read_checkpoint
    load_checkpoint(str(path), model, optimizer, tracker)   # torch.distributed.checkpoint unpickles .metadata
    return read_checkpoint(Path(path) / "loop.pt")          # weights_only, with numpy's RNG state allowed
