"""Ship a trained SRLoRA model: merged weights for a plain model, or a LoRA adapter that PEFT loads.

    python examples/peft_export.py

Needs transformers, peft and safetensors.  A tiny BERT built from a config with random weights
stands in for from_pretrained; writes into runs/peft_export/.  docs/HUGGINGFACE.md's recipe.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root, when srlora is not installed

import copy
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification
from srlora import PAPER_TARGETS, ImportanceTracker, apply_srlora, recompose
from srlora_export import export_lora_adapter, export_merged

torch.manual_seed(0)
config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, num_labels=2)
base = BertForSequenceClassification(config).eval()              # or .from_pretrained("bert-base-uncased")
model = apply_srlora(copy.deepcopy(base), targets=PAPER_TARGETS["bert"], r=8, r_target=16)  # keep base: it holds W0
model.classifier.requires_grad_(True)                            # apply_srlora froze all but the adapters
tracker = ImportanceTracker(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
ids, y = torch.randint(0, 128, (8, 16)), torch.randint(0, 2, (8,))
for step in range(2):                                            # stand-in for training: two steps, one switch
    model(input_ids=ids, labels=y).loss.backward()
    tracker.update()
    opt.step()
    opt.zero_grad()
recompose(model, tracker, opt)
model.eval()

# 1. merged weights: the keys of the model before apply_srlora, for a plain BERT
Path("runs/peft_export").mkdir(parents=True, exist_ok=True)
path = export_merged(model, "runs/peft_export/merged")           # writes merged.safetensors
plain = BertForSequenceClassification(config)
plain.load_state_dict(load_file(path), strict=True)
# 2. W_final - W0 of every adapted layer as a standard LoRA adapter, the trained head as modules_to_save
report = export_lora_adapter(model, "runs/peft_export/adapter", base)
loaded = PeftModel.from_pretrained(copy.deepcopy(base), "runs/peft_export/adapter").eval()
with torch.no_grad():
    want = model(input_ids=ids).logits
    print(f"merged: max |logit difference| {(plain.eval()(input_ids=ids).logits - want).abs().max().item():.0e}")
    print(f"adapter: rank {max(report['rank'].values())} per layer (r=8), "
          f"max |logit difference| {(loaded(input_ids=ids).logits - want).abs().max().item():.0e}")
