"""Run the results suites and write docs/RESULTS.md with its tables and plots.

    python experiments/run_results.py --suite text        # 3 seeds x {LoRA, PiSSA, SRLoRA}, MiniLM on tweets
    python experiments/run_results.py --suite ablations   # gamma, r_target, optimizer-state and reset policies
    python experiments/run_results.py --suite vision      # 3 seeds x {LoRA, PiSSA, SRLoRA}, DINOv2-S/14 on MNIST
    python experiments/run_results.py --suite alternatives  # the switch options of srlora.py, 3 seeds each
    python experiments/run_results.py --suite long-r4     # 1,000 steps at r=4, r_target=32
    python experiments/run_results.py --suite rank-sweep  # r=1; r=8 with r_target=64
    python experiments/run_results.py --suite long-r4 --run lora-seed0   # one named run of a suite
    python experiments/run_results.py --report            # only rebuild RESULTS.md and plots from docs/results/

Each run is the training script itself, run as a subprocess with the flags below.  Its small
outputs (config.json, metrics.json, log.jsonl) are copied to docs/results/<suite>/<run>/; the
report is computed from those files alone, so anyone can regenerate it without re-training.
Extra flags after `--` go to every training run (e.g. `-- --data_dir=glue/RTE --task=rte`).
"""
import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import harness.plots  # noqa: E402
from harness.plots import active_intervals, is_ffn  # noqa: E402
from srlora import n_recycle  # noqa: E402
sys.path.insert(0, str(ROOT / "experiments"))
import dynamics  # noqa: E402

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
# The dynamics: SRLoRA alone, seed 0, logging each switch's pair scores and pair magnitudes (trainlib's
# switch_diagnostics), for the default and for the settings that could change which slots rotate.
DYNAMICS = {"default": [], "score_relative": ["--score=relative"], "grace1": ["--grace=1"]}
SUITES["dynamics"] = {"script": "train_glue.py", "flags": ["--seed=0", "--method=srlora"], "runs": DYNAMICS}
# The switch alternatives of srlora.py, each alone at the demo's settings (r=8, r_target=32, 200 steps), 3 seeds;
# the paper's default with the same seeds is the text suite's SRLoRA.
ALTERNATIVES = {"relative": ["--score=relative"], "stop0.8": ["--switch_stop=0.8"],
                "adaptive": ["--switch_schedule=adaptive"], "grace1": ["--grace=1"]}
SUITES["alternatives"] = {"script": "train_glue.py", "flags": ["--method=srlora"],
                          "runs": {f"{a}-seed{s}": [f"--seed={s}", *f] for a, f in ALTERNATIVES.items() for s in SEEDS}}
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
DEFAULT = "default"   # the text suite's seed-0 SRLoRA run, standing in for gamma0.5, rtarget32, keep, recycled
ABLATION_GROUPS = {"gamma": ("gamma0.25", DEFAULT, "gamma0.75"),
                   "r_target (2r, 4r, 16r)": ("rtarget16", DEFAULT, "rtarget128"),
                   "Adam 2nd moment at recycle": (DEFAULT, "moments_reset"),
                   "importance reset": (DEFAULT, "reset_all")}
ABLATION_LABELS = {DEFAULT: "default", "gamma0.25": "gamma 0.25", "gamma0.75": "gamma 0.75",
                   "rtarget16": "r_target 16", "rtarget128": "r_target 128",
                   "moments_reset": "reset 2nd moment", "reset_all": "reset all slots"}


def run_suite(name, extra, only=()):
    suite = SUITES[name]
    scratch = Path("runs") / "experiments" / name          # relative to ROOT, the runs' working folder
    for run, flags in suite["runs"].items():
        if only and run not in only:
            continue
        cmd = [sys.executable, suite["script"], *suite["flags"], *flags, *extra,
               f"--out_dir={scratch}", f"--name={run}", "--overwrite", "--plots=false"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        dest = RESULTS / name / run
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "metrics.json", "log.jsonl"):
            shutil.copy(ROOT / scratch / run / f, dest / f)


# --- the report -----------------------------------------------------------------------------

def load(suite):
    runs = {}
    for d in sorted((RESULTS / suite).glob("*/")):
        records = [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines()]
        runs[d.name] = {"config": json.loads((d / "config.json").read_text()),
                        "metrics": json.loads((d / "metrics.json").read_text()), "records": records}
    return runs


def early_loss(records, method, steps):
    """Mean training loss over the first 25% of steps: the area under the loss curve there,
    divided by its width (the paper's Fig. 3 claim is about this early phase)."""
    pts = [(r["step"], r["loss"]) for r in records if r["event"] == "train" and r["method"] == method
           and r["step"] <= 0.25 * steps]
    s, l = np.array(pts).T
    return float(np.trapezoid(l, s) / (s[-1] - s[0])) if len(s) > 1 else float(l[0])


def mean_sd(xs):
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def fmt(m, sd, scale=100.0, digits=1):
    return f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"


def verdict(a, b, claim_higher):
    """Reading of a claim that a > b (claim_higher) or a < b, from (mean, sd) pairs over seeds."""
    (ma, sa), (mb, sb) = a, b
    if sa == sb == 0.0:
        return "no reading (one seed has no spread)"
    if abs(ma - mb) <= (sa ** 2 + sb ** 2) ** 0.5:
        return "inconclusive (the difference is within the seed spread)"
    return "confirmed" if (ma > mb) == claim_higher else "not confirmed"


def method_table(runs):
    """Per method: dev metrics and early training loss, mean ± sd over seeds."""
    by_method = {}
    for run in runs.values():
        steps = run["config"]["max_steps"]
        for m in run["metrics"]:
            entry = by_method.setdefault(m["method"], {"dev": {}, "early": [], "dev_loss": []})
            for k, v in m["dev"].items():
                entry["dev"].setdefault(k, []).append(v)
            entry["early"].append(early_loss(run["records"], m["method"], steps))
            entry["dev_loss"].append(m["dev_loss"])
    return by_method


def plot_losses(runs, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ROWS:
        curves = []
        for run in runs.values():
            pts = [(r["step"], r["loss"]) for r in run["records"] if r["event"] == "train" and r["method"] == method]
            if pts:
                curves.append(np.array(pts))
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = curves[0][:n, 0]
        losses = np.stack([c[:n, 1] for c in curves])
        mean, sd = losses.mean(0), losses.std(0)
        ax.plot(steps, mean, label=method)
        ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
    switches = sorted({r["step"] for run in runs.values() for r in run["records"] if r["event"] == "switch"})
    for i, t in enumerate(switches):
        ax.axvline(t, color="tab:green", lw=0.6, ls=":", label="SRLoRA switch" if i == 0 else None)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_intervals(run, prefix):
    intervals = active_intervals(run["records"], run["config"]["r"])
    if not intervals:
        return None
    layer, var = harness.plots.plot_intervals(intervals, RESULTS / f"{prefix}_fig5_active_intervals.png",
                                              RESULTS / f"{prefix}_fig4_interval_variance.png")
    ffn = [v for l, v in var.items() if is_ffn(l)]
    att = [v for l, v in var.items() if not is_ffn(l)]
    if not (ffn and att):
        return layer, "- Fig. 4 (FFN vs attention): no reading, the run has only one kind of layer."
    return layer, (f"- Lower variance of active-interval length in feed-forward than in attention layers (Fig. 4): mean "
                   f"per-layer variance {np.mean(ffn):.0f} (feed-forward) vs {np.mean(att):.0f} (attention), steps², "
                   f"one seed: **{'confirmed' if np.mean(ffn) < np.mean(att) else 'not confirmed'}** in this run.")


def ablation_runs():
    """{run name: metrics of its SRLoRA run} for the ablation suite, plus DEFAULT from the text suite."""
    runs = dict(load("ablations"))
    text = load("text").get(f"seed{SEEDS[0]}")
    if text:
        runs[DEFAULT] = text
    return {name: {**next(m for m in run["metrics"] if m["method"] == "srlora"),
                   "early": early_loss(run["records"], "srlora", run["config"]["max_steps"])}
            for name, run in runs.items()}


def plot_ablations(runs, metric, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = [(g, [n for n in names if n in runs]) for g, names in ABLATION_GROUPS.items()]
    groups = [(g, n) for g, n in groups if len(n) > 1]
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(3.0 * len(groups), 3.4), squeeze=False, sharey=True)
    for ax, (group, names) in zip(axes[0], groups):
        values = [100 * runs[n]["dev"][metric] for n in names]
        ax.bar([ABLATION_LABELS[n] for n in names], values,
               color=["tab:gray" if n == DEFAULT else "tab:orange" for n in names])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_title(group, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    lo = min(100 * r["dev"][metric] for r in runs.values())
    axes[0][0].set_ylim(max(0, lo - 5), None)
    axes[0][0].set_ylabel(f"dev {metric} x100 (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- RESULTS.md -------------------------------------------------------------------------------

NAMES = {"lora": "LoRA", "pissa": "PiSSA", "srlora": "SRLoRA", "srlora-relative": "SRLoRA, --score=relative",
         "lora-rt": "LoRA at rank r_target"}
ROWS = tuple(NAMES)
SHORT_TITLES = {"text": "MiniLM-L6, tweets", "text-long": "MiniLM-L6, tweets, 600 steps", "vision": "DINOv2-S/14, MNIST",
                "small-r": "MiniLM-L6, tweets, r=2", "long-r4": "MiniLM-L6, tweets, r=4, 1,000 steps"}
SUITE_TITLES = {"text": "Text: all-MiniLM-L6-v2 on positive vs negative tweets",
                "text-long": "Text, 600 steps: PiSSA against SRLoRA",
                "vision": "Vision: DINOv2 ViT-S/14 on MNIST",
                "small-r": "Text, small rank: r=2, r_target=16",
                "long-r4": "Text, 1,000 steps at small rank: r=4, r_target=32 (8r)"}


def judged(claim, xs, ys, **kw):
    """claim(mean_sd(xs), mean_sd(ys)) (verdict or comparable), or no reading when either side ran
    on one seed: its sd of 0 is no spread to judge a difference by."""
    if min(len(xs), len(ys)) < 2:
        return "no reading (one seed on one side, no spread)"
    return claim(mean_sd(xs), mean_sd(ys), **kw)


def comparable(s, o):
    """Reading of a 'comparable scores' claim (Table 3): confirmed when SRLoRA is within the seed
    spread of the other method or better than it, not confirmed when it is worse beyond it."""
    (ms, ss), (mo, so) = s, o
    if ss == so == 0.0:
        return "no reading (one seed has no spread)"
    if abs(ms - mo) <= (ss ** 2 + so ** 2) ** 0.5:
        return "confirmed (the difference is within the seed spread)"
    return "confirmed (SRLoRA is better beyond the seed spread)" if ms > mo else \
        "not confirmed (SRLoRA is worse beyond the seed spread)"


def setup_line(config, runs):
    keys = ("max_steps", "batch_size", "lr", "optimizer", "schedule", "warmup", "r", "alpha", "r_target", "gamma")
    seeds = sorted({r["config"]["seed"] for r in runs.values()})
    return (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); the same settings "
            f"and data order for every method: " + ", ".join(f"{k}={config[k]}" for k in keys if k in config) + ".")


def suite_section(suite, runs, command):
    config = next((r["config"] for r in runs.values() if any(m["method"] == "srlora" for m in r["metrics"])),
                  next(iter(runs.values()))["config"])                      # the settings SRLoRA ran with
    table = method_table(runs)
    metric = next(iter(next(iter(table.values()))["dev"]))
    out = [f"## {SUITE_TITLES[suite]}", "", f"Command: `{command}`", "", setup_line(config, runs), "",
           f"| method | dev {metric} x100 at the best-dev-loss step | dev loss | mean training loss, first 25% of steps |",
           "|---|---|---|---|"]
    for method in ROWS:
        if method in table:
            t = table[method]
            n, n_all = len(t["dev_loss"]), len({r["config"]["seed"] for r in runs.values()})
            seeds = "" if n == n_all else " (1 seed, no spread)" if n == 1 else f" ({n} seeds)"
            out.append(f"| {NAMES[method]}{seeds} | {fmt(*mean_sd(t['dev'][metric]))} | {fmt(*mean_sd(t['dev_loss']), 1, 4)} "
                       f"| {fmt(*mean_sd(t['early']), 1, 4)} |")
    first_switch = [min(r["step"] for r in run["records"] if r["event"] == "switch")
                    for run in runs.values() if any(r["event"] == "switch" for r in run["records"])] or [None]
    out += ["", "Mean ± sample standard deviation over seeds. SRLoRA and PiSSA share their initialisation and data "
            f"order, so they are identical until SRLoRA's first switch (step {first_switch[0]} of {config['max_steps']})"
            + ("; LoRA starts from Kaiming A and zero B." if "lora" in table or "lora-rt" in table else ".")
            + (f" LoRA at rank r_target ran with r = alpha = {config['r_target']} (scaling 1), all else the same."
               if "lora-rt" in table else ""), "",
            f"![training loss, mean and one sd over seeds](results/{suite}_fig3_train_loss.png)", ""]
    plot_losses(runs, DOCS / "results" / f"{suite}_fig3_train_loss.png",
                f"{SHORT_TITLES[suite]}: training loss, mean ± sd over "
                f"{len({r['config']['seed'] for r in runs.values()})} seeds")
    readings = []
    s = table.get("srlora")
    for other in ("lora", "pissa"):
        o = table.get(other)
        if not (s and o):
            continue
        readings.append(f"- Faster early training-loss reduction than {NAMES[other]} (Fig. 3; mean training loss over "
                        f"the first 25% of steps, {fmt(*mean_sd(s['early']), 1, 4)} vs {fmt(*mean_sd(o['early']), 1, 4)}): "
                        f"**{judged(verdict, s['early'], o['early'], claim_higher=False)}**.")
        if suite != "vision":
            readings.append(f"- Dev {metric} comparable to {NAMES[other]} (Table 3; {fmt(*mean_sd(s['dev'][metric]))} vs "
                            f"{fmt(*mean_sd(o['dev'][metric]))}): **{judged(comparable, s['dev'][metric], o['dev'][metric])}**.")
        elif other == "lora":
            readings.append(f"- Lower MNIST {metric} than LoRA (Table 4: 94.83 vs 98.89; here {fmt(*mean_sd(s['dev'][metric]))} "
                            f"vs {fmt(*mean_sd(o['dev'][metric]))}): "
                            f"**{judged(verdict, s['dev'][metric], o['dev'][metric], claim_higher=False)}**.")
    switching = [r for r in runs.values() if any(e["event"] == "switch" and e["method"] == "srlora" for e in r["records"])]
    first = runs.get(f"seed{SEEDS[0]}") or (switching or list(runs.values()))[0]
    fig = plot_intervals(first, suite)
    if fig:
        layer, note = fig
        readings.append(note)
        out += [f"Seed {first['config']['seed']}, SRLoRA: how long each singular index stayed in the adapter, for "
                f"`{layer}` (cf. the paper's Fig. 5), and the variance of those lengths in every adapted layer "
                f"(cf. Fig. 4).", "",
                f"![active intervals](results/{suite}_fig5_active_intervals.png)", "",
                f"![interval variance per layer](results/{suite}_fig4_interval_variance.png)", ""]
    o, p = table.get("srlora-relative"), table.get("pissa")
    if o and p:
        for name, t in (("SRLoRA", s), ("SRLoRA with --score=relative", o)):
            a, b = mean_sd(t["dev"][metric]), mean_sd(p["dev"][metric])
            readings.append(f"- {name}: higher dev {metric} than PiSSA ({fmt(*a)} vs {fmt(*b)}): "
                            f"**{judged(verdict, t['dev'][metric], p['dev'][metric], claim_higher=True)}**.")
    upper = table.get("lora-rt")
    if upper and s:
        a, b = mean_sd(s["dev"][metric]), mean_sd(upper["dev"][metric])
        readings.append(f"- SRLoRA against LoRA at rank r_target (the upper reference: every direction SRLoRA visits, "
                        f"trained all the time, with r_target / r times the adapter parameters; {fmt(*a)} vs {fmt(*b)}): "
                        f"higher: **{judged(verdict, s['dev'][metric], upper['dev'][metric], claim_higher=True)}**.")
    return out + ["Readings:", ""] + readings + [""]


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


def ablation_section(command):
    runs = ablation_runs()
    if len(runs) < 2:
        return []
    metric = next(iter(next(iter(runs.values()))["dev"]))
    out = ["## Ablations (text task, SRLoRA, seed 0)", "", f"Command: `{command}`", "",
           "One setting changes from the default per row; the default row is the text suite's seed-0 SRLoRA run. "
           "With one seed, a difference smaller than the text suite's seed spread of SRLoRA "
           f"(sd of dev {metric} over seeds, above) is not evidence of an effect.", "",
           f"| setting | dev {metric} x100 | dev loss | mean training loss, first 25% of steps |", "|---|---|---|---|"]
    for name in ABLATION_LABELS:
        if name in runs:
            m = runs[name]
            out.append(f"| {ABLATION_LABELS[name]} | {100 * m['dev'][metric]:.1f} | {m['dev_loss']:.4f} | {m['early']:.4f} |")
    out += same_decisions()
    if plot_ablations(runs, metric, DOCS / "results" / "ablations.png"):
        out += ["", "![ablations](results/ablations.png)"]
    return out + [""]


def switch_decisions(records):
    return [(r["step"], r["layer"], r["slots"]) for r in records if r["event"] == "switch"]


def same_decisions():
    """A note for each ablation run whose switches chose exactly the default run's slots: such a
    run trains identically, and the table shows no effect because there was none to show."""
    text, notes = load("text").get(f"seed{SEEDS[0]}"), []
    if not text:
        return notes
    default = switch_decisions(text["records"])
    for name, run in load("ablations").items():
        mine = switch_decisions(run["records"])
        if mine and mine == default:
            c = run["config"]
            interval = default[0][0]
            forget = max(c["beta1"], c["beta2"]) ** interval
            notes.append(f"\n{ABLATION_LABELS[name]}: every one of its {len(mine)} switch decisions (step, layer, slots) "
                         f"equals the default run's, so the two runs are the same. With beta1 = {c['beta1']} and beta2 = "
                         f"{c['beta2']}, the importance EMAs keep {forget:.1%} of their state after the {interval}-step "
                         f"switch interval, so what a switch resets hardly matters by the next one.")
    return notes


# --- the alternatives of the switch, against the paper's SRLoRA and PiSSA ------------------------

ALTERNATIVE_LABELS = {"relative": "score / magnitude² (`--score=relative`)",
                      "stop0.8": "all switches in the first 80% (`--switch_stop=0.8`)",
                      "adaptive": "adaptive schedule (`--switch_schedule=adaptive`)",
                      "grace1": "grace of one switch (`--grace=1`)"}


def alternative_rows():
    """[(label, dev metric per seed, dev loss per seed, (rotation hits, pairs) or None)]: PiSSA and the
    paper's SRLoRA from the text suite, then each alternative with all its seeds run."""
    text, alts = load("text"), load("alternatives")
    if not text or not alts:
        return []
    metric = next(iter(next(iter(text.values()))["metrics"][0]["dev"]))

    def row(label, runs, method):
        ms = [next(m for m in r["metrics"] if m["method"] == method) for r in runs]
        rot = [dynamics.rotation(r["records"]) for r in runs] if method == "srlora" else []
        switches = [sum(e["event"] == "switch" and e["method"] == method for e in r["records"]) for r in runs]
        return (label, [m["dev"][metric] for m in ms], [m["dev_loss"] for m in ms],
                (sum(h for h, _ in rot), sum(p for _, p in rot)) if rot else None, np.mean(switches) if rot else None)

    rows = [row("PiSSA", list(text.values()), "pissa"), row("SRLoRA, the paper's schedule and score",
                                                            list(text.values()), "srlora")]
    for alt, label in ALTERNATIVE_LABELS.items():
        runs = [alts[f"{alt}-seed{s}"] for s in SEEDS if f"{alt}-seed{s}" in alts]
        if runs:
            rows.append(row(label, runs, "srlora"))
    return metric, rows


def plot_alternatives(rows, metric, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (label, dev, *_) in enumerate(rows):
        m, sd = mean_sd(dev)
        ax.bar(i, 100 * m, yerr=100 * sd, capsize=4, color="tab:gray" if i == 0 else "tab:blue" if i == 1 else
               "tab:orange")
        ax.scatter([i] * len(dev), [100 * v for v in dev], color="black", s=10, zorder=3)
    ax.set_xticks(range(len(rows)), [label.split(" (")[0] for label, *_ in rows], rotation=20, ha="right", fontsize=7)
    lo = min(100 * v for _, dev, *_ in rows for v in dev)
    ax.set_ylim(lo - 3, None)
    ax.set(ylabel=f"dev {metric} x100", title="Switch alternatives: mean ± sd over seeds, dots are seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def alternatives_section():
    got = alternative_rows()
    if not got:
        return []
    metric, rows = got
    pissa, paper = (mean_sd(rows[0][1]), mean_sd(rows[1][1]))
    out = ["## Alternatives of the switch, each alone (text task, r=8, r_target=32, 200 steps)", "",
           f"Command: `{COMMANDS['alternatives']}` (PiSSA and the paper's SRLoRA rows are the text suite's runs, "
           "with the same seeds, settings and data order).", "",
           f"| variant | seeds | dev {metric} x100 | dev loss | switches per run | rotation | higher than PiSSA | "
           "higher than the paper's SRLoRA |", "|---|---|---|---|---|---|---|---|"]
    for i, (label, dev, loss, rot, switches) in enumerate(rows):
        a = mean_sd(dev)
        read = lambda b: "no reading (1 seed)" if len(dev) < 2 else verdict(a, b, True).split(" (")[0]  # noqa: E731
        vs_p, vs_s = "" if i == 0 else read(pissa), "" if i <= 1 else read(paper)
        rotation = f"{rot[0]} / {rot[1]} ({rot[0] / rot[1]:.0%})" if rot and rot[1] else "–"
        out.append(f"| {label} | {len(dev)} | {fmt(*a)} | {fmt(*mean_sd(loss), 1, 4)} | {'–' if switches is None else f'{switches:.0f}'} | {rotation} | "
                   f"{vs_p} | {vs_s} |")
    plot_alternatives(rows, metric, RESULTS / "alternatives.png")
    better = [label for label, dev, *_ in rows[2:] if len(dev) > 1 and verdict(mean_sd(dev), pissa, True) == "confirmed"]
    out += ["", "![alternatives](results/alternatives.png)", "",
            "Switches per run: layer switches (one layer recycling r' slots), mean over seeds; the fixed schedule "
            "makes N_switch of them in each of the 36 adapted layers. Rotation: consecutive switches of a layer "
            "(summed over seeds) that recycled exactly the slots refilled at the one before. "
            + (f"Beyond the seed spread above PiSSA: {', '.join(better)}." if better else
               "No alternative is above PiSSA by more than the seed spread."), ""]
    return out


# --- SRLoRA against PiSSA, setting by setting ------------------------------------------------------

# Suites whose runs took the top singular directions with the randomized SVD that svd="auto" used at
# MiniLM's width before it became the exact SVD up to 1,024 wide.
RANDOMIZED_BASIS = {"text-long", "vision", "ablations", "small-r", "small-r-relative"}


def dev_by_method(runs, metric):
    """{method: [dev metric of each run that trained it]}."""
    return {method: t["dev"][metric] for method, t in method_table(runs).items()}


def regime_rows():
    """One dict per text setting where both PiSSA and SRLoRA ran on at least two seeds: r, r_target,
    steps, suite, whether its basis was randomized, and the dev metric of each seed's PiSSA, SRLoRA
    and (where run) SRLoRA with the relative score."""
    text = load("text")
    sweep = renamed("rank-sweep", {"r1-momreset": "srlora-momreset"})
    pick = lambda prefix: {n: r for n, r in sweep.items() if n.startswith(prefix)}  # noqa: E731
    settings = [("rank-sweep", pick("r1-"), pick("r1-")),
                ("small-r", with_alternative(load("small-r"), "small-r-relative", "srlora-relative"), None),
                ("long-r4", renamed("long-r4", {"relative": "srlora-relative", "lora32": "lora-rt"}), None),
                ("text", {**text, **{f"alternatives/{n}": r for n, r in renamed("alternatives", {
                    "relative": "srlora-relative"}).items() if n.startswith("relative-")}}, None),
                ("text-long", load("text-long"), None),
                ("rank-sweep", {**{n: r for n, r in text.items()}, **pick("r8rt64-")}, pick("r8rt64-"))]
    rows = []
    for suite, runs, srlora_runs in settings:
        if not runs:
            continue
        metric = next(iter(next(iter(runs.values()))["metrics"][0]["dev"]))
        dev = dev_by_method(runs, metric)
        if srlora_runs is not None:
            dev["srlora"] = dev_by_method(srlora_runs, metric).get("srlora", [])
        if len(dev.get("pissa", [])) < 2 or len(dev.get("srlora", [])) < 2:
            continue
        c = next(r["config"] for r in (srlora_runs or runs).values()
                 if any(m["method"] == "srlora" for m in r["metrics"]))
        rows.append({"r": c["r"], "r_target": c["r_target"], "gamma": c["gamma"], "steps": c["max_steps"],
                     "suite": suite, "randomized": suite in RANDOMIZED_BASIS, "pissa": dev["pissa"],
                     "srlora": dev["srlora"], "relative": dev.get("srlora-relative", []), "momreset": dev.get("srlora-momreset", [])})
    return sorted(rows, key=lambda w: (w["r"], w["r_target"], w["steps"]))


def plot_regimes(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, w in enumerate(rows):
        (ms, ss), (mp, sp) = mean_sd(w["srlora"]), mean_sd(w["pissa"])
        ax.errorbar(i, 100 * (ms - mp), yerr=100 * (ss ** 2 + sp ** 2) ** 0.5, fmt="o", capsize=4, color="tab:blue",
                    label="SRLoRA − PiSSA, ± seed spread" if i == 0 else None)
        if len(w["relative"]) > 1:
            mr, sr = mean_sd(w["relative"])
            ax.errorbar(i + 0.15, 100 * (mr - mp), yerr=100 * (sr ** 2 + sp ** 2) ** 0.5, fmt="s", capsize=4,
                        color="tab:orange", label="SRLoRA --score=relative − PiSSA" if not any(
                            len(v["relative"]) > 1 for v in rows[:i]) else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"r={w['r']}, r_t={w['r_target']}\n{w['steps']} steps" for w in rows], fontsize=7)
    ax.set(ylabel="dev accuracy difference x100", title="Text task: SRLoRA against PiSSA in every setting run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def regime_section():
    rows = regime_rows()
    if not rows:
        return []
    out = ["## SRLoRA against PiSSA, setting by setting (text task)", "",
           "Every text setting where both ran on at least two seeds, with the same seeds, data order and "
           "initialisation (SRLoRA equals PiSSA until its first switch). *Spread*: sqrt(sd_SRLoRA² + sd_PiSSA²), "
           "the bar a difference must clear to count.", "",
           "| r | r_target | steps | suite | PiSSA | SRLoRA | SRLoRA − PiSSA | spread | SRLoRA higher | "
           "relative score − PiSSA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        (ms, ss), (mp, sp) = mean_sd(w["srlora"]), mean_sd(w["pissa"])
        rel = ""
        if len(w["relative"]) > 1:
            mr, sr = mean_sd(w["relative"])
            rel = (f"{100 * (mr - mp):+.1f} ({len(w['relative'])} seeds; "
                   f"{verdict((mr, sr), (mp, sp), True).split(' (')[0]})")
        seeds = f"{len(w['pissa'])} / {len(w['srlora'])}"
        out.append(f"| {w['r']} | {w['r_target']} | {w['steps']} | {w['suite']}{' †' if w['randomized'] else ''} | "
                   f"{fmt(*mean_sd(w['pissa']))} | {fmt(ms, ss)} | {100 * (ms - mp):+.1f} | "
                   f"{100 * (ss ** 2 + sp ** 2) ** 0.5:.1f} | {verdict((ms, ss), (mp, sp), True).split(' (')[0]} "
                   f"({seeds} seeds) | {rel} |")
    plot_regimes(rows, RESULTS / "regimes.png")
    wins = [w for w in rows if verdict(mean_sd(w["srlora"]), mean_sd(w["pissa"]), True) == "confirmed"]
    losses = [w for w in rows if verdict(mean_sd(w["srlora"]), mean_sd(w["pissa"]), True) == "not confirmed"]
    out += ["", "† the top singular directions came from the randomized SVD that `auto` used at this width then "
            "(see the top of this page).", "", "![SRLoRA minus PiSSA](results/regimes.png)", "",
            f"SRLoRA is above PiSSA by more than the seed spread in {len(wins)} of {len(rows)} settings"
            + (" (" + ", ".join(f"r={w['r']}, r_target={w['r_target']}, {w['steps']} steps" for w in wins) + ")"
               if wins else "") + f", and below it by more than the spread in {len(losses)}"
            + (" (" + ", ".join(f"r={w['r']}: {100 * (mean_sd(w['srlora'])[0] - mean_sd(w['pissa'])[0]):+.1f}"
                                for w in losses) + ")" if losses else "") + ".", ""]
    one = next((w for w in rows if w["r"] == 1), None)
    if one:
        out += [f"At r = 1 a switch recycles {n_recycle(1, one['gamma'])} of 1 slot: the adapter's only pair is fused into W and refilled "
                "from the next, smaller singular direction at every switch, so no direction trains for more than "
                "one interval and nothing is kept."]
        if len(one["momreset"]) > 1:
            m = mean_sd(one["momreset"])
            out[-1] += (f" With Adam's second moment of the recycled slot zeroed as well (`--moments=reset`; the "
                        f"default keeps it, so a refilled pair smaller than the one before takes smaller steps), "
                        f"SRLoRA reached {fmt(*m)} ({len(one['momreset'])} seeds) against {fmt(*mean_sd(one['srlora']))} "
                        f"with the default and PiSSA's {fmt(*mean_sd(one['pissa']))}: higher than the default: "
                        f"**{judged(verdict, one['momreset'], one['srlora'], claim_higher=True)}**; against PiSSA: "
                        f"**{judged(comparable, one['momreset'], one['pissa']).replace('SRLoRA', 'it')}**.")
        out += [""]
    return out


# --- the dynamics: what the switches did, in every SRLoRA run ---------------------------------

SWITCH_OPTIONS = ("reset", "moments", "score", "grace", "switch_stop", "switch_schedule")
SWITCH_DEFAULTS = {"reset": "recycled", "moments": "keep", "score": "paper", "grace": 0, "switch_stop": 1.0,
                   "switch_schedule": "fixed"}
ROTATION_SUITES = ("text", "text-long", "vision", "small-r", "small-r-relative", "ablations", "dynamics",
                   "alternatives", "long-r4", "rank-sweep", "bf16")


def setting(config):
    """r, r_target, gamma and every switch option that differs from the paper's default."""
    changed = [f"{k}={config[k]}" for k in SWITCH_OPTIONS if k in config and config[k] != SWITCH_DEFAULTS[k]]
    return ", ".join([f"r={config['r']}", f"r_target={config['r_target']}", f"gamma={config['gamma']}", *changed])


def rotation_rows():
    rows = []
    for suite in ROTATION_SUITES:
        for name, run in load(suite).items():
            hits, pairs = dynamics.rotation(run["records"])
            if not pairs:
                continue
            c, d = run["config"], dynamics.dwell(run["records"])
            judged = sum(v for key, v in d.items() if key != "last")
            kept, total = dynamics.initial_kept(run["records"], c["r"])
            chance = 1 / math.comb(c["r"], n_recycle(c["r"], c["gamma"]))
            rows.append({"run": f"{suite}/{name}", "setting": setting(c), "hits": hits, "pairs": pairs,
                         "chance": chance, "one": d[1], "judged": judged, "end": d["end"], "kept": kept,
                         "total": total})
    return rows


def plot_scores(records, path):
    """Pair score against pair magnitude at every switch after the first, for one run: the slots
    refilled one switch earlier against the kept ones."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = {True: [], False: []}
    for events in dynamics.switches_by_layer(records).values():
        for before, now in zip(events, events[1:]):
            for k, (sc, n) in enumerate(zip(now["scores"], now["norms"])):
                pts[k in before["slots"]].append((n, sc))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for new, color, label in ((False, "tab:blue", "kept slots"), (True, "tab:orange", "refilled one switch earlier")):
        xy = np.array(pts[new])
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.4, color=color, label=label)
    ax.set(xscale="log", yscale="log", xlabel="pair magnitude scaling·|B_k|·|A_k| at the switch",
           ylabel="pair score S_k (Eq. 7)", title="What the switch ranks: score against magnitude")
    ax.legend(markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dynamics_section():
    rows = rotation_rows()
    if not rows:
        return []
    out = ["## How the switches behave, in every SRLoRA run", "",
           "Read from each run's switch events. *Rotation*: over every layer's consecutive switches, how many "
           "recycled exactly the set of slots refilled at the switch before (choosing r' of r slots at random "
           "would do so with probability 1 / C(r, r'), the *chance* column). *Stayed one interval*: of the "
           "directions brought in before a layer's last switch, how many were fused out at the very next switch. "
           "*Outlived all*: how many of them were never fused out. *Top-r kept*: of the r directions each layer "
           "started with (PiSSA's), how many were never fused out.", "",
           "| run | setting | rotation | chance | stayed one interval | outlived all | top-r kept |",
           "|---|---|---|---|---|---|---|"]
    for w in rows:
        out.append(f"| {w['run']} | {w['setting']} | {w['hits']} / {w['pairs']} ({w['hits'] / w['pairs']:.0%}) | "
                   f"{w['chance']:.1%} | {w['one']} / {w['judged']} ({w['one'] / max(w['judged'], 1):.0%}) | "
                   f"{w['end']} | {w['kept']} / {w['total']} |")
    paper = [w for w in rows if w["setting"] == "r=8, r_target=32, gamma=0.5"]
    if paper and min(w["hits"] / w["pairs"] for w in paper) > 0.5:
        out += ["", f"In every run with the paper's settings (r=8, r_target=32, gamma=0.5; {len(paper)} runs), at least "
                f"{min(w['hits'] / w['pairs'] for w in paper):.0%} of switches recycle exactly the slots refilled at the "
                f"switch before, against {paper[0]['chance']:.1%} by chance, and at least "
                f"{min(w['one'] / w['judged'] for w in paper):.0%} of brought-in directions leave after one interval. "
                "So SRLoRA, as the paper specifies it, trains the r − r' directions that survive the first switch, "
                "PiSSA's strongest, for the whole run, plus r' slots that take a new direction at every switch and "
                "fuse it out at the next one.", ""]
    else:
        out += [""]
    return out + causes_section()


def causes_section():
    runs = load("dynamics")
    default = runs.get("default")
    if not default or "scores" not in next(e for e in default["records"] if e.get("event") == "switch"):
        return []
    out = ["## What drives the rotation", "",
           f"Command: `{COMMANDS['dynamics']}` (SRLoRA alone, text task, seed 0; each switch event also logs the "
           "r pair scores S_k of Eq. (7) that the switch ranked and each pair's magnitude scaling·|B_k|·|A_k|, "
           "which is its singular value when it is brought in).", "",
           "At each switch after a layer's first: *score ratio* = mean score of the slots refilled one switch "
           "earlier / mean score of the kept slots; *ratio of score / magnitude²* the same for the score divided "
           "by the pair's magnitude squared; *magnitude ratio* the same for the magnitudes. Medians over layers and "
           "switches. *Slope*: least-squares slope of log score against log magnitude among the r slots of one layer at one switch, pooled over layers and switches. "
           "*Rotation if ranked by score / magnitude²*: the rotation statistic had each logged switch ranked the "
           "same state by score / magnitude² instead (one switch at a time, not a re-run).", "",
           "| run | setting | switch interval (steps) | score ratio | ratio of score / magnitude² | magnitude ratio "
           "| slope | rotation | rotation if ranked by score / magnitude² | dev accuracy x100 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    stats = {}
    for name, run in runs.items():
        raw, per_mag2, mag, slope = dynamics.score_gaps(run["records"])
        if not len(raw):
            continue
        c = run["config"]
        steps = sorted({e["step"] for e in run["records"] if e.get("event") == "switch"})
        interval = steps[1] - steps[0] if len(steps) > 1 else steps[0]
        hits, pairs = dynamics.rotation(run["records"])
        cf = dynamics.counterfactual_rotation(run["records"])
        stats[name] = {"raw": float(np.median(raw)), "mag2": float(np.median(per_mag2)), "mag": float(np.median(mag)),
                       "slope": slope, "rot": hits / pairs, "cf": cf[0] / cf[1], "interval": interval, "config": c}
        out.append(f"| {name} | {setting(c)} | {interval} | {np.median(raw):.3f} | {np.median(per_mag2):.2f} | "
                   f"{np.median(mag):.2f} | {slope:.2f} | {hits} / {pairs} ({hits / pairs:.0%}) | "
                   f"{cf[0]} / {cf[1]} ({cf[0] / cf[1]:.0%}) | "
                   f"{100 * next(iter(run['metrics'][0]['dev'].values())):.1f} |")
    plot_scores(default["records"], RESULTS / "dynamics_scores.png")
    out += ["", "![score against magnitude](results/dynamics_scores.png)", "", "Readings:", ""]
    out += cause_readings(stats, runs)
    return out + [""]


# --- the synthetic mechanism benchmark -------------------------------------------------------

SYNTHETIC_NAMES = {"lora": "LoRA(r)", "pissa": "PiSSA(r)", "srlora": "SRLoRA(r, r_target)",
                   "lora_rt": "LoRA(r_target)"}


def synthetic_name(method):
    if method in SYNTHETIC_NAMES:
        return SYNTHETIC_NAMES[method]
    return f"SRLoRA(r, r_target), {method.removeprefix('srlora_').replace('_', ' ')}"


def synthetic_best(data):
    """{(kind, R, method): the row of the learning rate with the lowest mean test loss over seeds}."""
    best = {}
    for row in data["runs"]:
        key = (row["kind"], row["R"], row["method"])
        if key not in best or np.mean(row["test_loss"]) < np.mean(best[key]["test_loss"]):
            best[key] = row
    return best


def plot_synthetic(best, kinds, ranks, methods, path):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 7), squeeze=False)
    for j, kind in enumerate(kinds):
        for method in methods:
            for i, key in enumerate(("test_loss", "erank")):
                ys = [best[(kind, R, method)][key] for R in ranks]
                axes[i][j].errorbar(ranks, [np.mean(y) for y in ys], yerr=[np.std(y, ddof=1) for y in ys],
                                    marker="o", capsize=3, label=synthetic_name(method))
        axes[0][j].set(xscale="log", yscale="log", title=f"{kind} rank-R change", ylabel="test loss (MSE to teacher)")
        axes[1][j].set(xscale="log", xlabel="R, rank of the teacher's change per layer",
                       ylabel="effective rank of W_final - W0")
        for ax in axes[:, j]:
            ax.set_xticks(ranks, [str(R) for R in ranks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def synthetic_section():
    path = RESULTS / "synthetic" / "results.json"
    if not path.exists():
        return ["## The mechanism, isolated: a synthetic rank-R task", "",
                "Not run yet: `python experiments/synthetic.py`.", ""]
    data = json.loads(path.read_text())
    c, best = data["config"], synthetic_best(data)
    kinds, ranks = c["kinds"].split(","), [int(R) for R in c["ranks"].split(",")]
    methods = c["methods"].split(",")
    out = ["## The mechanism, isolated: a synthetic rank-R task", "",
           "Command: `python experiments/synthetic.py` (see its docstring for the construction). A "
           f"{c['depth']}-layer tanh MLP of width {c['d']} whose weights have a decaying spectrum plays the pretrained "
           "model; the teacher adds a rank-R change to every layer, either in random directions or inside the "
           "pretrained weights' top-R singular subspace (*principal*), with the same Frobenius norm for every R. "
           f"Adapters on every layer, r={c['r']}, r_target={c['r_target']}, gamma={c['gamma']}, {c['steps']} Adam steps "
           f"of batch {c['batch']} on fresh Gaussian inputs, linear decay after {c['warmup']} warm-up steps; "
           + (f"learning rate {c['lrs']} for every method" if "," not in c["lrs"] else
              f"learning rate per method the best of {c['lrs']} by the mean test loss") +
           f"; {c['seeds']} seeds (each seed draws its own network and teacher). Test loss: mean squared error to the teacher on 4,096 held-out inputs "
           "(before training it is the *start* column). Effective rank of ΔW = W_final − W0: exp of the entropy "
           "of its normalised singular values (Roy and Vetterli, 2007), averaged over layers.", ""]
    check = RESULTS / "synthetic" / "lr_check" / "results.json"
    if check.exists():
        lc = json.loads(check.read_text())
        cc, rows = lc["config"], synthetic_best(lc)
        out += [f"Learning-rate check (`python experiments/synthetic.py --seeds={cc['seeds']} --ranks={cc['ranks']} "
                f"--kinds={cc['kinds']} --lrs={cc['lrs']} --methods={cc['methods']} "
                "--out=docs/results/synthetic/lr_check`): the best learning rate of each method was "
                + ", ".join(f"{synthetic_name(r['method'])} {r['lr']:g}" for r in rows.values()) + ".", ""]
    for kind in kinds:
        out += [f"**{kind} change.** Test loss ×1000, mean ± sd over seeds (best learning rate), and effective rank of ΔW.", "",
                "| method | " + " | ".join(f"R={R} loss | R={R} eff. rank" for R in ranks) + " |",
                "|---|" + "---|---|" * len(ranks)]
        start = [np.mean(best[(kind, R, methods[0])]["start_loss"]) for R in ranks]
        out.append("| start (W0) | " + " | ".join(f"{1000 * s:.1f} | 0" for s in start) + " |")
        for method in methods:
            cells = []
            for R in ranks:
                row = best[(kind, R, method)]
                cells += [fmt(*mean_sd(row["test_loss"]), 1000, 1), f"{np.mean(row['erank']):.1f}"]
            out.append(f"| {synthetic_name(method)} | " + " | ".join(cells) + " |")
        out.append("")
    plot_synthetic(best, kinds, ranks, methods, RESULTS / "synthetic.png")
    out += ["![synthetic benchmark](results/synthetic.png)", "",
            "Readings: the claim \"A has a lower test loss than B\", by the rule above (seed spread "
            "sqrt(sd_A² + sd_B²)). *Best variant*: the SRLoRA variant with the lowest mean loss, against the "
            "paper's SRLoRA.", "",
            "| change | R | SRLoRA < PiSSA(r) | SRLoRA < LoRA(r) | PiSSA(r) < LoRA(r) | best variant < SRLoRA |",
            "|---|---|---|---|---|---|"]
    variants = [m for m in methods if m.startswith("srlora_")]
    short = {"confirmed": "confirmed", "not confirmed": "not confirmed"}
    for kind in kinds:
        for R in ranks:
            loss = {m: mean_sd(best[(kind, R, m)]["test_loss"]) for m in methods}
            cells = [short.get(v, "inconclusive" if v.startswith("inconclusive") else v) for v in
                     (verdict(loss["srlora"], loss["pissa"], False), verdict(loss["srlora"], loss["lora"], False),
                      verdict(loss["pissa"], loss["lora"], False))]
            if variants:
                v = min(variants, key=lambda m: loss[m][0])
                ruling = verdict(loss[v], loss["srlora"], False)
                cells.append(f"{v.removeprefix('srlora_')}: "
                             f"{'inconclusive' if ruling.startswith('inconclusive') else ruling}")
            out.append(f"| {kind} | {R} | " + " | ".join(cells) + " |")
    out.append("")
    loss = lambda kind, R, m: mean_sd(best[(kind, R, m)]["test_loss"])  # noqa: E731
    if "random" in kinds and all(verdict(loss("random", R, "pissa"), loss("random", R, "lora"), False) == "not confirmed"
                                 for R in ranks):
        out.append("- On a random change PiSSA(r) ends worse than LoRA(r) at every R. Its r slots start out holding "
                   "W0's top-r part, which B A must go on carrying, so a change outside that span has to share the "
                   "same r ranks with it; LoRA's r ranks are free. SRLoRA fuses slots into W at its switches and refills "
                   "them from smaller singular directions, so the changes it made accumulate in W and less of the "
                   "adapter goes to carrying W0: this is what recomposition adds over PiSSA.")
    er = {m: [np.mean(best[(k, R, m)]["erank"]) for k in kinds for R in ranks] for m in ("srlora", "lora_rt")}
    out.append(f"- The effective rank of SRLoRA's ΔW is {min(er['srlora']):.0f} to {max(er['srlora']):.0f} over all "
               f"cells (LoRA(r_target): {min(er['lora_rt']):.0f} to {max(er['lora_rt']):.0f}): recomposition does "
               "build a change of rank well above r, and at small R well above what the task needs (it changes "
               "every direction it visits).")
    return out + [""]


def cause_readings(stats, runs):
    """One reading per candidate cause, each from a measurement in the table above or the logs."""
    d = stats["default"]
    c = d["config"]
    closed = math.log(d["mag2"] / d["raw"]) / math.log(1 / d["raw"]) if d["raw"] < 1 else float("nan")
    out = [f"- **(a) The magnitude a slot starts from.** Within a layer's switch, log score grows with log magnitude "
           f"at slope {d['slope']:.2f}. Eq. (3) multiplies each weight by its gradient, and both scale with the pair's "
           "size, so a pure size effect gives 2" + ("; the rest says the larger pairs are also the more useful ones "
                                                    "per unit of size" if d["slope"] > 2.5 else "") + ". A refilled slot starts from a later, smaller singular value (median magnitude "
           f"{d['mag']:.2f} of the kept slots') and scores a median {d['raw']:.3f} of them. Divided by magnitude², "
           f"the ratio is {d['mag2']:.2f}: size accounts for {closed:.0%} of the (log) score gap. Ranked by score / "
           f"magnitude² on the same states, {d['cf']:.0%} of switches would still recycle the slots just refilled "
           f"(instead of {d['rot']:.0%}). **" + ("Confirmed as a cause" if d["slope"] > 1 and d["cf"] < d["rot"] else
                                         "Refuted") + (", not the whole of it" if d["cf"] > 0.1 else "") + ".**"]
    rel = stats.get("score_relative")
    if rel:
        out.append(f"  Re-run with `--score=relative` (the ranking divided by magnitude², from the first switch on): "
                   f"rotation {rel['rot']:.0%} against the default's {d['rot']:.0%}; a refilled slot still scores a median "
                   f"{rel['mag2']:.2f} of the kept ones per magnitude².")
    g = stats.get("grace1")
    if g:
        k = n_recycle(g["config"]["r"], g["config"]["gamma"])
        forced = (g["config"]["grace"] + 1) * k == g["config"]["r"]
        out.append(f"- **(b) The selection effect of keeping the best r − r'.** In the default run a refilled slot is "
                   f"compared with the survivors of every earlier ranking. With `--grace=1`"
                   + (f" and r' = r/2 the choice is forced (the {k} protected slots leave exactly the other {k}), so "
                      "no slot survives as a champion and every slot holds a direction brought in one or two switches "
                      "earlier" if forced else "") +
                   f". There a slot refilled one switch earlier scores a median {g['raw']:.2f} of the others "
                   f"({g['mag2']:.2f} per magnitude²), against {d['raw']:.3f} ({d['mag2']:.2f}) in the default run. "
                   "One interval less of training explains " + ("little" if g["mag2"] > 2 * d["mag2"] else "much") +
                   " of the gap; " + ("**confirmed**: most of it is the advantage of the selected survivors"
                                      if g["mag2"] > 2 * d["mag2"] else "**refuted** as the main driver") +
                   ". (This run started from the exact SVD, today's `svd=\"auto\"` at this width; the others here "
                   "from the randomized one.)")
    else:
        out.append(f"- **(b) The selection effect of keeping the best r − r'.** Per magnitude², the kept slots still "
                   f"outscore a refilled one by {1 / d['mag2']:.1f}x; these logs cannot separate selection from the "
                   "kept slots' longer training. **Not separated.**")
    keep = 1 - max(c["beta1"], c["beta2"]) ** d["interval"]
    reset_all = load("ablations").get("reset_all")
    text0 = load("text").get(f"seed{SEEDS[0]}")
    same = reset_all and text0 and switch_decisions(reset_all["records"]) == switch_decisions(text0["records"])
    line = (f"- **(c) The importance reset.** A reset slot's EMAs start at 0; after the {d['interval']}-step interval "
            f"they have reached 1 − {max(c['beta1'], c['beta2'])}^{d['interval']} = {keep:.1%} of a steady signal. "
            + ("Resetting every slot instead of the recycled ones (`--reset=all`, ablations) gives the same switch "
               "decisions, step for step. " if same else ""))
    short = stats.get("rtarget128")
    if short:
        k = 1 - max(c["beta1"], c["beta2"]) ** short["interval"]
        line += (f"At r_target 128 the interval is {short['interval']} steps ({k:.0%} of a steady signal) and the "
                 f"rotation is {short['rot']:.0%}, with a refilled slot at a median {short['raw']:.3f} of the kept "
                 f"slots' score ({short['mag2']:.2f} per magnitude²). ")
    else:
        short = load("ablations").get("rtarget128")
        if short:
            steps = sorted({e["step"] for e in short["records"] if e.get("event") == "switch"})
            hits, pairs = dynamics.rotation(short["records"])
            short = {"interval": steps[1] - steps[0], "rot": hits / pairs}
            k = 1 - max(c["beta1"], c["beta2"]) ** short["interval"]
            line += (f"At r_target 128 (ablations) the interval is {short['interval']} steps, where the EMAs reach "
                     f"{k:.0%} of a steady signal, and the rotation rises to {hits} / {pairs} ({short['rot']:.0%}). ")
    line += (f"**Refuted at the default interval** (the EMAs have saturated)" +
             ("; **consistent with a cause when the interval is short**, where the reset and the shorter training "
              "of a new slot cannot be told apart." if short and short["rot"] > d["rot"] else "."))
    out.append(line)
    moments = load("ablations").get("moments_reset")
    if moments and text0:
        hm, pm = dynamics.rotation(moments["records"])
        h0, p0 = dynamics.rotation(text0["records"])
        out.append(f"- **(d) The optimizer-moment policy.** Zeroing AdamW's second moment of recycled slots too "
                   f"(`--moments=reset`, ablations) rotates in {hm} / {pm} switches against {h0} / {p0} with the default "
                   f"`keep`. **{'Refuted' if abs(hm - h0) <= 0.05 * p0 else 'Confirmed'}** as a driver "
                   "(a change of at most 5% of the switches counts as none).")
    return out


COMMANDS = {s: f"python experiments/run_results.py --suite {s}" for s in SUITES}


def missing_section():
    """The runs the suites define that have no committed logs (so a reader knows what was not measured)."""
    missing = {name: [run for run in suite["runs"] if not (RESULTS / name / run / "log.jsonl").exists()]
               for name, suite in SUITES.items()}
    missing = {name: runs for name, runs in missing.items() if runs}
    if not missing:
        return []
    return (["## Not run", "", "Runs that the suites define but whose logs are not committed, so nothing above "
             "rests on them (`python experiments/run_results.py --suite <suite> --run <run>` makes one):", ""]
            + [f"- {name}: {', '.join(runs)}" for name, runs in missing.items()] + [""])


def write_report():
    lines = ["# Results", "",
             "Generated by `python experiments/run_results.py --report` from the run logs committed under "
             "`docs/results/` (each run's config.json, metrics.json and log.jsonl). Nothing here is typed by hand: "
             "re-running that command rewrites this file and its plots from those logs.", "",
             "The paper's models and data (DeBERTa-v3-base on GLUE, ViT-B/16 on CIFAR-100) cannot be downloaded "
             "here, so these runs use the real pretrained models and real data that install from PyPI (see the "
             "README), on a 2-core CPU, with short step budgets. They test the paper's claims at small scale; "
             "they do not reproduce its tables. The paper's CIFAR-100 claim (Table 4: SRLoRA 92.51 vs LoRA 90.06) "
             "is untested: no CIFAR-100 is available offline (`train_vit.py --dataset=cifar100 --data_dir=...` "
             "runs it from files on disk).", "",
             "`svd=\"auto\"` is now the exact SVD up to 1,024 wide. The text suite (200 steps), the alternatives, "
             "long-r4 and rank-sweep suites and the `dynamics/grace1` run were made with it. The other MiniLM and DINOv2 runs (text-long, vision, "
             "ablations, small-r, small-r-relative and the other dynamics runs) took the top singular directions "
             "with the randomized SVD (1.5k sketch, 4 power iterations) that `auto` used at these widths when they "
             "ran, so re-running them starts PiSSA and SRLoRA from slightly different (exact) directions.", "",
             "A claimed difference is **confirmed** when it holds by more than the seed spread "
             "(sqrt(sd_a² + sd_b²)), **not confirmed** when the opposite holds by more than that, and "
             "**inconclusive** when the difference is within it.", ""]
    for suite in ("text", "text-long", "vision"):
        runs = load(suite)
        if runs:
            lines += suite_section(suite, runs, COMMANDS[suite])
        else:
            lines += [f"## {SUITE_TITLES[suite]}", "", f"Not run yet: `{COMMANDS[suite]}`.", ""]
    lines += ablation_section(COMMANDS["ablations"])
    lines += regime_section()
    lines += alternatives_section()
    lines += dynamics_section()
    lines += synthetic_section()
    runs = with_alternative(load("small-r"), "small-r-relative", "srlora-relative")
    if runs:
        lines += suite_section("small-r", runs, COMMANDS["small-r"])
        lines += [f"The relative score's runs: `{COMMANDS['small-r-relative']}`.", ""]
    runs = renamed("long-r4", {"relative": "srlora-relative", "lora32": "lora-rt"})
    if runs:
        lines += suite_section("long-r4", runs, COMMANDS["long-r4"])
    lines += missing_section()
    (DOCS / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {DOCS / 'RESULTS.md'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), action="append", default=[],
                        help="run this suite (repeatable), then rewrite the report")
    parser.add_argument("--report", action="store_true", help="only rewrite docs/RESULTS.md and its plots")
    parser.add_argument("--run", action="append", default=[],
                        help="run only this named run of the suite (repeatable), e.g. --run seed1")
    parser.add_argument("extra", nargs="*", help="flags after -- go to every training run")
    args = parser.parse_args()
    if not args.suite and not args.report:
        parser.error("pass --suite text|vision|ablations, or --report")
    for suite in args.suite:
        run_suite(suite, args.extra, args.run)
    write_report()


if __name__ == "__main__":
    main()
