"""SRLoRA inside Hugging Face's Trainer, then save and reload: docs/HUGGINGFACE.md's recipe.

    python examples/hf_trainer.py

Needs transformers (and accelerate, which its Trainer imports).  A tiny Llama built from a config
with random weights stands in for from_pretrained; writes into runs/hf_trainer/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root, when srlora is not installed

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from srlora import PAPER_TARGETS, apply_srlora
from srlora_hf import SRLoRACallback

torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
# apply_srlora freezes everything but the adapters (lora_A, lora_B): the Trainer trains those alone
model = apply_srlora(LlamaForCausalLM(config), targets=PAPER_TARGETS["llama"], r=4, r_target=8, gamma=0.5)
ds = [{"input_ids": x, "labels": x} for x in torch.randint(0, 256, (64, 16))]
args = TrainingArguments("runs/hf_trainer", max_steps=8, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                         learning_rate=1e-3, save_steps=4, logging_steps=4, report_to=[], disable_tqdm=True,
                         dataloader_pin_memory=False)
trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SRLoRACallback()])
trainer.train()            # after a crash: trainer.train(resume_from_checkpoint=True) makes the same switches

# save_pretrained writes W, A, B, the unused basis and next_index: load it into a model wrapped the same way
model.save_pretrained("runs/hf_trainer/final")
fresh = LlamaForCausalLM(config)                  # other random weights: the file replaces them all
fresh = apply_srlora(fresh, targets=PAPER_TARGETS["llama"], r=4, r_target=8, gamma=0.5)
fresh.load_state_dict(load_file("runs/hf_trainer/final/model.safetensors"))
ids = torch.randint(0, 256, (1, 16))
model.eval()
fresh.eval()
with torch.no_grad():
    print(f"reloaded: max |logit difference| {(fresh(ids).logits - model(ids).logits).abs().max().item():.1e}")
