"""SRLoRA on models sharded with PyTorch FSDP2 (torch.distributed.fsdp.fully_shard).

The user code is the same as in one process, plus two calls:

    model = apply_srlora(model, targets=..., r=8, r_target=64,     # before sharding; each SVD
                         decompose=spread_factors)                 # computed once, on one rank
    for block in model.layers: fully_shard(block)
    fully_shard(model)
    shard_basis(model)                # the sharded recycle(); the basis U, Vh held 1/N per rank, like W
    tracker = ImportanceTracker(model); optimizer = torch.optim.AdamW(trainable, lr=...)
    ... loss.backward(); tracker.update(); optimizer.step(); optimizer.zero_grad()
    if step in switches: recompose(model, tracker, optimizer)
    save_checkpoint(folder, model, optimizer, tracker, step)      # and step = load_checkpoint(...) to resume

fully_shard cuts every parameter, and every tensor made from one (the tracker's EMAs, the optimizer's
moments), into row blocks, one per rank (Shard(0) on a 1-D mesh, as torch.chunk cuts).  The EMA
updates of Eq. (3)-(5) are elementwise and run on DTensors as they are.  A switch is not:
shard_basis() gives each SRLoRALinear the recycle() of ShardedLayer, the same Eq. (9)-(12) on this
rank's rows of W, B, U, the EMAs and the moments, with the r' rows of A and Vh it needs gathered
from the ranks that hold them, so no rank ever holds a whole W.  The basis U (m, r_target - r) and
Vh are buffers, which fully_shard leaves whole; shard_basis() cuts them (and srlora_precision's
weight_error) into the same row blocks.  They are not frozen parameters, which fully_shard would
shard itself, because FSDP2 would then all-gather them at every forward and backward, although only
a switch reads them.  spread_factors makes apply_srlora compute each weight's SVD on one rank and
send it to the others.  save_checkpoint / load_checkpoint write and read every rank's shards with
torch.distributed.checkpoint; a checkpoint saved on N ranks loads on any number of ranks, or in one
process.  Reading one unpickles its .metadata file (torch.distributed.checkpoint does): load only
checkpoints you trust.
"""
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from srlora import SRLoRALinear, _out_in_weight, extend_layer, pissa_factors, srlora_layers


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of t, as a plain tensor that writes through to t; a whole t as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _row_block(t: DTensor) -> int:
    """Index of the first row of t that this rank holds."""
    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise ValueError(f"a tensor is sharded as {t.placements}; SRLoRA supports FSDP2's default, Shard(0) "
                         f"on a 1-D mesh: call fully_shard(module) without a 2-D (HSDP) mesh or shard_placement_fn")
    size = -(-t.shape[0] // t.device_mesh.size())                   # torch.chunk's block size
    return min(t.device_mesh.get_local_rank() * size, t.shape[0])


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index], whole on every rank: a sharded t's rows are summed over ranks, each from its holder."""
    if not isinstance(t, DTensor):
        return t[index]
    local, start = t.to_local(), _row_block(t)
    mine = (index >= start) & (index < start + local.shape[0])
    out = local.new_zeros(index.numel(), *local.shape[1:])
    out[mine] = local[index[mine] - start]
    dist.all_reduce(out, group=t.device_mesh.get_group())            # one holder per row: the sum is exact
    return out


def _set_rows(t: torch.Tensor, index, value) -> None:
    """t[index] = value (a tensor of len(index) rows, or a number); each rank writes the rows it holds."""
    if not isinstance(t, DTensor):
        t[index] = value
        return
    local, start = t.to_local(), _row_block(t)
    index = torch.arange(t.shape[0], device=local.device)[index]   # a slice -> its row numbers
    mine = (index >= start) & (index < start + local.shape[0])
    local[index[mine] - start] = value[mine] if torch.is_tensor(value) else value


class ShardedLayer(SRLoRALinear):
    """What shard_basis() puts in front of an SRLoRALinear's class: recycle() and clear_slots() on
    this rank's rows.  B's rows, U's rows and W's rows are the same rows of the layer's output."""
    sharded = True

    @torch.no_grad()
    def recycle(self, slots: torch.Tensor) -> dict:
        """srlora.SRLoRALinear.recycle, Eq. (9)-(12), on this rank's rows."""
        k, p, s = slots.numel(), self.next_index, self.scaling
        if p + k > self.r_target:
            return None
        fused_out = self.active_indices[slots].clone()
        cols = torch.arange(p - self.r, p - self.r + k, device=self.S.device)
        B, U = _local(self.lora_B), _local(self.U)                                 # this rank's rows
        B_out, A_out = B[:, slots].clone(), _rows(self.lora_A, slots)              # Eq. (9)
        sqrt_S = (self.S[cols].to(A_out.dtype) / s).sqrt()
        B_in = U[:, cols] * sqrt_S                                                  # Eq. (11)
        A_in = sqrt_S[:, None] * _rows(self.Vh, cols)                               # Eq. (11)
        B[:, slots] = B_in
        _set_rows(self.lora_A, slots, A_in)
        self._add_low_rank(_local(self.weight), torch.cat([B_out, B_in], 1), torch.cat([A_out, -A_in]))
        self.active_indices[slots] = torch.arange(p, p + k, device=slots.device)
        self.next_index = p + k
        return {"slots": slots, "fused_out": fused_out, "brought_in": list(range(p, p + k))}

    def _error_for(self, W: torch.Tensor) -> torch.Tensor:
        return _local(self.weight_error)             # srlora_precision: the error rows of this rank's W

    @torch.no_grad()
    def clear_slots(self, slots, A_like=(), B_like=()):
        for t in A_like:
            _set_rows(t, slots, 0)                   # rows of A: spread over the ranks
        for t in B_like:
            _local(t)[:, slots] = 0                  # columns of B: every rank its own rows

    def merged(self):
        raise ValueError(f"merge_srlora: {self.shard_name}.weight is sharded with fully_shard; merge an unsharded "
                         f"copy: load get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) "
                         f"into the model as it was before fully_shard and merge that")


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
    """Call after fully_shard: give every SRLoRALinear the sharded recycle() (ShardedLayer) and cut
    its buffers U and Vh (and weight_error, if srlora_precision.compensate ran) into the row blocks
    in which fully_shard cut its weight.  No communication: every rank holds the whole buffers and
    keeps its own rows.  Returns model, modified in place."""
    for name, layer in srlora_layers(model):
        if not isinstance(layer.weight, DTensor):
            raise ValueError(f"{name}.weight is not sharded; call shard_basis(model) after fully_shard(model)")
        mesh = layer.weight.device_mesh
        for key in ("U", "Vh", "weight_error"):
            t = getattr(layer, key, None)
            if t is None or isinstance(t, DTensor):
                continue
            size = -(-t.shape[0] // mesh.size())                             # torch.chunk's block size, as FSDP2's
            start = min(mesh.get_local_rank() * size, t.shape[0])
            local = t[start:start + size].clone()                            # a copy: the whole t can be freed
            setattr(layer, key, DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                   shape=t.shape, stride=t.stride()))
        extend_layer(layer, ShardedLayer, "Sharded")
        layer.shard_name = name
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
