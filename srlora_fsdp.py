"""SRLoRA on models sharded with PyTorch FSDP2 (torch.distributed.fsdp.fully_shard).

ImportanceTracker.update(), recompose() and their helpers in srlora.py already work on sharded
parameters: each rank updates and recycles its own rows of W, B and the EMAs, and reads the few
rows of A and Vh it needs from their holders (see "How to touch a possibly sharded tensor" there).
The user code is the same as in one process:

    model = apply_srlora(model, targets=..., r=8, r_target=64)      # before sharding
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
save_checkpoint / load_checkpoint write and read every rank's shards with torch.distributed.checkpoint.
"""
import torch
from torch.distributed.tensor import DTensor, Shard

from srlora import srlora_layers


@torch.no_grad()
def shard_basis(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every SRLoRALinear's buffers U and Vh by DTensors cut into the row blocks in which
    fully_shard cut its weight; call it after fully_shard.  No communication: every rank holds the
    whole basis and keeps its own rows.  Returns model, modified in place."""
    for name, layer in srlora_layers(model):
        if not isinstance(layer.weight, DTensor):
            raise ValueError(f"{name}.weight is not sharded; call shard_basis(model) after fully_shard(model)")
        mesh = layer.weight.device_mesh
        for key in ("U", "Vh"):
            t = getattr(layer, key)
            if isinstance(t, DTensor):
                continue
            size = -(-t.shape[0] // mesh.size())                             # torch.chunk's block size, as FSDP2's
            start = min(mesh.get_local_rank() * size, t.shape[0])
            local = t[start:start + size].clone()                            # a copy: the whole t can be freed
            setattr(layer, key, DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                   shape=t.shape, stride=t.stride()))
    return model


def save_checkpoint(checkpoint_id, model: torch.nn.Module, optimizer, tracker, step: int) -> None:
    """Write model, optimizer, tracker and step with torch.distributed.checkpoint: every rank writes
    its own shards (W, A, B, the basis after shard_basis, moments, EMAs) into the folder checkpoint_id."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "tracker": tracker.state_dict(), "step": step},
             checkpoint_id=checkpoint_id)


def load_checkpoint(checkpoint_id, model: torch.nn.Module, optimizer, tracker) -> int:
    """Read what save_checkpoint wrote into a model sharded (and shard_basis'd) as the saved one, its
    optimizer and a fresh ImportanceTracker; each rank reads its own shards.  Returns the saved step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "tracker": tracker.state_dict(), "step": 0}
    dcp.load(state, checkpoint_id=checkpoint_id)                 # in place, into these tensors
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    tracker.load_state_dict(state["tracker"])                  # the EMAs came in place; this sets beta1, beta2
    return state["step"]
