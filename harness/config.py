"""The flags both scripts share: TrainConfig (every field a --flag), the nanoGPT-style parser,
--help built from the fields' comments, the command-line entry cli(), and the checks of a config."""
import dataclasses
import inspect
import math
import re
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from harness.errors import NonFiniteError, UserError, fail
from srlora import SRLoRAConfig, n_recycle
from srlora_switch import AdaptiveSchedule, SlotRule, switch_steps_within


@dataclass
class TrainFields:
    """The settings of a run besides SRLoRAConfig's; TrainConfig adds those.  Every field is a --flag."""
    method: str = ""                  # one method; when set it overrides `methods`
    methods: str = "lora,pissa,srlora"  # run in turn, same seed and data order: a side-by-side comparison
    targets: str = ""                 # comma-separated nn.Linear name suffixes; the scripts set a default
    # The alternative switch rules of srlora_switch.py; each default is the paper's rule.
    score: str = "paper"              # slot ranking: paper (Eq. 7) or relative (Eq. 7 / (|B_k| |A_k|)^2); srlora_switch.SlotRule
    grace: int = 0                    # a refilled slot is not recycled at its layer's next `grace` switches
    switch_stop: float = 1.0          # all switches within the first switch_stop of the steps (1.0: the paper's schedule)
    switch_schedule: str = "fixed"    # fixed (Eq. 13-14) or adaptive (srlora_switch.AdaptiveSchedule, per layer)
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
    plots: bool = True                # PNG plots, when matplotlib is installed
    fsdp: bool = False                # under torchrun: shard each block and the model with FSDP2 (harness/parallel.py)

    # The range of every numeric flag and the form of --name and --device: {field: (test, what it
    # must be)}, checked by check_ranges before anything is read or written.  The scripts' configs
    # add their own fields' RANGES.  The SRLoRA fields and the switch rules are checked by what
    # receives them (check_config), not here.
    RANGES: ClassVar[dict] = {
        "lr": (lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0, e.g. 1e-4"),
        "head_lr": (lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0 (0: --lr)"),
        "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0 (0: none)"),
        "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.9"),
        "warmup": (lambda v: v >= 0, "must be at least 0 (0: no warm-up)"),
        "max_steps": (lambda v: v >= 0, "must be at least 0 (0: from the data, where the script computes it)"),
        "batch_size": (lambda v: v >= 1, "must be at least 1"),
        "grad_accum": (lambda v: v >= 1, "must be at least 1 (1: no accumulation)"),
        "eval_every": (lambda v: v >= 1, "must be at least 1"),
        "save_every": (lambda v: v >= 0, "must be at least 0 (0: --eval_every)"),
        "log_every": (lambda v: v >= 1, "must be at least 1"),
        "seed": (lambda v: 0 <= v < 2 ** 32, "must be in [0, 2**32), as numpy's seed"),
        "name": (lambda v: valid_name(v), "must be one folder name inside --out_dir (no '/', not '.' or '..'); "
                                          "use --out_dir for the parent folder"),
        "device": (lambda v: valid_device(v), "is not a device that torch has here; use auto, cpu or cuda[:N] "
                                              "(when a GPU is present)"),
    }


# The SRLoRA flags are SRLoRAConfig's own fields, with its defaults, its checks and its comments as
# --help, so they cannot drift from srlora.py.  Not flags: targets (a comma list above, defaulted by
# each script) and init (set by the method: lora or pissa).
SRLORA_FIELDS = tuple(f for f in dataclasses.fields(SRLoRAConfig) if f.name not in ("targets", "init"))
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(f.name, f.type, dataclasses.field(default=f.default)) for f in SRLORA_FIELDS],
    bases=(TrainFields,), namespace={"__doc__": "Settings both scripts share: TrainFields and SRLoRAConfig's "
                                                "fields.  The scripts subclass it."})
TrainConfig.__module__ = __name__


def srlora_config(cfg, method: str) -> SRLoRAConfig:
    """The SRLoRAConfig that `method` wraps the model with: the run's SRLoRA flags, targets,
    init "lora" for LoRA and "pissa" otherwise, and r_target = r (no switches) unless SRLoRA."""
    return SRLoRAConfig(**{**{f.name: getattr(cfg, f.name) for f in SRLORA_FIELDS},
                           "targets": tuple(t.strip() for t in cfg.targets.split(",") if t.strip()),
                           "init": "lora" if method == "lora" else "pissa",
                           "r_target": cfg.r_target if method == "srlora" else cfg.r})


METHODS = ("lora", "pissa", "srlora")
# Settings that may differ when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = ("resume", "overwrite", "device", "plots", "log_every", "out_dir", "name")


def _parse_value(text: str, default, flag: str):
    if default is None:                                # an optional name, e.g. --residual_dtype
        return None if text.lower() in ("none", "model") else text
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
    cfg = dataclasses.replace(cfg, **given)
    check_ranges(cfg)                                  # before the script reads or writes anything
    return cfg


def field_comments(cls) -> dict:
    """{field: the comment on its line} for a config dataclass and its bases, read from the source."""
    comments = {}
    for klass in (SRLoRAConfig, *reversed(cls.__mro__[:-1])):
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


def valid_name(name: str) -> bool:
    """--name: empty (the default name) or one path component, so that a run never stands for
    --out_dir itself, anything above it, or anywhere else."""
    return name == "" or (name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name)


def valid_device(text: str) -> bool:
    if text == "auto":
        return True
    try:
        device = torch.device(text)
        if device.type == "meta":                      # holds no data: nothing would train
            return False
        torch.zeros(1, device=device)                  # a device that torch parses but this machine lacks fails here
        return True
    except (RuntimeError, ValueError, AssertionError, AttributeError):
        return False


def check_ranges(cfg):
    """Every flag with a range (the RANGES of cfg's class and its bases) within it; one line naming
    the flag and its range otherwise.  NaN fails every range, since it compares false."""
    for klass in reversed(type(cfg).__mro__):
        for name, (ok, rule) in vars(klass).get("RANGES", {}).items():
            value = getattr(cfg, name)
            if not ok(value):
                raise UserError(f"--{name}={value} {rule}")


def check_config(cfg):
    """Every flag's check, before anything is written: the ranges of check_ranges, then the names
    and the settings that need one another.  The SRLoRA fields and the switch rules are checked by
    what receives them (SRLoRAConfig, SlotRule, switch_steps_within, AdaptiveSchedule)."""
    check_ranges(cfg)
    methods = method_list(cfg)
    if not methods:
        raise UserError("--method and --methods are both empty; use --method=srlora or --methods=lora,pissa,srlora")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown method {bad[0]!r}; use --method or --methods with {', '.join(METHODS)}")
    for flag, value, allowed in (("optimizer", cfg.optimizer, ("adamw", "sgd")),
                                 ("schedule", cfg.schedule, ("linear", "cosine")),
                                 ("switch_schedule", cfg.switch_schedule, ("fixed", "adaptive")),
                                 ("amp", cfg.amp, ("off", "bf16"))):
        if value not in allowed:
            raise UserError(f"--{flag}={value} is unknown; use one of {', '.join(allowed)}")
    if cfg.max_steps < 1 or cfg.grad_accum < 1 or cfg.eval_every < 1 or cfg.log_every < 1:
        raise UserError("--max_steps, --grad_accum, --eval_every and --log_every must be at least 1")
    if not cfg.targets:
        raise UserError("--targets is empty; name the nn.Linear layers to adapt, e.g. --targets=query,value")
    for flag, check in (("", lambda: srlora_config(cfg, "srlora")),      # each message starts with its field
                        ("", lambda: SlotRule(cfg.score, cfg.grace).check(cfg.r, n_recycle(cfg.r, cfg.gamma))),
                        ("switch_", lambda: switch_steps_within(cfg.max_steps, cfg.r, cfg.r_target, cfg.gamma,
                                                                cfg.switch_stop)),
                        ("adapt_", lambda: AdaptiveSchedule(cfg.max_steps, cfg.r, cfg.r_target, cfg.gamma,
                                                            cfg.adapt_ratio, cfg.adapt_every))):
        try:
            check()
        except ValueError as e:
            raise UserError(f"--{flag}{e}") from None


def method_list(cfg):
    return [cfg.method] if cfg.method else [m.strip() for m in cfg.methods.split(",") if m.strip()]
