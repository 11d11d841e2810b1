"""The alternative switch rules of srlora_switch.py, on the quickstart's model: docs/CHOICES.md's recipe.

    python examples/switch_rules.py

Torch only; a few seconds on one CPU thread.  docs/RESULTS.md found none of these better than the
paper's rule on real data; they are here so that the comparison can be rerun.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root, when srlora is not installed

import torch
import torch.nn as nn
from srlora import ImportanceTracker, apply_srlora, recompose
from srlora_switch import AdaptiveSchedule, SlotRule, switch_steps_within


def train(schedule=None, switches=(), rule=None, total_steps=200):
    """The quickstart's loop; returns the final loss and the number of layer switches."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(64, 128))
    model.add_module("act", nn.Tanh())
    model.add_module("down", nn.Linear(128, 16))
    target = nn.Linear(64, 16)
    apply_srlora(model, targets=["up", "down"], r=8, alpha=8, r_target=32, gamma=0.5)  # freezes all but the adapters
    tracker = ImportanceTracker(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    n_switches = 0
    for step in range(1, total_steps + 1):
        x = torch.randn(32, 64)
        loss = nn.functional.mse_loss(model(x), target(x).detach())
        loss.backward()
        tracker.update()
        opt.step()
        opt.zero_grad()
        if schedule is not None:                 # each layer decides: names of the layers due now
            n_switches += len(recompose(model, tracker, opt, layers=schedule.due(step, tracker), select=rule))
        elif step in switches:
            n_switches += len(recompose(model, tracker, opt, select=rule))
    return loss.item(), n_switches


total_steps, r, r_target, gamma = 200, 8, 32, 0.5
# which slots a switch recycles: Eq. (7) / (|B_k| |A_k|)^2, and none refilled at the layer's last switch
rule = SlotRule(score="relative", grace=1)
# when: the paper's N switches, all within the first 80% of the steps
early = switch_steps_within(total_steps, r, r_target, gamma, stop=0.8)
# or per layer: when its weakest pair scores below 0.5 x the layer's mean, checked every 10 steps
# (rule=SlotRule(...) would rank by that rule here too; the default is the paper's Eq. 7)
schedule = AdaptiveSchedule(total_steps, r, r_target, gamma, ratio=0.5, every=10)

paper = switch_steps_within(total_steps, r, r_target, gamma)          # stop=1.0: srlora.switch_steps
for name, kwargs in [("paper's rule and steps", dict(switches=paper)),
                     ("relative score, grace 1", dict(switches=paper, rule=rule)),
                     ("within the first 80%", dict(switches=early)),
                     ("adaptive, per layer", dict(schedule=schedule))]:
    loss, n = train(**kwargs)
    print(f"{name}: loss {loss:.4f}, {n} layer switches")
print(f"switch steps: paper {paper}, within 80% {early}")
