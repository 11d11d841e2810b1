"""The paper's targets on a timm ViT and a GPT-2 (transformers Conv1D): wrap, compare, merge.

    python examples/targets.py

Needs timm and transformers.  Tiny models built from configs with random weights stand in for
pretrained ones.  docs/HUGGINGFACE.md's recipe.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root, when srlora is not installed

import copy

import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import GPT2Config, GPT2LMHeadModel
from srlora import PAPER_TARGETS, apply_srlora, merge_srlora, srlora_layers

torch.manual_seed(0)
# timm: Q, K, V are one map (qkv); "attn.proj", because "proj" alone also matches the Conv2d patch_embed.proj
vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10).eval()
x = torch.randn(2, 3, 32, 32)
before = vit(x)
apply_srlora(vit, targets=PAPER_TARGETS["timm-vit"], r=8, r_target=32)
vit.head.requires_grad_(True)                                    # apply_srlora froze everything but the adapters
print(f"timm: {len(srlora_layers(vit))} layers, {sum(p.numel() for p in vit.parameters() if p.requires_grad)} "
      f"trainable, max |change| {(vit(x) - before).abs().max().item():.0e}")

# GPT-2: Conv1D stores W as (in, out); SRLoRA adapts its transpose and merges back to a Conv1D
base = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)).eval()
gpt2 = apply_srlora(copy.deepcopy(base), targets=PAPER_TARGETS["gpt2"], r=8, r_target=32)
ids = torch.randint(0, 128, (1, 16))
with torch.no_grad():
    print(f"gpt2: {len(srlora_layers(gpt2))} layers, max |change| "
          f"{(gpt2(ids).logits - base(ids).logits).abs().max().item():.0e}")
    merge_srlora(gpt2)
    print(f"merged: {gpt2.transformer.h[0].attn.c_attn}, max |change| "
          f"{(gpt2(ids).logits - base(ids).logits).abs().max().item():.0e}")
try:                                                             # lm_head shares its weight with wte
    apply_srlora(copy.deepcopy(base), targets=["c_attn", "lm_head"])
except ValueError as error:
    print(f"ValueError: {error}")
