"""Tests for srlora_switch.py, the alternative switch rules: each name states the property."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from srlora import ImportanceTracker, SRLoRALinear, apply_srlora, n_recycle, recompose, switch_steps
from srlora_switch import AdaptiveSchedule, SlotRule, switch_steps_within
from test_srlora import Net, plant_scores, randomize_scores, wrap


def test_each_default_is_the_papers_rule():
    model = apply_srlora(Net(), targets=["query", "value"], r=4, r_target=12)
    tracker = ImportanceTracker(model)
    randomize_scores(tracker, 0)
    for layer in (model.query, model.value):
        assert torch.equal(SlotRule()(tracker, layer, 2), tracker.pair_scores(layer).topk(2, largest=False).indices)
    assert switch_steps_within(1000, 8, 32, 0.5) == switch_steps(1000, 8, 32, 0.5)


@pytest.mark.parametrize("kwargs, match", [(dict(score="nonsense"), "score"), (dict(grace=-1), "grace"),
                                           (dict(grace=0.5), "grace")])
def test_bad_rules_raise_one_line_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlotRule(**kwargs)


@given(st.integers(1, 5000), st.integers(1, 16), st.integers(1, 600), st.sampled_from([0.25, 0.5, 1.0]),
       st.floats(0.05, 1.0))
def test_switch_stop_puts_the_same_switches_evenly_within_the_first_part_of_training(total, r, extra, gamma, stop):
    steps = switch_steps_within(total, r, r + extra, gamma, stop=stop)
    horizon = round(stop * total)
    assert len(steps) == min((extra // n_recycle(r, gamma)), horizon)
    assert all(1 <= s <= horizon for s in steps)
    if steps:
        assert steps == [(horizon // len(steps)) * (i + 1) for i in range(len(steps))]
    assert switch_steps_within(total, r, r + extra, gamma, stop=1.0) == switch_steps(total, r, r + extra, gamma)


@given(st.integers(0, 1000), st.lists(st.floats(0.1, 10.0), min_size=4, max_size=4))
def test_relative_score_does_not_grow_with_the_slot_magnitude(seed, sizes):
    # Four slots on the same rank-1 direction with different magnitudes c_k, under the same
    # gradients: Eq. (7) grows as c_k^4 (I ~ c_k^2, S = Ibar Ubar), the relative score is equal.
    g = torch.Generator().manual_seed(seed)
    layer = SRLoRALinear(nn.Linear(10, 12), r=4, r_target=8)
    model = wrap(layer)
    tracker = ImportanceTracker(model)
    c = torch.tensor(sizes)
    a, b = torch.randn(10, generator=g), torch.randn(12, generator=g)
    with torch.no_grad():
        layer.lora_A.copy_(c[:, None] * a)
        layer.lora_B.copy_(b[:, None] * c)
    for _ in range(3):
        G = torch.randn(12, 10, generator=g)                 # dL/d(Delta W) of a loss linear in Delta W
        layer.lora_B.grad = layer.scaling * G @ layer.lora_A.detach().T
        layer.lora_A.grad = layer.scaling * layer.lora_B.detach().T @ G
        tracker.update()
    relative, paper = SlotRule("relative").ranked(tracker, layer), tracker.pair_scores(layer)
    torch.testing.assert_close(relative, relative[:1].expand(4), rtol=1e-4, atol=0)
    torch.testing.assert_close(paper, relative * (c.square() * a.norm() * b.norm()).square(), rtol=1e-4, atol=0)


@given(st.integers(1, 12), st.sampled_from([0.125, 0.25, 0.5]), st.integers(1, 3), st.integers(0, 1000))
def test_a_refilled_slot_is_not_recycled_within_its_grace_switches(r, gamma, grace, seed):
    layer = SRLoRALinear(nn.Linear(40, 40), r=r, r_target=40, gamma=gamma)
    k = n_recycle(r, gamma)
    model = wrap(layer)
    tracker = ImportanceTracker(model)
    if (grace + 1) * k > r:
        randomize_scores(tracker, seed)
        with pytest.raises(ValueError, match="grace"):
            recompose(model, tracker, select=SlotRule(grace=grace))
        return
    refilled_at = torch.full((r,), -1.0)                      # switch number that refilled each slot
    g = torch.Generator().manual_seed(seed)
    for switch in range(6):
        # The adversarial case: the most recently refilled slots score lowest.
        plant_scores(tracker, layer, 100.0 - refilled_at + torch.rand(r, generator=g) - 100.0 * (refilled_at >= 0))
        events = recompose(model, tracker, select=SlotRule(grace=grace))
        if not events:
            break
        slots = torch.tensor(events[0]["slots"])
        assert ((refilled_at[slots] < 0) | (switch - refilled_at[slots] > grace)).all()
        refilled_at[slots] = switch




# --- adaptive schedule ----------------------------------------------------------------------

@pytest.mark.parametrize("query, value, ratio, expected", [
    ([1.0, 1.0, 1.0, 0.05], [1.0, 1.0, 1.0, 0.2], 0.1, ["query"]),   # mean 0.7625: 0.05 < 0.076, 0.2 is not
    ([1.0, 1.0, 1.0, 0.05], [1.0, 1.0, 1.0, 0.2], 0.3, ["query", "value"]),  # 0.2 < 0.3 * 0.8 = 0.24
    ([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], 0.4, []),           # 1 is not below 0.4 * 2.5; 2 not below 0.8
    ([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], 0.41, ["query"]),   # 1 < 0.41 * 2.5 = 1.025
    ([4.0, 4.0, 4.0, 4.0], [0.0, 9.0, 9.0, 9.0], 1.0, ["value"]),    # all equal: nothing below the mean
])
def test_adaptive_layer_switches_exactly_when_its_lowest_score_falls_below_ratio_times_mean(query, value, ratio,
                                                                                           expected):
    model = apply_srlora(Net(), targets=["query", "value"], r=4, r_target=12)
    tracker = ImportanceTracker(model)
    schedule = AdaptiveSchedule(100, 4, 12, 0.5, ratio=ratio, every=1, min_interval=1)
    plant_scores(tracker, model.query, torch.tensor(query))
    plant_scores(tracker, model.value, torch.tensor(value))
    assert schedule.due(1, tracker) == expected
    assert schedule.due(1, tracker) == [], "min_interval=1: no layer switches twice at one step"


def test_adaptive_schedule_reads_only_the_eligible_slots_under_grace():
    # The lowest score sits in a slot refilled at the last switch: with grace=1 it is not eligible,
    # so the layer waits although its lowest score is far below the mean.
    model = apply_srlora(Net(), targets=["query"], r=4, r_target=12)
    tracker = ImportanceTracker(model)
    plant_scores(tracker, model.query, torch.tensor([1.0, 1.0, 0.5, 0.5]))
    recompose(model, tracker, select=SlotRule(grace=1))          # slots 2, 3 now hold directions 4, 5
    plant_scores(tracker, model.query, torch.tensor([1.0, 1.0, 0.01, 1.0]))
    assert AdaptiveSchedule(100, 4, 12, 0.5, ratio=0.1, every=1, min_interval=1).due(2, tracker) == ["query"]
    graced = AdaptiveSchedule(100, 4, 12, 0.5, ratio=0.1, every=1, min_interval=1, rule=SlotRule(grace=1))
    assert graced.due(2, tracker) == []


def random_adaptive_run(schedule, model, tracker, total, seed, gamma):
    """(step, layer) of every switch when the scores are random at every step."""
    switched = []
    for step in range(1, total + 1):
        randomize_scores(tracker, seed + step)
        for e in recompose(model, tracker, layers=schedule.due(step, tracker), select=schedule.rule):
            switched.append((step, e["layer"]))
    return switched


@given(st.integers(0, 1000), st.integers(20, 200), st.sampled_from([0.25, 0.5]), st.floats(0.3, 1.0),
       st.integers(1, 7), st.integers(0, 1), st.floats(0.3, 1.0))
def test_adaptive_schedule_keeps_the_budget_the_interval_and_the_horizon(seed, total, gamma, ratio, every, grace, stop):
    model = apply_srlora(Net(), targets=["query", "value"], r=4, r_target=12, gamma=gamma)
    tracker = ImportanceTracker(model)
    schedule = AdaptiveSchedule(total, 4, 12, gamma, ratio=ratio, every=every, stop=stop, rule=SlotRule(grace=grace))
    switched = random_adaptive_run(schedule, model, tracker, total, seed, gamma)
    for name, layer in zip(tracker.names, tracker.layers):
        steps = [s for s, nm in switched if nm == name]
        assert len(steps) <= (12 - 4) // n_recycle(4, gamma) and layer.next_index <= 12
        assert all(s % every == 0 and s <= round(stop * total) for s in steps)
        assert all(b - a >= schedule.min_interval for a, b in zip([0] + steps, steps))
        assert layer.next_index == 4 + len(steps) * n_recycle(4, gamma)


def test_adaptive_decisions_resume_identically_from_a_mid_run_checkpoint():
    def fresh():
        model = apply_srlora(Net(seed=3), targets=["query", "value"], r=4, r_target=16)
        tracker = ImportanceTracker(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, tracker, opt, AdaptiveSchedule(60, 4, 16, 0.5, ratio=0.6, every=2)

    def run(model, tracker, opt, schedule, steps, seed):
        torch.manual_seed(seed)
        switched = []
        for step in steps:
            model(torch.randn(8, 12)).pow(2).mean().backward()
            tracker.update()
            opt.step()
            opt.zero_grad()
            names = schedule.due(step, tracker)
            switched += [(step, e["layer"]) for e in recompose(model, tracker, opt, layers=names)]
        return switched

    a = fresh()
    first = run(*a, range(1, 31), seed=1)
    saved = copy.deepcopy([x.state_dict() for x in a])
    b = fresh()
    for x, state in zip(b, saved):
        x.load_state_dict(state)
    later_a, later_b = run(*a, range(31, 61), seed=2), run(*b, range(31, 61), seed=2)
    assert first and later_a and later_a == later_b, (first, later_a, later_b)
    for (na, ta), (nb, tb) in zip(a[0].state_dict().items(), b[0].state_dict().items()):
        assert na == nb and (ta == tb if not torch.is_tensor(ta) else torch.equal(ta, tb)), na
