"""SRLoRA on models sharded with PyTorch FSDP2 (torch.distributed.fsdp.fully_shard).

ImportanceTracker.update(), recompose() and their helpers in srlora.py already work on sharded
parameters: each rank updates and recycles its own rows of W, B and the EMAs, and reads the few
rows of A and Vh it needs from their holders (see "How to touch a possibly sharded tensor" there).
The user code is the same as in one process:

    model = apply_srlora(model, targets=..., r=8, r_target=64,     # before sharding; each SVD
                         decompose=spread_factors)                 # computed once, on one rank
    for block in model.layers: fully_shard(block)
    fully_shard(model)
    shard_basis(model)                # optional: the basis U, Vh held 1/N per rank, like W
    tracker = ImportanceTracker(model); optimizer = torch.optim.AdamW(trainable, lr=...)
    ... loss.backward(); tracker.update(); optimizer.step(); optimizer.zero_grad()
    if step in switches: recompose(model, tracker, gamma=0.5, optimizer=optimizer)
    save_checkpoint(folder, model, optimizer, tracker, step)      # and step = load_checkpoint(...) to resume

fully_shard shards parameters only; the basis U (m, r_target - r), S and Vh (r_target - r, n) are
buffers and stay whole on every rank.  recompose() then uses U's rows that match this rank's rows of
W, which is correct but keeps the whole basis in memory.  shard_basis() cuts U and Vh into the same
Shard(0) row blocks, as DTensor buffers: U's rows line up with W's, Vh's rows are gathered at a
switch.  We did not make U a frozen parameter so that fully_shard would shard it: FSDP2 would
then all-gather it at every forward and backward, although only a switch reads it.
With compensate=True, shard_basis cuts the W-shaped rounding-error buffer the same way.
spread_factors makes apply_srlora compute each weight's SVD on one rank and send it to the others,
instead of every rank computing all of them.
save_checkpoint / load_checkpoint write and read every rank's shards with torch.distributed.checkpoint;
a checkpoint saved on N ranks loads on any number of ranks (DCP reshards), or in one process.
"""
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from srlora import _out_in_weight, pissa_factors, srlora_layers


@torch.no_grad()
def spread_factors(model: torch.nn.Module, names, cfg, group=None) -> dict:
    """apply_srlora's `decompose`, spread over the ranks of `group` (default: all): each weight's
    SVD is computed once, on one rank, and broadcast; every rank returns the same {name: (U, S, Vh)}.

    The weights go, largest first, to the rank with the least work so far (work ~ m n k), so that
    one LLaMA block's 7 projections split about evenly over 2 ranks.  Each rank runs pissa_factors
    on its share, so the factors are bit for bit one process's (with the same number of torch
    threads: a BLAS result may depend on it).  The factors are views into one
    buffer per rank, held until SRLoRALinear has taken its copies.  Every
    rank must hold the same weights (the same checkpoint, or the same seed), as it would for
    apply_srlora.  Without a process group, or with one rank: pissa_factors."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return pissa_factors(model, names, cfg)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    weights = {name: _out_in_weight(model.get_submodule(name)).detach() for name in names}
    jobs = [(name, min(cfg.r_target, *W.shape), *W.shape) for name, W in weights.items()
            if min(cfg.r_target, *W.shape) >= cfg.r]                  # k < r: SRLoRALinear raises about r
    owner, load = {}, [0] * world
    for name, k, m, n in sorted(jobs, key=lambda job: -job[1] * job[2] * job[3]):   # stable: ties keep order
        owner[name] = min(range(world), key=load.__getitem__)        # the least loaded; the lowest rank on a tie
        load[owner[name]] += m * n * k
    factors = pissa_factors(model, [name for name, *_ in jobs if owner[name] == rank], cfg)   # this rank's share
    for src in range(world):                                         # one broadcast per rank: all it computed
        held = [(name, k, m, n) for name, k, m, n in jobs if owner[name] == src]
        if not held:
            continue
        sizes = [size for _, k, m, n in held for size in (m * k, k, k * n)]
        buffer = (torch.cat([t.reshape(-1) for name, *_ in held for t in factors[name]]) if src == rank
                  else torch.empty(sum(sizes), dtype=torch.float32,            # top_singular's dtype
                                   device=weights[held[0][0]].device))
        dist.broadcast(buffer, src=dist.get_global_rank(group, src) if group else src, group=group)
        parts = iter(buffer.split(sizes))
        for name, k, m, n in held:
            factors[name] = (next(parts).view(m, k), next(parts), next(parts).view(k, n))
    return factors


@torch.no_grad()
def shard_basis(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every SRLoRALinear's buffers U and Vh (and weight_error, with compensate=True) by
    DTensors cut into the row blocks in which fully_shard cut its weight; call it after fully_shard.
    No communication: every rank holds the whole buffers and keeps its own rows.  Returns model,
    modified in place."""
    for name, layer in srlora_layers(model):
        if not isinstance(layer.weight, DTensor):
            raise ValueError(f"{name}.weight is not sharded; call shard_basis(model) after fully_shard(model)")
        mesh = layer.weight.device_mesh
        for key in ("U", "Vh", "weight_error"):
            t = getattr(layer, key)
            if t is None or isinstance(t, DTensor):
                continue
            size = -(-t.shape[0] // mesh.size())                             # torch.chunk's block size, as FSDP2's
            start = min(mesh.get_local_rank() * size, t.shape[0])
            local = t[start:start + size].clone()                            # a copy: the whole t can be freed
            setattr(layer, key, DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                   shape=t.shape, stride=t.stride()))
    return model


def save_checkpoint(checkpoint_id, model: torch.nn.Module, optimizer, tracker, step: int) -> None:
    """Write model, optimizer, tracker and step with torch.distributed.checkpoint: every rank writes
    its own shards (W, A, B, the basis after shard_basis, moments, EMAs) into the folder checkpoint_id.
    tracker may be None (LoRA, PiSSA: nothing to track)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "tracker": tracker.state_dict() if tracker else {},
              "step": step},
             checkpoint_id=checkpoint_id)


def load_checkpoint(checkpoint_id, model: torch.nn.Module, optimizer, tracker) -> int:
    """Read what save_checkpoint wrote into a sharded (and shard_basis'd) model, its optimizer and a
    fresh ImportanceTracker (or None); each rank reads the shards it holds, so the checkpoint may come
    from another number of ranks, or one process.  Returns the saved step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "tracker": tracker.state_dict() if tracker else {}, "step": 0}
    dcp.load(state, checkpoint_id=checkpoint_id)                 # in place, into these tensors
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if tracker:
        tracker.load_state_dict(state["tracker"])              # the EMAs came in place; this sets beta1, beta2
    return state["step"]
