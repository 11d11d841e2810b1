"""SRLoRA on a Llama-class model sharded with FSDP2: docs/FSDP.md's recipe, on a tiny random Llama.

    torchrun --nproc_per_node=2 examples/fsdp_llama.py

Run so far on CPU with gloo only, never on GPUs.  Checkpoints go to runs/fsdp_llama/; a second run
resumes from them (and, with all steps done, has nothing left to do).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root, when srlora is not installed

import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import transformers
from srlora import PAPER_TARGETS, ImportanceTracker, apply_srlora, recompose, switch_steps
from srlora_fsdp import load_checkpoint, save_checkpoint, shard_basis, spread_factors

CKPT = "runs/fsdp_llama/ckpt"
dist.init_process_group("gloo")                       # "nccl" on GPUs (untested)
torch.manual_seed(0)                                  # every rank must start from the same weights
config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(config)         # in place of AutoModelForCausalLM.from_pretrained(...)
total_steps, r, r_target, gamma = 16, 8, 32, 0.5

# 1. SRLoRA on the whole model, before sharding; each weight's SVD on one rank only.
#    apply_srlora freezes everything but the adapters (lora_A, lora_B)
model = apply_srlora(model, targets=PAPER_TARGETS["llama"], r=r, r_target=r_target, gamma=gamma,
                     decompose=spread_factors)
# 2. FSDP2: one unit per decoder layer, then the rest; the SVD basis cut like the weights
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
shard_basis(model)
# 3. tracker and optimizer after fully_shard: they must hold the sharded parameters
tracker = ImportanceTracker(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
switches = set(switch_steps(total_steps, r, r_target, gamma))
start = load_checkpoint(CKPT, model, optimizer, tracker) if os.path.exists(CKPT) else 0
g = torch.Generator().manual_seed(dist.get_rank())
for step in range(start + 1, total_steps + 1):
    ids = torch.randint(0, 64, (4, 16), generator=g)     # this rank's share of the batch
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    tracker.update()                                  # after backward, before the optimizer moves the weights
    optimizer.step()
    optimizer.zero_grad()
    if step in switches:
        recompose(model, tracker, optimizer)          # gamma from the config; each rank its own rows
    if step % 8 == 0:
        save_checkpoint(CKPT, model, optimizer, tracker, step)     # every rank writes its shards
    if dist.get_rank() == 0 and step == total_steps:
        print(f"step {step}: loss {loss.item():.4f}, switches at {sorted(switches)}")
dist.destroy_process_group()
