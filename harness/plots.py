"""The plots a run draws with --plots: the paper's Fig. 3 (training loss per method), Fig. 5 (one
layer's active intervals) and Fig. 4 (per-layer variance of active-interval lengths), read back
from the switch events in the run's log."""
import json
from pathlib import Path

import numpy as np


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
