"""The numbers the report states, computed from the suites' logs: mean ± sd over seeds, the verdict
rules that read a claimed difference against the seed spread, and the rows of each table."""
import math

import numpy as np

import dynamics
from suites import ALTERNATIVE_LABELS, DEFAULT, RANDOMIZED_BASIS, SEEDS, load, renamed, with_alternative
from srlora import n_recycle  # after suites, which puts the repository root on the path


def early_loss(records, method, steps):
    """Mean training loss over the first 25% of steps: the area under the loss curve there,
    divided by its width (the paper's Fig. 3 claim is about this early phase)."""
    pts = [(r["step"], r["loss"]) for r in records if r["event"] == "train" and r["method"] == method
           and r["step"] <= 0.25 * steps]
    s, l = np.array(pts).T
    return float(np.trapezoid(l, s) / (s[-1] - s[0])) if len(s) > 1 else float(l[0])


def mean_sd(xs):
    """Mean and sample standard deviation (0 for one value)."""
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def verdict(a, b, claim_higher):
    """Reading of a claim that a > b (claim_higher) or a < b, from (mean, sd) pairs over seeds."""
    (ma, sa), (mb, sb) = a, b
    if sa == sb == 0.0:
        return "no reading (one seed has no spread)"
    if abs(ma - mb) <= (sa ** 2 + sb ** 2) ** 0.5:
        return "inconclusive (the difference is within the seed spread)"
    return "confirmed" if (ma > mb) == claim_higher else "not confirmed"


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


def dev_by_method(runs, metric):
    """{method: [dev metric of each run that trained it]}."""
    return {method: t["dev"][metric] for method, t in method_table(runs).items()}


def ablation_runs():
    """{run name: metrics of its SRLoRA run} for the ablation suite, plus DEFAULT from the text suite."""
    runs = dict(load("ablations"))
    text = load("text").get(f"seed{SEEDS[0]}")
    if text:
        runs[DEFAULT] = text
    return {name: {**next(m for m in run["metrics"] if m["method"] == "srlora"),
                   "early": early_loss(run["records"], "srlora", run["config"]["max_steps"])}
            for name, run in runs.items()}


def switch_decisions(records):
    """[(step, layer, slots)] of every switch: two runs with equal lists trained identically."""
    return [(r["step"], r["layer"], r["slots"]) for r in records if r["event"] == "switch"]


def switch_interval(records):
    """Steps between a run's first two switches (the first switch's step when it made one)."""
    steps = sorted({e["step"] for e in records if e.get("event") == "switch"})
    return steps[1] - steps[0] if len(steps) > 1 else steps[0]


def alternative_rows():
    """(metric, [(label, dev metric per seed, dev loss per seed, (rotation hits, pairs) or None, mean
    switches per run or None)]): PiSSA and the paper's SRLoRA from the text suite, then each alternative
    with all its seeds run; [] when either suite has no logs."""
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


# The switch options that setting() names when a run changed them, with the paper's value of each.
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
    """One dict per run of ROTATION_SUITES whose SRLoRA switched: its rotation (hits / pairs), the chance
    of a hit, and dynamics.dwell() and initial_kept() counts."""
    rows = []
    for suite in ROTATION_SUITES:
        for name, run in load(suite).items():
            hits, pairs = dynamics.rotation(run["records"])
            if not pairs:
                continue
            c, d = run["config"], dynamics.dwell(run["records"])
            n_judged = sum(v for key, v in d.items() if key != "last")
            kept, total = dynamics.initial_kept(run["records"], c["r"])
            chance = 1 / math.comb(c["r"], n_recycle(c["r"], c["gamma"]))
            rows.append({"run": f"{suite}/{name}", "setting": setting(c), "hits": hits, "pairs": pairs,
                         "chance": chance, "one": d[1], "judged": n_judged, "end": d["end"], "kept": kept,
                         "total": total})
    return rows


def switch_stats(run):
    """Medians over layers and switches of dynamics.score_gaps() for one run, with its switch interval,
    its rotation and the rotation had it ranked by score / magnitude²; None when its log holds no scores."""
    raw, per_mag2, mag, slope = dynamics.score_gaps(run["records"])
    if not len(raw):
        return None
    hits, pairs = dynamics.rotation(run["records"])
    cf = dynamics.counterfactual_rotation(run["records"])
    return {"raw": float(np.median(raw)), "mag2": float(np.median(per_mag2)), "mag": float(np.median(mag)),
            "slope": slope, "hits": hits, "pairs": pairs, "rot": hits / pairs, "cf_hits": cf[0], "cf_pairs": cf[1],
            "cf": cf[0] / cf[1], "interval": switch_interval(run["records"]), "config": run["config"]}


def synthetic_best(data):
    """{(kind, R, method): the row of the learning rate with the lowest mean test loss over seeds}."""
    best = {}
    for row in data["runs"]:
        key = (row["kind"], row["R"], row["method"])
        if key not in best or np.mean(row["test_loss"]) < np.mean(best[key]["test_loss"]):
            best[key] = row
    return best


# --- the LLM suite ---

def llm_final(run, method):
    """The last evaluation of `method` in a run: the end of the shared budget, the same step for
    every method (its learning rate has decayed to 0 there)."""
    evals = [r for r in run["records"] if r["event"] == "eval" and r["method"] == method]
    return evals[-1] if evals else None


def llm_rows(runs):
    """{method: {"seeds": [...], "ppl": [...], "ppl_english": [...], "dw_erank": [...], "curve": {seed: [(step, ppl)]}}}
    from the final evaluation of each method of each run, and its adapter parameter count."""
    rows = {}
    for run in runs.values():
        for metrics in run["metrics"]:
            method = metrics["method"]
            last = llm_final(run, method)
            if last is None:
                continue
            row = rows.setdefault(method, {"seeds": [], "ppl": [], "ppl_english": [], "dw_erank": [], "curve": {},
                                           "params": metrics["params"]["adapter"]})
            seed = run["config"]["seed"]
            row["seeds"].append(seed)
            for key in ("ppl", "ppl_english", "dw_erank"):
                row[key].append(last["dev"][key])
            row["curve"][seed] = [(r["step"], r["dev"]["ppl"], r["dev"]["ppl_english"]) for r in run["records"]
                                  if r["event"] == "eval" and r["method"] == method]
    return rows


def gap_closed(rows, method="srlora", low="lora", high="lora-rt"):
    """Per seed that all three ran: (ppl[low] - ppl[method]) / (ppl[low] - ppl[high]), the fraction
    of the LoRA(r)-LoRA(r_target) held-out perplexity gap that `method` closes (1: all of it)."""
    if not all(m in rows for m in (method, low, high)):
        return []
    by_seed = {m: dict(zip(rows[m]["seeds"], rows[m]["ppl"])) for m in (method, low, high)}
    seeds = sorted(set.intersection(*(set(s) for s in by_seed.values())))
    return [(by_seed[low][s] - by_seed[method][s]) / (by_seed[low][s] - by_seed[high][s]) for s in seeds]
