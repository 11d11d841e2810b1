"""What train_glue.py and train_vit.py share: errors, weights files, flags, the run folder,
the training loop for LoRA / PiSSA / SRLoRA, checkpoints, the results table and the plots.
Several processes (DDP, FSDP2) go through parallel.py."""
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import parallel
from srlora import (AdaptiveSchedule, ImportanceTracker, apply_srlora, check_grace, n_recycle, recompose,
                    srlora_layers, switch_steps)


class UserError(Exception):
    """Bad input from the user: the scripts print its one-line message and exit with code 2."""


class NonFiniteError(UserError):
    """A non-finite loss or gradient: the run stops before that step touches the weights (exit 3)."""


# --- weights files --------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    """A .safetensors file: 8 bytes little-endian header length, a JSON header, raw tensor bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise UserError(f"{path}: corrupt safetensors file (header length {n} exceeds the file size)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path}: corrupt safetensors file (its header is not JSON)") from None
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        start, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if dtype is None or end > len(data) or end - start != numel * dtype.itemsize:
            raise UserError(f"{path}: corrupt safetensors file (tensor {name!r} is truncated or of unknown dtype)")
        raw = bytearray(data[start:end])
        tensors[name] = (torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)).reshape(info["shape"])
    return tensors


def read_weights(path) -> dict:
    """A state dict from .safetensors, or from a torch .pth / .bin / .pt file."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist; pass an existing .safetensors, .pth or .bin file")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read it as a torch checkpoint ({type(e).__name__}); the file is corrupt or not a state dict") from None
    for key in ("state_dict", "model"):                    # common wrappers around the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def fail(message: str, code: int = 2):
    """Print one line to stderr and exit: no traceback for bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# --- config and flags -----------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Settings both scripts share; every field is also a --flag.  The scripts subclass it."""
    method: str = ""                  # one method; when set it overrides `methods`
    methods: str = "lora,pissa,srlora"  # run in turn, same seed and data order: a side-by-side comparison
    targets: str = ""                 # comma-separated nn.Linear name suffixes; the scripts set a default
    r: int = 8                        # the paper's rank
    alpha: float = 8.0                # the paper's alpha (scaling = alpha / r = 1)
    r_target: int = 32                # directions a layer may visit (SRLoRA); the paper's Fig. 4/5 use 32
    gamma: float = 0.5                # fusion ratio, the paper's value
    beta1: float = 0.85               # importance EMA (Eq. 4), the paper's value
    beta2: float = 0.85               # uncertainty EMA (Eq. 5), the paper's value
    reset: str = "recycled"           # importance reset at a switch: recycled (Alg. 1) or all (Sec. 3.1)
    moments: str = "keep"             # AdamW exp_avg_sq of recycled slots: keep or reset (see srlora.recompose)
    score: str = "paper"              # slot ranking: paper (Eq. 7) or relative (Eq. 7 / (|B_k| |A_k|)^2); see srlora.SRLoRAConfig
    grace: int = 0                    # a refilled slot is not recycled at its layer's next `grace` switches
    switch_stop: float = 1.0          # all switches within the first switch_stop of the steps (1.0: the paper's schedule)
    switch_schedule: str = "fixed"    # fixed (Eq. 13-14) or adaptive (srlora.AdaptiveSchedule, per layer)
    adapt_ratio: float = 0.1          # adaptive: switch when a layer's lowest score < adapt_ratio * its mean
    adapt_every: int = 10             # adaptive: steps between checks
    optimizer: str = "adamw"          # adamw (the paper's GLUE runs) or sgd (its ViT runs)
    lr: float = 1e-4
    head_lr: float = 0.0              # learning rate of the classifier head; 0 means lr
    weight_decay: float = 0.0         # the paper uses none
    momentum: float = 0.9             # sgd only
    schedule: str = "linear"          # after warm-up: linear decay to 0 (GLUE) or cosine (ViT)
    warmup: int = 500                 # the paper's warm-up steps; not scaled with --max_steps: a run no longer than it warns
    max_steps: int = 0                # optimizer steps; the scripts compute it (steps_for)
    batch_size: int = 16              # examples per optimizer step, over all grad_accum micro-batches and ranks
    grad_accum: int = 1               # micro-batches per optimizer step
    eval_every: int = 500             # the paper evaluates every 500 steps
    save_every: int = 0               # checkpoint cadence; 0 means eval_every
    log_every: int = 10               # steps per log record and progress line
    seed: int = 0
    out_dir: str = "runs"
    name: str = ""                    # run folder under out_dir; default <task>-<methods>-seed<seed>
    resume: str = ""                  # a run folder to continue (repeat the original flags)
    overwrite: bool = False           # replace an existing run folder
    device: str = "auto"              # auto: cuda when available
    amp: str = "off"                  # bf16: autocast (the paper's ViT runs used 16-bit mixed precision)
    residual_dtype: str = "model"     # dtype of the frozen W and basis: model (its own, fp32 here) or bfloat16
    plots: bool = True                # PNG plots, when matplotlib is installed
    fsdp: bool = False                # under torchrun: shard each block and the model with FSDP2 (parallel.py)


METHODS = ("lora", "pissa", "srlora")
# Settings that may differ when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = ("resume", "overwrite", "device", "plots", "log_every", "out_dir", "name")


def _parse_value(text: str, default, flag: str):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{flag}={text} is not a boolean; use --{flag}=true or --{flag}=false")
    try:
        return type(default)(text)
    except ValueError:
        raise UserError(f"--{flag}={text} is not a valid {type(default).__name__}") from None


def parse_config(cls, argv, presets: dict = None, preset_field: str = None):
    """nanoGPT-style flags (--field=value or --field value) over the fields of a config dataclass.

    When `presets` is given, presets[value of preset_field] is applied first and explicit flags win.
    """
    defaults = cls()
    names = {f.name for f in dataclasses.fields(cls)}
    given, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; flags look like --lr=1e-4")
        key, has_value, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in names:
            raise UserError(f"unknown flag --{key}; run with --help to list the flags")
        default = getattr(defaults, key)
        if not has_value:
            if isinstance(default, bool) and (not args or args[0].startswith("--")):
                text = "true"
            elif not args:
                raise UserError(f"--{key} needs a value")
            else:
                text = args.pop(0)
        given[key] = _parse_value(text, default, key)
    cfg = defaults
    if presets is not None:
        choice = given.get(preset_field, getattr(defaults, preset_field))
        cfg = dataclasses.replace(cfg, **presets.get(choice, {}))
    return dataclasses.replace(cfg, **given)


def field_comments(cls) -> dict:
    """{field: the comment on its line} for a config dataclass and its bases, read from the source."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2)
    return comments


def print_help(cls, doc: str = "", presets: dict = None, preset_field: str = None):
    """The script's docstring, every flag with its default and its comment, then the presets."""
    print(doc.strip() + "\n\nflags (--name=value), with their defaults:")
    comments, defaults = field_comments(cls), cls()
    for f in dataclasses.fields(cls):
        flag = f"--{f.name}={getattr(defaults, f.name)!r}"
        print(f"  {flag:<32} {comments.get(f.name, '')}".rstrip())
    if presets:
        print(f"\n--{preset_field} presets (applied first; explicit flags win):")
        for name, values in presets.items():
            print(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in values.items()) or "the defaults above"))


def cli(main):
    """Run main(argv); bad input becomes one line on stderr and exit code 2, with no traceback."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        module = sys.modules["__main__"]
        config = next(v for v in vars(module).values()
                      if isinstance(v, type) and issubclass(v, TrainConfig) and v is not TrainConfig)
        presets = getattr(module, "PRESETS", None)
        field = next((f.name for f in dataclasses.fields(config) if f.name in ("task", "preset")), None)
        print_help(config, module.__doc__ or "", presets, field)
        sys.exit(0)
    try:
        code = main(sys.argv[1:])
    except NonFiniteError as e:
        fail(str(e), code=3)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; continue with --resume <run folder> and the same flags", code=130)
    sys.exit(code or 0)


def steps_for(epochs: float, n_train: int, batch_size: int, max_steps: int = 0) -> int:
    """epochs * ceil(n_train / batch_size) optimizer steps, capped by max_steps when it is > 0."""
    steps = max(1, int(epochs * math.ceil(n_train / batch_size)))
    return min(steps, max_steps) if max_steps > 0 else steps


def check_config(cfg):
    methods = method_list(cfg)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown method {bad[0]!r}; use --method or --methods with {', '.join(METHODS)}")
    if cfg.r < 1:
        raise UserError(f"--r={cfg.r} must be at least 1")
    if cfg.r_target < cfg.r:
        raise UserError(f"--r_target={cfg.r_target} is smaller than --r={cfg.r}; use r_target >= r "
                        f"(r_target == r means PiSSA, no switches)")
    if not 0.0 < cfg.gamma <= 1.0:
        raise UserError(f"--gamma={cfg.gamma} is outside (0, 1]; it is the fraction of slots recycled per switch")
    for flag, value, allowed in (("optimizer", cfg.optimizer, ("adamw", "sgd")),
                                 ("schedule", cfg.schedule, ("linear", "cosine")),
                                 ("reset", cfg.reset, ("recycled", "all")),
                                 ("moments", cfg.moments, ("keep", "reset")),
                                 ("score", cfg.score, ("paper", "relative")),
                                 ("switch_schedule", cfg.switch_schedule, ("fixed", "adaptive")),
                                 ("amp", cfg.amp, ("off", "bf16")),
                                 ("residual_dtype", cfg.residual_dtype, ("model", "float32", "bfloat16"))):
        if value not in allowed:
            raise UserError(f"--{flag}={value} is unknown; use one of {', '.join(allowed)}")
    if not 0.0 < cfg.switch_stop <= 1.0 or not 0.0 < cfg.adapt_ratio <= 1.0 or cfg.adapt_every < 1:
        raise UserError(f"--switch_stop={cfg.switch_stop}, --adapt_ratio={cfg.adapt_ratio} and "
                        f"--adapt_every={cfg.adapt_every}: use values in (0, 1], (0, 1] and >= 1")
    try:
        check_grace(cfg.grace, n_recycle(cfg.r, cfg.gamma), cfg.r)
    except ValueError as e:
        raise UserError(f"--{e}") from None
    if cfg.max_steps < 1 or cfg.grad_accum < 1 or cfg.eval_every < 1 or cfg.log_every < 1:
        raise UserError("--max_steps, --grad_accum, --eval_every and --log_every must be at least 1")
    if not cfg.targets:
        raise UserError("--targets is empty; name the nn.Linear layers to adapt, e.g. --targets=query,value")


def method_list(cfg):
    return [cfg.method] if cfg.method else [m.strip() for m in cfg.methods.split(",") if m.strip()]


# --- the run folder -------------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`:
    a crash leaves either the previous file or the new one, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(obj, (str, bytes)):
                f.write(obj.encode() if isinstance(obj, str) else obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj, path):
    save_atomic(json.dumps(obj, indent=2) + "\n", path)


class Run:
    """runs/<name>/: config.json, log.jsonl, metrics.json, results.md, plots, ckpt/<method>/{last,best}.pt
    (with --fsdp: {last,best}/, sharded checkpoint folders).  Only rank 0 writes, but every rank
    writes its shards of a sharded checkpoint."""

    def __init__(self, cfg, task: str, writer: bool):
        self.writer = writer
        self.suffix = "" if cfg.fsdp else ".pt"           # a folder of shards, or one file
        self.methods = method_list(cfg)
        self.path = Path(cfg.resume) if cfg.resume else Path(cfg.out_dir) / (
            cfg.name or f"{task}-{'+'.join(self.methods)}-seed{cfg.seed}")
        self.config = {"task": task, **dataclasses.asdict(cfg)}
        # a flag added after a run started was at its default there: resuming that run is fine
        self.defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        self.done = []                                    # metrics of finished methods
        if cfg.resume:
            self._check_resume()
        elif (self.path / "config.json").exists() and not cfg.overwrite:
            state = "a finished run" if self._finished() else "an unfinished run"
            raise UserError(f"{self.path} already holds {state}; pass --overwrite to replace it, "
                            f"or --resume {self.path} to continue it")

    def _finished(self):
        try:
            return len(json.loads((self.path / "metrics.json").read_text())) == len(self.methods)
        except (OSError, ValueError):
            return False

    def _check_resume(self):
        if not (self.path / "config.json").exists():
            raise UserError(f"--resume {self.path}: no run there (no config.json); check the folder name")
        saved = json.loads((self.path / "config.json").read_text())
        diff = [k for k in self.config if k not in RESUMABLE_CHANGES
                and saved.get(k, self.defaults.get(k)) != self.config[k]]
        if diff:
            k = diff[0]
            raise UserError(f"--resume {self.path}: the checkpoint was made with {k}={saved.get(k)!r}, "
                            f"not {self.config[k]!r}; repeat the original flags")
        if (self.path / "metrics.json").exists():
            self.done = json.loads((self.path / "metrics.json").read_text())
        if not self.done and not list(self.path.glob(f"ckpt/*/last{self.suffix}")):
            raise UserError(f"--resume {self.path}: no checkpoint there yet; start it again with --overwrite")

    def start(self):
        if not self.writer:
            return
        if not self.config["resume"] and self.path.exists():
            shutil.rmtree(self.path)                      # --overwrite was given
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config, self.path / "config.json")

    def ckpt(self, method, kind="last"):
        return self.path / "ckpt" / method / f"{kind}{self.suffix}"

    def log(self, record):
        if self.writer:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_log(self, method, step):
        """On resume, drop what was logged after the checkpoint: it will be logged again."""
        if not self.writer or not (self.path / "log.jsonl").exists():
            return
        finished = {m["method"] for m in self.done}
        lines = (self.path / "log.jsonl").read_text().splitlines()
        keep = [l for l in lines if (r := json.loads(l))["method"] in finished
                or (r["method"] == method and r["step"] <= step)]
        save_atomic("".join(l + "\n" for l in keep), self.path / "log.jsonl")

    def records(self):
        path = self.path / "log.jsonl"
        return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


# --- data order -----------------------------------------------------------------------------

class Batches:
    """Seeded epochs over n examples: each epoch a fresh permutation cut into full batches
    (the tail that does not fill a batch is dropped).  Its state is the position in that order."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise UserError(f"the training set has {n} examples, fewer than --batch_size={batch_size}; "
                            f"use a smaller batch")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = None

    def _order(self):
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def next(self) -> list:
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        batch = self._order()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self._perm = state["epoch"], state["pos"], None


# --- helpers of the training loop -----------------------------------------------------------

def to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(cfg):
    """Linear warm-up over cfg.warmup steps, then linear or cosine decay to 0 at cfg.max_steps."""
    warmup, total = cfg.warmup, cfg.max_steps

    def factor(step):                                  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1 - progress)
    return factor


def warmup_warning(cfg):
    """The warning for a warm-up that is not shorter than the run, or None.

    The warm-up is kept as given, not scaled with max_steps: a preset's value is the paper's, and a
    flag that silently changed meaning with another flag would make runs hard to compare.
    """
    if cfg.warmup < cfg.max_steps:
        return None
    peak = cfg.max_steps / cfg.warmup                  # lr_lambda at the last step, max_steps - 1
    return (f"warning: --warmup={cfg.warmup} is not shorter than the {cfg.max_steps} steps of this run, so "
            f"the learning rate peaks at {peak:.0%} of --lr={cfg.lr:g}; pass a shorter --warmup, "
            f"e.g. --warmup={max(1, cfg.max_steps // 10)}")


def adapted_state(model):
    """What training changes: every tensor of every SRLoRALinear (residual W, A, B, basis,
    active_indices, next_index) and every trainable parameter (the head)."""
    prefixes = tuple(name + "." for name, _ in srlora_layers(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes) or k in trainable}


def count_params(model):
    adapter = sum(l.lora_A.numel() + l.lora_B.numel() for _, l in srlora_layers(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the SVD basis buffers are bookkeeping, not model parameters
    total = sum(p.numel() for p in model.parameters())
    return {"adapter": adapter, "trainable": trainable, "total": total}


def fmt_count(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One line per log_every steps: method, step, loss, lr, it/s, ETA (overwritten in place on a terminal)."""

    def __init__(self, method, total, start_step, enabled):
        self.method, self.total, self.enabled = method, total, enabled
        self.t0, self.s0 = time.time(), start_step
        self.tty = sys.stdout.isatty()

    def show(self, step, loss, lr):
        if not self.enabled:
            return
        rate = (step - self.s0) / max(1e-9, time.time() - self.t0)
        eta = (self.total - step) / max(rate, 1e-9)
        line = (f"[{self.method}] step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{rate:.2f} it/s  ETA {fmt_time(eta)}")
        print(("\r" + line + " " * 4) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def done(self):
        if self.enabled and self.tty:
            print()


# --- one method -----------------------------------------------------------------------------

def pick_device(cfg):
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def prepare(cfg, method, build, head, device):
    """A fresh model for `method`: LoRA (Kaiming A, zero B), PiSSA (top-r SVD, no switches)
    or SRLoRA (PiSSA init, switches up to r_target); the head trains fully."""
    model = build(method).to(device)
    r_target = cfg.r_target if method == "srlora" else cfg.r
    decompose = None
    if dist.is_initialized():                       # DDP or FSDP2: each weight's SVD once, on one rank
        from srlora_fsdp import spread_factors
        decompose = spread_factors
    try:
        apply_srlora(model, targets=[t.strip() for t in cfg.targets.split(",")], r=cfg.r, alpha=cfg.alpha,
                     r_target=r_target, gamma=cfg.gamma, init="lora" if method == "lora" else "pissa",
                     residual_dtype=None if cfg.residual_dtype == "model" else cfg.residual_dtype,
                     decompose=decompose)
    except ValueError as e:                         # bad r / targets: the same one line as other input errors
        raise UserError(str(e)) from None
    for name, p in model.named_parameters():
        if name.startswith(tuple(head)):
            p.requires_grad_(True)
    return parallel.shard(model) if cfg.fsdp else model


def train_method(cfg, method, model, run, *, n_train, make_batch, loss_fn, evaluate, rank, world, device):
    """Train one adapted model for cfg.max_steps optimizer steps; returns its metrics at the
    step with the lowest dev loss.  Resumes from run's last checkpoint for this method if any."""
    params = [p for p in model.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(("lora_A", "lora_B"))]
    groups = [{"params": [p for p in params if not any(p is h for h in head)]},
              {"params": head, "lr": cfg.head_lr or cfg.lr}]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    tracker = ImportanceTracker(model, cfg.beta1, cfg.beta2) if method == "srlora" else None
    adaptive = AdaptiveSchedule(cfg.max_steps, cfg.r, cfg.r_target, cfg.gamma, cfg.adapt_ratio, cfg.adapt_every,
                                stop=cfg.switch_stop, score=cfg.score, grace=cfg.grace) \
        if tracker and cfg.switch_schedule == "adaptive" else None
    switches = set(switch_steps(cfg.max_steps, cfg.r, cfg.r_target, cfg.gamma, cfg.switch_stop)) \
        if tracker and not adaptive else set()
    batches = Batches(n_train, cfg.batch_size, cfg.seed)
    best = {"dev_loss": math.inf, "step": 0, "dev": {}}
    step, elapsed = 0, 0.0
    seed_everything(cfg.seed)

    last = run.ckpt(method)
    if cfg.resume and last.exists():
        if cfg.fsdp:                                  # on any number of ranks: the shards are re-cut as they load
            ckpt = parallel.load_sharded(last, model, opt, tracker)
        else:
            # weights_only=False: our own file, and it holds numpy's RNG state
            ckpt = torch.load(last, map_location=device, weights_only=False)
            missing = set(ckpt["model"]) - set(model.state_dict())
            if missing:
                raise UserError(f"--resume: {last} does not fit this model ({sorted(missing)[0]}); repeat the original flags")
            model.load_state_dict(ckpt["model"], strict=False)
            opt.load_state_dict(ckpt["optimizer"])
            if tracker:
                tracker.load_state_dict(ckpt["tracker"])
        sched.load_state_dict(ckpt["scheduler"])
        if adaptive:
            adaptive.load_state_dict(ckpt["schedule"])
        batches.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        step, best, elapsed = ckpt["step"], ckpt["best"], ckpt["elapsed"]
        run.truncate_log(method, step)
        if rank == 0:
            print(f"[{method}] resumed from {last} at step {step}")

    saved_step = step if cfg.resume and last.exists() else 0

    def checkpoint(kind):
        nonlocal saved_step
        saved_step = step if kind == "last" else saved_step
        state = {"method": method, "step": step, "schedule": adaptive.state_dict() if adaptive else None,
                 "scheduler": sched.state_dict(), "data": batches.state_dict(), "rng": rng_state(), "best": best,
                 "elapsed": elapsed + time.time() - t0}
        if cfg.fsdp:                                   # every rank writes its shards
            parallel.save_sharded(run.ckpt(method, kind), model, opt, tracker, step, state)
        elif rank == 0:
            save_atomic({**state, "model": adapted_state(model), "tracker": tracker.state_dict() if tracker else None,
                         "optimizer": opt.state_dict()}, run.ckpt(method, kind))

    ddp = parallel.forward_module(model, world, cfg.fsdp)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    progress = Progress(method, cfg.max_steps, step, enabled=rank == 0)
    t0, window = time.time(), []
    model.train()
    while step < cfg.max_steps:
        step += 1
        local = batches.next()[rank::world]              # this rank's share of the global batch
        loss_sum = torch.zeros((), device=device)
        for j in range(cfg.grad_accum):
            chunk = local[j * micro:(j + 1) * micro]
            sync = j == cfg.grad_accum - 1                # gradients are reduced on the last micro-batch only
            with amp, parallel.gradient_sync(ddp, sync, cfg.fsdp):
                loss = loss_fn(ddp, to_device(make_batch(chunk), device)) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        # One host sync per step: the loss for the log and a finite check of every gradient.
        grad_norm = parallel.grad_norm(params, cfg.fsdp)
        if world > 1:                                     # log the global batch's loss, not this rank's share
            dist.all_reduce(loss_sum)
            loss_sum /= world
        loss_value, grad_value = torch.stack([loss_sum, grad_norm]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            good = f"{last} (step {saved_step})" if saved_step else "none yet"
            raise NonFiniteError(f"[{method}] step {step}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'}; "
                                 f"stopped before this step changed any weight. Last good checkpoint: {good}. "
                                 f"Try a lower --lr")
        if tracker:
            tracker.update()                              # Eq. (3)-(5), before the optimizer moves w
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss_value)
        if step in switches or adaptive:                  # Eq. (8)-(12)
            layers = adaptive.due(step, tracker) if adaptive else None      # None: every layer
            if layers is None or layers:
                before = switch_diagnostics(tracker)
                for event in recompose(model, tracker, cfg.gamma, optimizer=opt, reset=cfg.reset, moments=cfg.moments,
                                       score=cfg.score, grace=cfg.grace, layers=layers):
                    run.log({"event": "switch", "method": method, "step": step, **event, **before[event["layer"]]})
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            lr = sched.get_last_lr()[0]
            run.log({"event": "train", "method": method, "step": step, "loss": sum(window) / len(window), "lr": lr})
            progress.show(step, sum(window) / len(window), lr)
            window = []
        if (step % cfg.eval_every == 0 or step == cfg.max_steps) and (rank == 0 or cfg.fsdp):
            model.eval()                                  # FSDP2: every rank, since a forward needs them all
            with torch.no_grad(), amp:
                dev_loss, dev = evaluate(model, device)
            model.train()
            if cfg.fsdp and world > 1:                    # rank 0's numbers decide, so all save "best" together
                shared = [(dev_loss, dev)]
                dist.broadcast_object_list(shared, src=0)
                dev_loss, dev = shared[0]
            run.log({"event": "eval", "method": method, "step": step, "dev_loss": dev_loss, "dev": dev})
            if dev_loss < best["dev_loss"]:
                best = {"dev_loss": dev_loss, "step": step, "dev": dev}
                checkpoint("best")
        if step % (cfg.save_every or cfg.eval_every) == 0 or step == cfg.max_steps:
            checkpoint("last")
    progress.done()
    if world > 1 and not cfg.fsdp:                       # FSDP2: each rank holds other rows, by design
        _check_ranks_agree(model, method, run)
    return best, elapsed + time.time() - t0


@torch.no_grad()
def switch_diagnostics(tracker):
    """{layer: what its slots looked like just before a switch}: the pair scores S_k of Eq. (7)
    that pick the recycled slots, and each pair's magnitude scaling * |B_k| |A_k| (its singular
    value when it was brought in).  Logged with the switch, so the dynamics can be read back."""
    return {name: {"scores": tracker.pair_scores(layer).tolist(),
                   "norms": (layer.scaling * layer.pair_norms()).tolist()}
            for name, layer in zip(tracker.names, tracker.layers)}


def _check_ranks_agree(model, method, run):
    """Under DDP every rank must hold the same adapted weights; compare their digests."""
    digest = hashlib.sha256()
    for k, v in sorted(adapted_state(model).items()):
        if torch.is_tensor(v):
            digest.update(k.encode() + v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    run.log({"event": "ranks", "method": method, "step": -1, "identical": len(set(digests)) == 1})
    if len(set(digests)) != 1:
        raise RuntimeError(f"[{method}] DDP ranks ended with different adapted weights: {digests}")


# --- all methods ----------------------------------------------------------------------------

def run_methods(cfg, *, task, build, n_train, make_batch, loss_fn, evaluate, head=("classifier",)):
    """Train every method of cfg in turn from the same pretrained model, seed and data order,
    and write the run folder (see Run).  Returns one metrics dict per method."""
    check_config(cfg)
    Batches(n_train, cfg.batch_size, cfg.seed)      # fewer examples than a batch: fail before the folder is touched
    if cfg.fsdp and not parallel.launched_by_torchrun():
        raise UserError("--fsdp shards the model over the processes torchrun starts; run "
                        "torchrun --nproc_per_node=2 <script> -- --fsdp ... (one process or more)")
    rank, world = parallel.start(cfg.fsdp)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UserError(f"--batch_size={cfg.batch_size} must be divisible by --grad_accum={cfg.grad_accum} "
                        f"x {world} processes")
    device = pick_device(cfg)
    run = Run(cfg, task, writer=rank == 0)
    warning = warmup_warning(cfg)
    if warning and rank == 0:
        print(warning, file=sys.stderr)
    results = list(run.done)
    todo = [m for m in method_list(cfg) if m not in {r["method"] for r in results}]
    seed_everything(cfg.seed)
    # Build the first model before writing anything: a bad --targets or --r fails here and
    # leaves any earlier run in the folder untouched.
    model = prepare(cfg, todo[0], build, head, device) if todo else None
    run.start()
    for i, method in enumerate(todo):
        if i > 0:
            seed_everything(cfg.seed)
            model = prepare(cfg, method, build, head, device)
        params = count_params(model)
        if rank == 0:
            print(f"[{method}] {params['adapter']:,} adapter + {params['trainable'] - params['adapter']:,} head "
                  f"parameters train, of {params['total']:,}; {cfg.max_steps} steps on {device}")
        best, seconds = train_method(cfg, method, model, run, n_train=n_train, make_batch=make_batch,
                                     loss_fn=loss_fn, evaluate=evaluate, rank=rank, world=world, device=device)
        results.append({"method": method, "task": task, "best_step": best["step"], "dev_loss": best["dev_loss"],
                        "dev": best["dev"], "params": params, "steps": cfg.max_steps, "train_seconds": round(seconds, 1)})
        run.done = results
        if rank == 0:
            write_json(results, run.path / "metrics.json")
        del model
    if rank == 0:
        table = results_table(results)
        save_atomic(table, run.path / "results.md")
        print("\n" + table)
        if cfg.plots:
            plot_run(run.path)
        print(f"outputs in {run.path}/")
    parallel.stop()
    return results


def results_table(results) -> str:
    """A Table-3-style comparison: dev metrics x100 at the step with the lowest dev loss."""
    names = list(dict.fromkeys(k for r in results for k in r["dev"]))
    lines = ["| method | trainable / total params | " + " | ".join(names) + " | dev loss | best step | train time |",
             "|---" * (len(names) + 5) + "|"]
    for r in results:
        p = r["params"]
        cells = [f"{100 * r['dev'][k]:.1f}" if k in r["dev"] else "-" for k in names]
        lines.append(f"| {r['method']} | {fmt_count(p['trainable'])} / {fmt_count(p['total'])} | " + " | ".join(cells)
                     + f" | {r['dev_loss']:.4f} | {r['best_step']} | {fmt_time(r['train_seconds'])} |")
    task = results[0]["task"] if results else "?"
    return f"Task {task}: dev metrics x100 at the step with the lowest dev loss.\n\n" + "\n".join(lines) + "\n"


# --- what the switch events say (the paper's Fig. 4 and 5) ------------------------------------

def active_intervals(records, r, method="srlora"):
    """{layer: {singular index: steps it was active}} from a run's log records, for layers that switched.

    Slots 0..r-1 start on indices 0..r-1 at step 0; a switch at step t ends the fused-out indices
    and starts the brought-in ones; whatever is active at the end runs to the last step."""
    switches = [e for e in records if e.get("event") == "switch" and e["method"] == method]
    end = max((e["step"] for e in records if e.get("event") == "train" and e["method"] == method), default=0)
    start, length = {}, {}
    for e in switches:
        layer = e["layer"]
        start.setdefault(layer, dict.fromkeys(range(r), 0))
        for old, new in zip(e["fused_out"], e["brought_in"]):
            length.setdefault(layer, {})[old] = e["step"] - start[layer].pop(old)
            start[layer][new] = e["step"]
    for layer, active in start.items():
        for k, s in active.items():
            length.setdefault(layer, {})[k] = end - s
    return {layer: dict(sorted(v.items())) for layer, v in length.items()}


def is_ffn(layer_name: str) -> bool:
    """Feed-forward maps (BERT intermediate/output, ViT fc1/fc2) as opposed to attention maps."""
    return any(k in layer_name for k in ("intermediate", "fc1", "fc2", "mlp", "ffn")) or (
        layer_name.endswith("output.dense") and "attention" not in layer_name)


def plot_run(path):
    """Fig. 3 (training loss per method), Fig. 5 (one layer's active intervals) and Fig. 4
    (per-layer variance of active-interval lengths) as PNG files in the run folder."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plots were drawn")
        return
    path = Path(path)
    records = [json.loads(l) for l in (path / "log.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in records):
        pts = [(r["step"], r["loss"]) for r in records if r.get("event") == "train" and r["method"] == method]
        ax.plot(*zip(*pts), label=method)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss (cf. paper Fig. 3)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path / "fig3_train_loss.png", dpi=120)
    plt.close(fig)

    intervals = active_intervals(records, json.loads((path / "config.json").read_text())["r"])
    if intervals:
        plot_intervals(intervals, path / "fig5_active_intervals.png", path / "fig4_interval_variance.png")


def plot_intervals(intervals, fig5_path, fig4_path):
    """Fig. 5 (how long each singular index of one middle layer stayed active) and Fig. 4 (the
    variance of those lengths per layer, attention vs feed-forward), from active_intervals().
    Returns the layer drawn in Fig. 5 and {layer: variance}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = list(intervals)
    layer = layers[len(layers) // 2]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(list(intervals[layer]), list(intervals[layer].values()), color="tab:orange")
    ax.set(xlabel="singular index (descending singular value)", ylabel="steps active",
           title=f"Active intervals of {layer} (cf. paper Fig. 5)")
    fig.tight_layout()
    fig.savefig(fig5_path, dpi=120)
    plt.close(fig)

    var = {l: float(np.var(list(v.values()))) for l, v in intervals.items()}
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(layers)), 4))
    ax.bar(range(len(layers)), [var[l] for l in layers], color=["tab:green" if is_ffn(l) else "tab:blue" for l in layers])
    ax.set_xticks(range(len(layers)), [l.removeprefix("bert.").replace("encoder.layer.", "L").replace("blocks.", "B")
                                       for l in layers], rotation=90, fontsize=6)
    ax.set(ylabel="variance of active-interval length", title="Per-layer interval variance (cf. paper Fig. 4)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:green")],
              labels=["attention", "feed-forward"], loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(fig4_path, dpi=120)
    plt.close(fig)
    return layer, var
