"""What SRLoRA's switches did, read back from a run's log records (its "switch" events).

rotation()          how often a layer recycles exactly the slots it refilled at the switch before;
dwell()             how many switch intervals each brought-in direction stayed before it was fused out;
score_gaps()        at each switch, the pair scores (Eq. 7) of the slots refilled one switch earlier
                    against those of the kept slots, raw and divided by the pair's magnitude squared;
active_intervals()  how many steps each singular index stayed in the adapter (the paper's Fig. 4 and 5).
score_gaps() needs the "scores" and "norms" that harness/loop.py logs with each switch (switch_diagnostics).
"""
from collections import Counter

import numpy as np

from harness.plots import active_intervals, is_ffn  # noqa: F401  the run's own plots read the log the same way


def switches_by_layer(records, method="srlora"):
    """{layer: its switch events in step order}."""
    layers = {}
    for e in records:
        if e.get("event") == "switch" and e["method"] == method:
            layers.setdefault(e["layer"], []).append(e)
    return layers


def rotation(records):
    """(hits, pairs): over every layer's consecutive switches, how many recycled exactly the set
    of slots refilled at the switch before.  Picking r' of r slots at random would hit 1 / C(r, r')."""
    hits = pairs = 0
    for events in switches_by_layer(records).values():
        for before, now in zip(events, events[1:]):
            pairs += 1
            hits += set(now["slots"]) == set(before["slots"])
    return hits, pairs


def dwell(records):
    """Counter {intervals: directions} for every direction brought in by a switch: 1 means fused out
    at the next switch; "end" means it outlived every later switch; "last" means it came in at the
    layer's last switch, so no switch ever judged it."""
    counts = Counter()
    for events in switches_by_layer(records).values():
        came = {}                                           # singular index -> switch number it came in
        for i, e in enumerate(events):
            for p in e["fused_out"]:
                if p in came:
                    counts[i - came.pop(p)] += 1
            came.update({p: i for p in e["brought_in"]})
        counts["last"] += sum(i == len(events) - 1 for i in came.values())
        counts["end"] += sum(i < len(events) - 1 for i in came.values())
    return counts


def counterfactual_rotation(records):
    """(hits, pairs) of rotation() had each switch ranked the logged scores divided by the pair
    magnitude squared (score="relative") on the same state: one switch at a time, from the logged
    state, not a re-run.  None when the log holds no scores."""
    hits = pairs = 0
    for events in switches_by_layer(records).values():
        for before, now in zip(events, events[1:]):
            if "scores" not in now:
                return None
            s, n = np.array(now["scores"]), np.array(now["norms"])
            pick = set(np.argsort(s / n ** 2, kind="stable")[:len(now["slots"])].tolist())
            pairs += 1
            hits += pick == set(before["slots"])
    return hits, pairs


def initial_kept(records, r):
    """(kept, total): of the r initial (top-r) directions of every switching layer, how many were
    never fused out."""
    layers = switches_by_layer(records)
    gone = sum(len({p for e in events for p in e["fused_out"] if p < r}) for events in layers.values())
    return r * len(layers) - gone, r * len(layers)


def score_gaps(records):
    """Per (layer, switch after the first): mean score of the slots refilled one switch earlier over
    the mean score of the other slots, the same for score / magnitude², and the magnitude ratio.
    Returns three arrays (empty when the log holds no scores), and the slope of log score against
    log magnitude among the slots of one layer at one switch, pooled over all of them (2 if the
    score grows as the magnitude squared)."""
    raw, per_mag2, mag, xs, ys = [], [], [], [], []
    for events in switches_by_layer(records).values():
        for before, now in zip(events, events[1:]):
            if "scores" not in now:
                return np.array([]), np.array([]), np.array([]), float("nan")
            s, n = np.array(now["scores"]), np.array(now["norms"])
            new = np.zeros(len(s), bool)
            new[before["slots"]] = True
            raw.append(s[new].mean() / s[~new].mean())
            per_mag2.append((s / n ** 2)[new].mean() / (s / n ** 2)[~new].mean())
            mag.append(n[new].mean() / n[~new].mean())
            xs += list(np.log(n) - np.log(n).mean())        # within one layer's switch: layers differ in scale
            ys += list(np.log(s) - np.log(s).mean())
    slope = float(np.polyfit(xs, ys, 1)[0]) if len(xs) > 2 else float("nan")
    return np.array(raw), np.array(per_mag2), np.array(mag), slope
