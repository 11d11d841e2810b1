"""The results suites: what each run of each suite trains, how to run it, and how to read its logs back.

Each run is the training script itself, run as a subprocess with the flags below.  Its small
outputs (config.json, metrics.json, log.jsonl) are copied to docs/results/<suite>/<run>/, which
load() reads; the report is computed from those files alone.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                    # the experiments import srlora from the repository root
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
SEEDS = (0, 1, 2)
METHODS = "lora,pissa,srlora"

# Identical hyperparameters and data order for every method: one process per seed runs all three.
# The text and vision suites are the scripts' offline defaults (the README's demo), seeded.
SUITES = {
    "text": {"script": "train_glue.py", "flags": [],
             "runs": {f"seed{s}": [f"--seed={s}", f"--methods={METHODS}"] for s in SEEDS}},
    # SRLoRA against PiSSA (the comparison that isolates recomposition) at 3x the demo's budget.
    "text-long": {"script": "train_glue.py", "flags": ["--max_steps=600", "--eval_every=150", "--warmup=60"],
                  "runs": {f"seed{s}": [f"--seed={s}", "--methods=pissa,srlora"] for s in SEEDS}},
    # Small rank, where recomposition has the most room: r=2 (alpha=r, scaling 1 as in the paper), r_target=8r.
    # LoRA on seed 0 only: the CPU budget went to the PiSSA-against-SRLoRA comparison (seed 1's two
    # methods ran as two processes side by side; a run folder's methods share seed and data order either way).
    "small-r": {"script": "train_glue.py", "flags": ["--r=2", "--alpha=2", "--r_target=16"],
                "runs": {"seed0": ["--seed=0", f"--methods={METHODS}"],
                         "seed1-pissa": ["--seed=1", "--method=pissa"], "seed1-srlora": ["--seed=1", "--method=srlora"],
                         "seed2": ["--seed=2", "--methods=pissa,srlora"]}},
    # The same small-rank setting with the switch ranking that does not grow with a pair's magnitude.
    "small-r-relative": {"script": "train_glue.py",
                         "flags": ["--r=2", "--alpha=2", "--r_target=16", "--method=srlora", "--score=relative"],
                         "runs": {f"seed{s}": [f"--seed={s}"] for s in SEEDS[:2]}},
    "vision": {"script": "train_vit.py", "flags": [],
               "runs": {f"seed{s}": [f"--seed={s}", f"--methods={METHODS}"] for s in SEEDS}},
    # SRLoRA alone, seed 0, one setting changed from the default per run; the default itself
    # (gamma 0.5, r_target 32 = 4r, moments keep, reset recycled) is the text suite's seed-0 run.
    "ablations": {"script": "train_glue.py", "flags": ["--seed=0", "--method=srlora"],
                  "runs": {"gamma0.25": ["--gamma=0.25"], "gamma0.75": ["--gamma=0.75"],
                           "rtarget16": ["--r_target=16"], "rtarget128": ["--r_target=128"],
                           "moments_reset": ["--moments=reset"], "reset_all": ["--reset=all"]}},
}
# The dynamics: SRLoRA alone, seed 0, logging each switch's pair scores and pair magnitudes (harness/loop.py's
# switch_diagnostics), for the default and for the settings that could change which slots rotate.
DYNAMICS = {"default": [], "score_relative": ["--score=relative"], "grace1": ["--grace=1"]}
SUITES["dynamics"] = {"script": "train_glue.py", "flags": ["--seed=0", "--method=srlora"], "runs": DYNAMICS}
# The switch alternatives of srlora.py, each alone at the demo's settings (r=8, r_target=32, 200 steps), 3 seeds;
# the paper's default with the same seeds is the text suite's SRLoRA.
ALTERNATIVES = {"relative": ["--score=relative"], "stop0.8": ["--switch_stop=0.8"],
                "adaptive": ["--switch_schedule=adaptive"], "grace1": ["--grace=1"]}
SUITES["alternatives"] = {"script": "train_glue.py", "flags": ["--method=srlora"],
                          "runs": {f"{a}-seed{s}": [f"--seed={s}", *f] for a, f in ALTERNATIVES.items() for s in SEEDS}}
ALTERNATIVE_LABELS = {"relative": "score / magnitude² (`--score=relative`)",
                      "stop0.8": "all switches in the first 80% (`--switch_stop=0.8`)",
                      "adaptive": "adaptive schedule (`--switch_schedule=adaptive`)",
                      "grace1": "grace of one switch (`--grace=1`)"}
# 1,000 steps (two passes over the 11,668 training tweets) at r=4 and r_target=32=8r: PiSSA, the paper's SRLoRA and
# its relative score on 3 seeds; LoRA at rank r and at rank r_target (alpha = rank, scaling 1) as references.
# One process per run, so two runs can share the machine.
LONG_R4 = ["--r=4", "--alpha=4", "--r_target=32", "--max_steps=1000", "--epochs=2", "--warmup=100", "--eval_every=250"]
SUITES["long-r4"] = {"script": "train_glue.py", "flags": LONG_R4, "runs": {
    **{f"{m}-seed{s}": [f"--seed={s}", f"--method={m}"] for s in SEEDS for m in ("pissa", "srlora")},
    **{f"relative-seed{s}": [f"--seed={s}", "--method=srlora", "--score=relative"] for s in SEEDS},
    **{f"lora-seed{s}": [f"--seed={s}", "--method=lora"] for s in SEEDS},
    **{f"lora32-seed{s}": [f"--seed={s}", "--method=lora", "--r=32", "--alpha=32"] for s in SEEDS}}}
# The other ranks at the demo's 200 steps: r=1 (r_target=8, so every switch swaps the one slot) with PiSSA, and
# r=8 with r_target=64 = 8r (PiSSA at r=8 does not depend on r_target: it is the text suite's).
SUITES["rank-sweep"] = {"script": "train_glue.py", "flags": [], "runs": {
    **{f"r1-{m}-seed{s}": [f"--seed={s}", f"--method={m}", "--r=1", "--alpha=1", "--r_target=8"]
       for s in SEEDS for m in ("pissa", "srlora")},
    **{f"r8rt64-srlora-seed{s}": [f"--seed={s}", "--method=srlora", "--r_target=64"] for s in SEEDS},
    # r=1 with Adam's second moment of the recycled slot zeroed too: is the kept moment why r=1 stalls?
    **{f"r1-momreset-seed{s}": [f"--seed={s}", "--method=srlora", "--r=1", "--alpha=1", "--r_target=8",
                                "--moments=reset"] for s in SEEDS}}}
# Continued pretraining of SmolLM2-135M on Polish man pages (experiments/llm.py): r=2, r_target=16=8r, 80 steps of
# 4 x 128 tokens, lr 2e-4 for every method.  LoRA at ranks r and r_target first (does the rank bottleneck show?),
# then SRLoRA and PiSSA, then SRLoRA with Adam's second moment of recycled slots reset; seed 0 of every method
# before seed 1.  One method per run, so that each log is committed as it finishes.
LLM_METHODS = {"lora": ["--method=lora"], "lora16": ["--method=lora", "--r=16", "--alpha=16"],
               "srlora": ["--method=srlora"], "pissa": ["--method=pissa"],
               "reset": ["--method=srlora", "--moments=reset"],
               # PiSSA at rank r_target: the upper reference with SRLoRA's own initialisation (PiSSA(2) closed most
               # of the LoRA(2)-LoRA(16) gap on seed 0, so that gap is partly LoRA's zero-B start, not rank)
               "pissa16": ["--method=pissa", "--r=16", "--alpha=16"],
               # every switch of the runs above recycled the slot refilled at the switch before: with a grace of
               # one switch a refilled direction stays two intervals (srlora_switch.SlotRule(grace=1))
               "grace1": ["--method=srlora", "--moments=reset", "--grace=1"]}
LLM_LABELS = {"lora16": "lora-rt", "reset": "srlora-reset", "pissa16": "pissa-rt",
              "grace1": "srlora-grace1"}                                  # run name prefix -> report label
SUITES["llm"] = {"script": "experiments/llm.py", "flags": [],
                 "runs": {f"{m}-seed{s}": [f"--seed={s}", *f] for s in SEEDS for m, f in LLM_METHODS.items()}}
# The same comparison at a budget only a GPU allows (bench/gpu.sh): 300 steps of 8 x 128 tokens, 3 seeds; LoRA(r),
# PiSSA and SRLoRA of one seed share one process (one model load), as train_glue.py's --methods does.
LLM_GPU = ["--device=cuda", "--max_steps=300", "--batch_size=8", "--warmup=30", "--eval_every=100", "--eval_blocks=64"]
SUITES["llm-gpu"] = {"script": "experiments/llm.py", "flags": LLM_GPU, "runs": {
    name: flags for s in SEEDS for name, flags in ((f"seed{s}", [f"--seed={s}", "--methods=lora,pissa,srlora"]),
                                                   (f"lora16-seed{s}", [f"--seed={s}", *LLM_METHODS["lora16"]]),
                                                   (f"reset-seed{s}", [f"--seed={s}", *LLM_METHODS["reset"]]),
                                                   (f"pissa16-seed{s}", [f"--seed={s}", *LLM_METHODS["pissa16"]]))}}
# The optimizer-moment default, on the tweets at the demo's 200 steps: SRLoRA with Adam's second moment of the
# recycled slots kept (the default) or reset, at r=2 and r=8, r_target=8r, alpha=r, 3 seeds.
MOMENTS_RANKS = {"r2": ["--r=2", "--alpha=2", "--r_target=16"], "r8": ["--r=8", "--alpha=8", "--r_target=64"]}
SUITES["moments"] = {"script": "train_glue.py", "flags": ["--method=srlora"], "runs": {
    f"{r}-{m}-seed{s}": [f"--seed={s}", *flags, f"--moments={m}"]
    for r, flags in MOMENTS_RANKS.items() for m in ("keep", "reset") for s in SEEDS}}
DEFAULT = "default"   # the text suite's seed-0 SRLoRA run, standing in for gamma0.5, rtarget32, keep, recycled
ABLATION_GROUPS = {"gamma": ("gamma0.25", DEFAULT, "gamma0.75"),
                   "r_target (2r, 4r, 16r)": ("rtarget16", DEFAULT, "rtarget128"),
                   "Adam 2nd moment at recycle": (DEFAULT, "moments_reset"),
                   "importance reset": (DEFAULT, "reset_all")}
ABLATION_LABELS = {DEFAULT: "default", "gamma0.25": "gamma 0.25", "gamma0.75": "gamma 0.75",
                   "rtarget16": "r_target 16", "rtarget128": "r_target 128",
                   "moments_reset": "reset 2nd moment", "reset_all": "reset all slots"}
# Suites whose runs took the top singular directions with the randomized SVD that svd="auto" used at
# MiniLM's width before it became the exact SVD up to 1,024 wide.
RANDOMIZED_BASIS = {"text-long", "vision", "ablations", "small-r", "small-r-relative"}


# The committed runs were made when moments="keep" was SRLoRAConfig's default (the moments suite then
# made "reset" the default): every suite pins it, so that a re-run makes the runs the logs hold.  A
# run's own --moments comes later on the command line and wins.
PINNED = ["--moments=keep"]


def run_suite(name, extra, only=()):
    """Train every run of suite `name` (or only the named ones), with `extra` flags added, and
    copy its logs to docs/results/<name>/<run>/."""
    suite = SUITES[name]
    scratch = Path("runs") / "experiments" / name          # relative to ROOT, the runs' working folder
    for run, flags in suite["runs"].items():
        if only and run not in only:
            continue
        cmd = [sys.executable, suite["script"], *PINNED, *suite["flags"], *flags, *extra,
               f"--out_dir={scratch}", f"--name={run}", "--overwrite", "--plots=false"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        dest = RESULTS / name / run
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "metrics.json", "log.jsonl"):
            shutil.copy(ROOT / scratch / run / f, dest / f)


def load(suite):
    """{run name: {"config", "metrics", "records"}} from the logs committed under docs/results/<suite>/."""
    runs = {}
    for d in sorted((RESULTS / suite).glob("*/")):
        records = [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines()]
        runs[d.name] = {"config": json.loads((d / "config.json").read_text()),
                        "metrics": json.loads((d / "metrics.json").read_text()), "records": records}
    return runs


def relabel(run, old, new):
    """run with the metrics and records of method `old` relabelled `new`."""
    rename = lambda r: {**r, "method": new} if r.get("method") == old else r  # noqa: E731
    return {**run, "metrics": [rename(m) for m in run["metrics"]], "records": [rename(r) for r in run["records"]]}


def renamed(suite, methods):
    """load(suite), with the method of every run whose name starts with a key of `methods` (e.g.
    "relative" for "relative-seed1") renamed to its value, so that one suite can hold several
    variants of the same --method.  These suites run one method per run."""
    runs = load(suite)
    for name, run in runs.items():
        method = methods.get(name.rsplit("-seed", 1)[0])
        if method:
            runs[name] = relabel(run, run["metrics"][0]["method"], method)
    return runs


def with_alternative(runs, suite, method):
    """runs, plus the SRLoRA runs of `suite` with their method renamed to `method`."""
    for name, alt in load(suite).items():
        runs[f"{suite}/{name}"] = relabel(alt, "srlora", method)
    return runs
