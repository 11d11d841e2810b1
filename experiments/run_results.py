"""Run the results suites and write docs/RESULTS.md with its tables and plots.

    python experiments/run_results.py --suite text        # 3 seeds x {LoRA, PiSSA, SRLoRA}, MiniLM on tweets
    python experiments/run_results.py --suite ablations   # gamma, r_target, optimizer-state and reset policies
    python experiments/run_results.py --suite vision      # 3 seeds x {LoRA, PiSSA, SRLoRA}, DINOv2-S/14 on MNIST
    python experiments/run_results.py --report            # only rebuild RESULTS.md and plots from docs/results/

Each run is the training script itself, run as a subprocess with the flags below.  Its small
outputs (config.json, metrics.json, log.jsonl) are copied to docs/results/<suite>/<run>/; the
report is computed from those files alone, so anyone can regenerate it without re-training.
Extra flags after `--` go to every training run (e.g. `-- --data_dir=glue/RTE --task=rte`).
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import trainlib  # noqa: E402
from trainlib import active_intervals, is_ffn  # noqa: E402

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
    "vision": {"script": "train_vit.py", "flags": [],
               "runs": {f"seed{s}": [f"--seed={s}", f"--methods={METHODS}"] for s in SEEDS}},
    # SRLoRA alone, seed 0, one setting changed from the default per run; the default itself
    # (gamma 0.5, r_target 32 = 4r, moments keep, reset recycled) is the text suite's seed-0 run.
    "ablations": {"script": "train_glue.py", "flags": ["--seed=0", "--method=srlora"],
                  "runs": {"gamma0.25": ["--gamma=0.25"], "gamma0.75": ["--gamma=0.75"],
                           "rtarget16": ["--r_target=16"], "rtarget128": ["--r_target=128"],
                           "moments_reset": ["--moments=reset"], "reset_all": ["--reset=all"]}},
}
DEFAULT = "default"   # the text suite's seed-0 SRLoRA run, standing in for gamma0.5, rtarget32, keep, recycled
ABLATION_GROUPS = {"gamma": ("gamma0.25", DEFAULT, "gamma0.75"),
                   "r_target (2r, 4r, 16r)": ("rtarget16", DEFAULT, "rtarget128"),
                   "Adam 2nd moment at recycle": (DEFAULT, "moments_reset"),
                   "importance reset": (DEFAULT, "reset_all")}
ABLATION_LABELS = {DEFAULT: "default", "gamma0.25": "gamma 0.25", "gamma0.75": "gamma 0.75",
                   "rtarget16": "r_target 16", "rtarget128": "r_target 128",
                   "moments_reset": "reset 2nd moment", "reset_all": "reset all slots"}


def run_suite(name, extra):
    suite = SUITES[name]
    scratch = Path("runs") / "experiments" / name          # relative to ROOT, the runs' working folder
    for run, flags in suite["runs"].items():
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
    for method in METHODS.split(","):
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
    layer, var = trainlib.plot_intervals(intervals, RESULTS / f"{prefix}_fig5_active_intervals.png",
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

NAMES = {"lora": "LoRA", "pissa": "PiSSA", "srlora": "SRLoRA"}
SHORT_TITLES = {"text": "MiniLM-L6, tweets", "text-long": "MiniLM-L6, tweets, 600 steps", "vision": "DINOv2-S/14, MNIST"}
SUITE_TITLES = {"text": "Text: all-MiniLM-L6-v2 on positive vs negative tweets",
                "text-long": "Text, 600 steps: PiSSA against SRLoRA",
                "vision": "Vision: DINOv2 ViT-S/14 on MNIST"}


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
    return (f"{len(runs)} seeds ({', '.join(str(r['config']['seed']) for r in runs.values())}); the same settings "
            f"and data order for every method: " + ", ".join(f"{k}={config[k]}" for k in keys if k in config) + ".")


def suite_section(suite, runs, command):
    config = next(iter(runs.values()))["config"]
    table = method_table(runs)
    metric = next(iter(next(iter(table.values()))["dev"]))
    out = [f"## {SUITE_TITLES[suite]}", "", f"Command: `{command}`", "", setup_line(config, runs), "",
           f"| method | dev {metric} x100 at the best-dev-loss step | dev loss | mean training loss, first 25% of steps |",
           "|---|---|---|---|"]
    for method in METHODS.split(","):
        if method in table:
            t = table[method]
            out.append(f"| {NAMES[method]} | {fmt(*mean_sd(t['dev'][metric]))} | {fmt(*mean_sd(t['dev_loss']), 1, 4)} "
                       f"| {fmt(*mean_sd(t['early']), 1, 4)} |")
    first_switch = [min((r["step"] for r in run["records"] if r["event"] == "switch"), default=None)
                    for run in runs.values()]
    out += ["", "Mean ± sample standard deviation over seeds. SRLoRA and PiSSA share their initialisation and data "
            f"order, so they are identical until SRLoRA's first switch (step {first_switch[0]} of {config['max_steps']})"
            + ("; LoRA starts from Kaiming A and zero B." if "lora" in table else "."), "",
            f"![training loss, mean and one sd over seeds](results/{suite}_fig3_train_loss.png)", ""]
    plot_losses(runs, DOCS / "results" / f"{suite}_fig3_train_loss.png",
                f"{SHORT_TITLES[suite]}: training loss, mean ± sd over {len(runs)} seeds")
    readings = []
    s = table.get("srlora")
    for other in ("lora", "pissa"):
        o = table.get(other)
        if not (s and o):
            continue
        readings.append(f"- Faster early training-loss reduction than {NAMES[other]} (Fig. 3; mean training loss over "
                        f"the first 25% of steps, {fmt(*mean_sd(s['early']), 1, 4)} vs {fmt(*mean_sd(o['early']), 1, 4)}): "
                        f"**{verdict(mean_sd(s['early']), mean_sd(o['early']), claim_higher=False)}**.")
        if suite.startswith("text"):
            readings.append(f"- Dev {metric} comparable to {NAMES[other]} (Table 3; {fmt(*mean_sd(s['dev'][metric]))} vs "
                            f"{fmt(*mean_sd(o['dev'][metric]))}): **{comparable(mean_sd(s['dev'][metric]), mean_sd(o['dev'][metric]))}**.")
        elif other == "lora":
            readings.append(f"- Lower MNIST {metric} than LoRA (Table 4: 94.83 vs 98.89; here {fmt(*mean_sd(s['dev'][metric]))} "
                            f"vs {fmt(*mean_sd(o['dev'][metric]))}): "
                            f"**{verdict(mean_sd(s['dev'][metric]), mean_sd(o['dev'][metric]), claim_higher=False)}**.")
    first = runs[f"seed{SEEDS[0]}"] if f"seed{SEEDS[0]}" in runs else next(iter(runs.values()))
    fig = plot_intervals(first, suite)
    if fig:
        layer, note = fig
        readings.append(note)
        out += [f"Seed {first['config']['seed']}, SRLoRA: how long each singular index stayed in the adapter, for "
                f"`{layer}` (cf. the paper's Fig. 5), and the variance of those lengths in every adapted layer "
                f"(cf. Fig. 4).", "",
                f"![active intervals](results/{suite}_fig5_active_intervals.png)", "",
                f"![interval variance per layer](results/{suite}_fig4_interval_variance.png)", ""]
    return out + ["Readings:", ""] + readings + [""]


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


COMMANDS = {s: f"python experiments/run_results.py --suite {s}" for s in SUITES}


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
    (DOCS / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {DOCS / 'RESULTS.md'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), action="append", default=[],
                        help="run this suite (repeatable), then rewrite the report")
    parser.add_argument("--report", action="store_true", help="only rewrite docs/RESULTS.md and its plots")
    parser.add_argument("extra", nargs="*", help="flags after -- go to every training run")
    args = parser.parse_args()
    if not args.suite and not args.report:
        parser.error("pass --suite text|vision|ablations, or --report")
    for suite in args.suite:
        run_suite(suite, args.extra)
    write_report()


if __name__ == "__main__":
    main()
