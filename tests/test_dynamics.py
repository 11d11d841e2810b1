"""Properties of the switch-dynamics statistics in experiments/dynamics.py, on simulated switch logs."""
import random
import sys
from pathlib import Path

from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import dynamics  # noqa: E402


def simulate(r, k, n_switch, picks):
    """Switch events of one layer that recycles the k slots chosen by picks(switch, slot -> index)."""
    active, p, events = list(range(r)), r, []
    for i in range(n_switch):
        slots = picks(i, active)
        events.append({"event": "switch", "method": "srlora", "step": 10 * (i + 1), "layer": "q", "slots": slots,
                       "fused_out": [active[s] for s in slots], "brought_in": list(range(p, p + k))})
        for j, s in enumerate(slots):
            active[s] = p + j
        p += k
    return events


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.integers(2, 8), st.integers(0, 10 ** 6))
def test_dwell_accounts_for_every_brought_in_direction(r, n_switch, seed):
    rng = random.Random(seed)
    k = rng.randint(1, r - 1)
    events = simulate(r, k, n_switch, lambda i, active: rng.sample(range(r), k))
    counts = dynamics.dwell(events)
    assert sum(counts.values()) == k * n_switch
    assert counts["last"] == k


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.integers(2, 8))
def test_rotation_counts_switches_that_recycle_the_slots_refilled_before(r, n_switch):
    k = r // 2
    same = simulate(r, k, n_switch, lambda i, active: list(range(k)))              # always the same slots
    assert dynamics.rotation(same) == (n_switch - 1, n_switch - 1)
    assert dynamics.dwell(same)[1] == k * (n_switch - 1)
    alternate = simulate(r, k, n_switch, lambda i, active: list(range(k * (i % 2), k * (i % 2) + k)))
    assert dynamics.rotation(alternate) == (0, n_switch - 1)
    assert dynamics.initial_kept(alternate, r)[0] == (r - 2 * k if n_switch > 1 else r - k)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.integers(1, 8), st.integers(0, 10 ** 6))
def test_active_intervals_fill_every_slot_for_the_whole_run(r, n_switch, seed):
    rng = random.Random(seed)
    k = rng.randint(1, r - 1)
    end = 10 * (n_switch + 1)
    events = simulate(r, k, n_switch, lambda i, active: rng.sample(range(r), k))
    lengths = dynamics.active_intervals(events + [{"event": "train", "method": "srlora", "step": end}], r)["q"]
    assert sorted(lengths) == list(range(r + k * n_switch))           # every index that was ever active
    assert sum(lengths.values()) == r * end                           # r slots, each busy from step 0 to the end


def test_is_ffn_tells_feed_forward_from_attention_maps():
    assert dynamics.is_ffn("bert.encoder.layer.0.intermediate.dense")
    assert dynamics.is_ffn("bert.encoder.layer.0.output.dense")
    assert not dynamics.is_ffn("bert.encoder.layer.0.attention.output.dense")
    assert dynamics.is_ffn("blocks.3.mlp.fc1") and not dynamics.is_ffn("blocks.3.attn.qkv")
