"""Alternative switch rules for SRLoRA, beside the paper's; each default reproduces srlora.py.

The results (docs/RESULTS.md) found none of them better than the paper's rule on real data; they
are kept so that the comparison can be rerun.  They reach srlora.recompose() through its two
hooks, `select` (which slots a switch recycles) and `layers` (which layers switch):

    rule = SlotRule(score="relative", grace=1)        # which slots
    recompose(model, tracker, optimizer, select=rule)
    steps = switch_steps_within(total_steps, r, r_target, gamma, stop=0.8)       # when, for all layers
    schedule = AdaptiveSchedule(total_steps, r, r_target, gamma, rule=rule)      # when, per layer
    recompose(model, tracker, optimizer, layers=schedule.due(step, tracker), select=rule)
"""
import math

import torch

from srlora import ImportanceTracker, SRLoRALinear, n_recycle, switch_steps


def pair_norms(layer: SRLoRALinear) -> torch.Tensor:
    """|B_k| |A_k| for the r pairs, shape (r,): sigma_k / scaling when pair k was filled."""
    norms = layer.lora_B.norm(dim=0) * layer.lora_A.norm(dim=1)
    return norms.full_tensor() if hasattr(norms, "full_tensor") else norms      # sharded: whole on every rank


class SlotRule:
    """select(tracker, layer, k) for recompose(): the k eligible slots with the lowest score.

    score="paper" ranks by Eq. (7).  "relative" ranks by Eq. (7) / (|B_k| |A_k|)^2: each I of
    Eq. (3) is |w * dL/dw|, which for pair k is proportional to |B_k| |A_k|, so Eq. (6)-(7) grow as
    its square and a slot filled from a large singular value outscores a small one for that alone.
    grace=g: a slot refilled at one of the layer's last g switches is not eligible.
    """

    def __init__(self, score: str = "paper", grace: int = 0):
        if score not in ("paper", "relative"):
            raise ValueError(f"score={score!r} is unknown; use 'paper' (Eq. 7) or 'relative'")
        if not (isinstance(grace, int) and grace >= 0):
            raise ValueError(f"grace={grace!r} must be an integer >= 0 (0: the paper's rule)")
        self.score, self.grace = score, grace

    def ranked(self, tracker: ImportanceTracker, layer: SRLoRALinear) -> torch.Tensor:
        """The (r,) scores the rule ranks by."""
        scores = tracker.pair_scores(layer)
        if self.score == "relative":
            size = pair_norms(layer)
            scores = scores / size.square().clamp_min(torch.finfo(size.dtype).tiny)
        return scores

    def scores(self, tracker: ImportanceTracker, layer: SRLoRALinear, k: int) -> torch.Tensor:
        """ranked(), with +inf for the slots a switch may not recycle."""
        return self.ranked(tracker, layer).masked_fill(~self.eligible(layer, k), math.inf)

    def check(self, r: int, k: int) -> None:
        """A layer of rank r that recycles k slots per switch must keep k eligible."""
        if (self.grace + 1) * k > r:
            raise ValueError(f"grace={self.grace} with r'={k} of r={r} leaves fewer than r' slots to "
                             f"recycle; use grace in 0 .. {r // k - 1} or a smaller gamma")

    def eligible(self, layer: SRLoRALinear, k: int) -> torch.Tensor:
        """(r,) bool.  No extra state: direction p >= r came in at the layer's switch (p - r) // r',
        so a slot's age is read off active_indices, which checkpoints hold."""
        self.check(layer.r, k)
        p = layer.active_indices
        return (p < layer.r) | (layer.next_index - p > self.grace * k)

    def __call__(self, tracker: ImportanceTracker, layer: SRLoRALinear, k: int) -> torch.Tensor:
        return self.scores(tracker, layer, k).topk(k, largest=False).indices


def switch_steps_within(total_steps: int, r: int, r_target: int, gamma: float, stop: float = 1.0) -> list:
    """The N_switch switches of Eq. (13)-(14), spread over the first round(stop * total_steps)
    steps, so that the last directions brought in still train for the rest of the run.
    stop=1.0 is the paper's schedule, whose last switch falls at the end of training."""
    if not 0.0 < stop <= 1.0:
        raise ValueError(f"stop={stop} is outside (0, 1]; it is the fraction of the steps within "
                         f"which all switches fall, e.g. stop=0.8 (1.0 is the paper's schedule)")
    return switch_steps(round(stop * total_steps), r, r_target, gamma)


class AdaptiveSchedule:
    """When each layer switches, decided from its own pair scores (the paper's future work).

    Every `every` steps, a layer switches if (a) min_interval steps or more have passed since its
    last switch (or the start), (b) it has r' unused directions left, and (c) the lowest score among
    its eligible slots, the one recompose() would recycle first, is below `ratio` times the mean of
    its r scores: one pair has fallen well behind.  No switch after round(stop * total_steps).
    min_interval defaults to half the fixed schedule's interval, and a layer stops at r_target, so
    no layer visits more directions than the fixed schedule brings in.  A decision reads only the
    EMAs, the layer's buffers and the step, so every DDP / FSDP rank decides the same.
    Resume: save state_dict() (each layer's last switch step) with the tracker.
    """

    def __init__(self, total_steps: int, r: int, r_target: int, gamma: float = 0.5, ratio: float = 0.1,
                 every: int = 10, min_interval: int = None, stop: float = 1.0, rule: SlotRule = None):
        if not (0.0 < ratio <= 1.0 and isinstance(every, int) and every >= 1):
            raise ValueError(f"ratio={ratio}, every={every}: use a ratio in (0, 1] (e.g. 0.1) and every >= 1")
        fixed = switch_steps_within(total_steps, r, r_target, gamma, stop)
        self.min_interval = min_interval or max(1, (fixed[0] if fixed else total_steps) // 2)
        self.horizon = round(stop * total_steps)
        self.gamma, self.ratio, self.every, self.rule = gamma, ratio, every, rule or SlotRule()
        self.last = {}                          # layer name -> step of its last switch; absent: 0

    @torch.no_grad()
    def due(self, step: int, tracker: ImportanceTracker) -> list:
        """Names of the layers that switch after optimizer step `step`; records them as switched."""
        if step % self.every or step > self.horizon:
            return []
        names, fire = [], []
        for name, layer in zip(tracker.names, tracker.layers):
            k = n_recycle(layer.r, self.gamma)
            if step - self.last.get(name, 0) < self.min_interval or layer.next_index + k > layer.r_target:
                continue
            scores = self.rule.ranked(tracker, layer)
            lowest = scores.masked_fill(~self.rule.eligible(layer, k), math.inf).min()
            names.append(name)
            fire.append(lowest < self.ratio * scores.mean())
        due = [name for name, f in zip(names, torch.stack(fire).tolist() if fire else []) if f]  # one host sync
        self.last.update({name: step for name in due})
        return due

    def state_dict(self) -> dict:
        return {"last": dict(self.last)}

    def load_state_dict(self, state: dict):
        self.last = dict(state["last"])
