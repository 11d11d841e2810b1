"""SRLoRA under PyTorch FSDP2 (fully_shard) on CPU with gloo: two ranks against one process.

Each run trains the same small model from the same seed on the same batches; the two ranks each
take half of every batch, so their averaged gradients are the one process's.  Switches, losses and
final effective weights must agree.  The layers have odd sizes, so the ranks hold unequal row blocks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from srlora import ImportanceTracker, apply_srlora, recompose, srlora_layers, switch_steps

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")

D, STEPS, R, R_TARGET, GAMMA = 11, 12, 3, 9, 0.5    # r' = 2: three switches, at steps 4, 8 and 12


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d + 1), nn.Linear(2 * d + 1, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(STEPS, 8, D, generator=g)                          # 8 examples per step
    return X, (X[..., 0] > 0).long() + (X[..., 1] > 0.5).long()


def train(rank=0, world=1, basis=False, moments="reset"):
    """The run; with world > 1 under FSDP2 and every rank on its half of each batch.
    Returns (events, losses, effective weights, bytes of W + basis held by this rank)."""
    torch.manual_seed(0)
    model = apply_srlora(Net(), targets=("up", "down"), r=R, r_target=R_TARGET, gamma=GAMMA)
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        from srlora_fsdp import shard_basis
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        if basis:
            shard_basis(model)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    held = sum(local(t).numel() * t.element_size() for _, l in srlora_layers(model)
               for t in (l.weight, l.U, l.S, l.Vh))
    tracker = ImportanceTracker(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    switches = switch_steps(STEPS, R, R_TARGET, GAMMA)
    X, Y = data()
    events, losses = [], []
    for step in range(1, STEPS + 1):
        x, y = X[step - 1].chunk(world)[rank], Y[step - 1].chunk(world)[rank]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        tracker.update()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        if step in switches:
            events.append(recompose(model, tracker, GAMMA, optimizer=optimizer, moments=moments))
    with torch.no_grad():
        weights = {name: l.effective_weight() for name, l in srlora_layers(model)}
        weights = {name: w.full_tensor() if hasattr(w, "full_tensor") else w for name, w in weights.items()}
    return events, losses, weights, held


def _rank(rank, world, init_file, out, basis, moments):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(train(rank, world, basis, moments), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def two_ranks(tmp_path, basis, moments="reset"):
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), out, basis, moments), nprocs=2)
    return [torch.load(f"{out}.{rank}") for rank in range(2)]


def close(a, b, rel=1e-5):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("basis,moments", [(False, "reset"), (True, "keep")])
def test_two_fsdp_ranks_switch_train_and_end_like_one_process(tmp_path, basis, moments):
    events, losses, weights, held_one = train(moments=moments)
    ranks = two_ranks(tmp_path, basis, moments)
    assert len(events) == 3 and all(len(e) == 4 for e in events)      # every layer switched each time
    for r_events, r_losses, r_weights, _ in ranks:
        assert r_events == events                                    # the same slots, fused out and brought in
        assert all(close(a, b) for a, b in zip(r_losses, losses)), (r_losses, losses)
        for name, w in weights.items():
            torch.testing.assert_close(r_weights[name], w, rtol=1e-5, atol=1e-6)
    held = [h for *_, h in ranks]
    if basis:        # W, U and Vh cut in two (the odd row to rank 0); S, (r_target - r) numbers, kept on both
        S_bytes = 4 * (R_TARGET - R) * torch.float32.itemsize               # 4 layers
        assert sum(held) == held_one + S_bytes and max(held) <= 0.6 * held_one
