"""The report's figures, drawn from the suites' logs and the rows that stats.py computes, as PNG files."""
import numpy as np

import dynamics
from harness.plots import plot_intervals  # noqa: F401  Fig. 4 and 5, the same as a run's --plots
from stats import mean_sd
from suites import ABLATION_GROUPS, ABLATION_LABELS, DEFAULT


def pyplot():
    """matplotlib.pyplot drawing to files only, so that no display is needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(runs, path, title, methods):
    """Fig. 3: training loss of each of `methods`, mean and one sd over the runs (seeds), with the switch steps."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
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


def plot_ablations(runs, metric, path):
    """One bar chart per ablation group with two or more runs logged; False when there is none."""
    plt = pyplot()
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


def plot_alternatives(rows, metric, path):
    """Dev metric of each row of stats.alternative_rows(), mean ± sd, with each seed as a dot."""
    plt = pyplot()
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


def plot_regimes(rows, path):
    """SRLoRA − PiSSA (and the relative score − PiSSA) in each row of stats.regime_rows(), ± the seed spread."""
    plt = pyplot()
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


def plot_scores(records, path):
    """Pair score against pair magnitude at every switch after the first, for one run: the slots
    refilled one switch earlier against the kept ones."""
    plt = pyplot()
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


def plot_synthetic(best, kinds, ranks, labels, path):
    """Test loss and effective rank of ΔW against R, one column per kind of change, one line per method
    of `labels` ({method: legend label}), from stats.synthetic_best()."""
    import matplotlib.ticker
    plt = pyplot()
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 7), squeeze=False)
    for j, kind in enumerate(kinds):
        for method, label in labels.items():
            for i, key in enumerate(("test_loss", "erank")):
                ys = [best[(kind, R, method)][key] for R in ranks]
                axes[i][j].errorbar(ranks, [np.mean(y) for y in ys], yerr=[np.std(y, ddof=1) for y in ys],
                                    marker="o", capsize=3, label=label)
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


def plot_llm(rows, base, names, curve_path, forget_path):
    """The LLM suite's two figures: held-out far-domain perplexity against steps (mean over seeds,
    starting from the base model's), and English perplexity (forgetting) against far-domain
    perplexity (learning), one point per method (mean ± sd over seeds), the base model's marked."""
    plt = pyplot()
    names = {m: n.replace("`", "") for m, n in names.items()}       # the table's markdown, as plain text
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, row in rows.items():
        curves = list(row["curve"].values())
        n = min(len(c) for c in curves)
        steps = [0] + [c[0] for c in curves[0][:n]]
        ppl = np.array([[base["far"]] + [p for _, p, _ in c[:n]] for c in curves])
        ax.plot(steps, ppl.mean(0), marker="o", ms=3, label=f"{names[method]} ({len(curves)} seed{'s' * (len(curves) > 1)})")
    ax.set(xlabel="step", ylabel="Polish held-out perplexity",
           title="SmolLM2-135M, continued pretraining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(curve_path, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([base["far"]], [base["english"]], marker="x", color="black", label="base model")
    for method, row in rows.items():
        (x, sx), (y, sy) = mean_sd(row["ppl"]), mean_sd(row["ppl_english"])
        ax.errorbar([x], [y], xerr=[sx], yerr=[sy], fmt="o", capsize=3, label=names[method])
    ax.set(xlabel="Polish held-out perplexity (learning; lower is better)",
           ylabel="English perplexity (forgetting; lower is better)",
           title="Forgetting against learning, one point per method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(forget_path, dpi=120)
    plt.close(fig)
