"""SRLoRA inside Hugging Face's Trainer, then the adapter saved and loaded: docs/HUGGINGFACE.md's recipe.

    python examples/hf_trainer.py

Needs transformers (and accelerate, which its Trainer imports).  A tiny Llama built from a config
with random weights, saved to runs/hf_trainer/base, stands in for a Hub model; writes into runs/hf_trainer/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root, when srlora is not installed

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from srlora_hf import SRLoRACallback, apply_srlora, from_pretrained

torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
LlamaForCausalLM(config).save_pretrained("runs/hf_trainer/base")       # stands in for a Hub model
# the paper's targets for this model_type (srlora_hf.targets_for); all but the adapters frozen
model = apply_srlora(AutoModelForCausalLM.from_pretrained("runs/hf_trainer/base"), r=4, r_target=8, gamma=0.5)
ds = [{"input_ids": x, "labels": x} for x in torch.randint(0, 256, (64, 16))]
args = TrainingArguments("runs/hf_trainer", max_steps=8, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                         learning_rate=1e-3, save_steps=4, logging_steps=4, report_to=[], disable_tqdm=True,
                         dataloader_pin_memory=False)
trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SRLoRACallback()])
trainer.train()            # after a crash: trainer.train(resume_from_checkpoint=True) makes the same switches

# save_pretrained writes the adapter: A, B, the indices and the pairs the switches fused into W
model.save_pretrained("runs/hf_trainer/adapter")
fresh = from_pretrained("runs/hf_trainer/base", "runs/hf_trainer/adapter")   # replays the switches onto W
ids = torch.randint(0, 256, (1, 16))
model.eval()
with torch.no_grad():
    print(f"reloaded: max |logit difference| {(fresh(ids).logits - model(ids).logits).abs().max().item():.1e}")
size = lambda folder: sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
print(f"adapter: {size('runs/hf_trainer/adapter')} bytes, the model: {size('runs/hf_trainer/base')} bytes")
try:                       # transformers refuses the folder, naming the loader, rather than load it wrong
    AutoModelForCausalLM.from_pretrained("runs/hf_trainer/adapter")
except ValueError as error:
    print(f"AutoModelForCausalLM refuses it: {str(error).split('`')[1]}")
