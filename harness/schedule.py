"""What each step sees, reproducibly: the seeded data order (Batches), the RNG state that a
checkpoint saves and restores, and the learning-rate schedule with its warm-up warning."""
import math
import random

import numpy as np
import torch

from harness.errors import UserError


class Batches:
    """Seeded epochs over n examples: each epoch a fresh permutation cut into full batches
    (the tail that does not fill a batch is dropped).  Its state is the position in that order."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise UserError(f"the training set has {n} examples, fewer than --batch_size={batch_size}; "
                            f"use a smaller batch")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = None

    def _order(self):
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def next(self) -> list:
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        batch = self._order()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self._perm = state["epoch"], state["pos"], None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(cfg):
    """Linear warm-up over cfg.warmup steps, then linear or cosine decay to 0 at cfg.max_steps."""
    warmup, total = cfg.warmup, cfg.max_steps

    def factor(step):                                  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1 - progress)
    return factor


def warmup_warning(cfg):
    """The warning for a warm-up that is not shorter than the run, or None.

    The warm-up is kept as given, not scaled with max_steps: a preset's value is the paper's, and a
    flag that silently changed meaning with another flag would make runs hard to compare.
    """
    if cfg.warmup < cfg.max_steps:
        return None
    peak = cfg.max_steps / cfg.warmup                  # lr_lambda at the last step, max_steps - 1
    return (f"warning: --warmup={cfg.warmup} is not shorter than the {cfg.max_steps} steps of this run, so "
            f"the learning rate peaks at {peak:.0%} of --lr={cfg.lr:g}; pass a shorter --warmup, "
            f"e.g. --warmup={max(1, cfg.max_steps // 10)}")
