"""SRLoRA in a hand-written training loop, on a small pure-torch model: the README's recipe.

    python examples/quickstart.py

Torch only; a few seconds on one CPU thread.  A frozen two-layer network (standing in for a
pretrained one) learns a changed target; its two linear maps carry SRLoRA adapters.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root, when srlora is not installed

import torch
import torch.nn as nn
from srlora import ImportanceTracker, SRLoRALinear, apply_srlora, merge_srlora, recompose, switch_steps

torch.manual_seed(0)

# one layer: same outputs as the nn.Linear it wraps, until training moves A and B
linear = nn.Linear(64, 64)
layer = SRLoRALinear(linear, r=8, alpha=8, r_target=32)
x = torch.randn(4, 64)
print(f"one layer, wrapped: max |change| {(layer(x) - linear(x)).abs().max().item():.0e}")

# a whole model: apply_srlora wraps every nn.Linear whose name ends with a target and freezes
# everything but the adapters (lora_A, lora_B); unfreeze a new head yourself
model = nn.Sequential()
model.add_module("up", nn.Linear(64, 128))
model.add_module("act", nn.Tanh())
model.add_module("down", nn.Linear(128, 16))
target = nn.Linear(64, 16)                                           # the task: y = target(x)
total_steps = 200
model = apply_srlora(model, targets=["up", "down"], r=8, alpha=8, r_target=32, gamma=0.5)  # SRLoRA
tracker = ImportanceTracker(model)                                                         # SRLoRA
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
switches = set(switch_steps(total_steps, r=8, r_target=32, gamma=0.5))   # Eq. (13)-(14): 6 switches
for step in range(1, total_steps + 1):
    x = torch.randn(32, 64)
    loss = nn.functional.mse_loss(model(x), target(x).detach())
    loss.backward()
    tracker.update()            # Eq. (3)-(5): after backward, before the optimizer moves w   # SRLoRA
    opt.step()
    opt.zero_grad()
    if step == 1:
        print(f"step 1: loss {loss.item():.4f}")
    if step in switches:        # Eq. (8)-(12): fuse the weakest pairs into W, refill them   # SRLoRA
        recompose(model, tracker, opt)
print(f"step {step}: loss {loss.item():.4f}, switches at {sorted(switches)}")
print(f"singular directions visited: up {model.up.next_index}, down {model.down.next_index} (r_target is "
      f"clamped to min(out, in) = 16)")

# back to plain nn.Linear layers holding W + scaling * B A
with torch.no_grad():
    x = torch.randn(8, 64)
    before = model(x)
    merge_srlora(model)
    print(f"merged: {type(model.up).__name__}, max |change| {(model(x) - before).abs().max().item():.0e}")
