"""Tests for srlora_precision.py: compensated switches of a half-precision residual."""
import copy

import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from srlora import SRLoRALinear, merge_srlora
from srlora_precision import CompensatedSRLoRALinear, compensate
from test_srlora import wrap

compensate_model = compensate        # the drift helper's flag is called compensate too


def test_compensation_buffer_exists_only_for_a_half_precision_residual():
    bf16 = nn.Linear(16, 12).to(torch.bfloat16)
    plain = wrap(SRLoRALinear(copy.deepcopy(bf16), r=2, r_target=6))
    assert not hasattr(plain.layer, "weight_error")                                    # default: bf16 cost
    assert compensate(wrap(SRLoRALinear(copy.deepcopy(bf16), r=2, r_target=6))).layer.weight_error.shape == (12, 16)
    fp32 = compensate(wrap(SRLoRALinear(copy.deepcopy(bf16), r=2, r_target=6, residual_dtype="float32"))).layer
    assert not hasattr(fp32, "weight_error") and "weight_error" not in fp32.state_dict()
    lora = compensate(wrap(SRLoRALinear(copy.deepcopy(bf16), r=2, init="lora"))).layer
    assert not isinstance(lora, CompensatedSRLoRALinear)                                 # LoRA never switches


def test_a_compensated_model_saves_and_loads_its_error_and_merges_like_any_other():
    torch.manual_seed(0)
    make = lambda: compensate(wrap(SRLoRALinear(nn.Linear(16, 12).to(torch.bfloat16), r=2, r_target=6)))  # noqa: E731
    a = make()
    with torch.no_grad():
        a.layer.lora_B.add_(0.1)
    a.layer.recycle(torch.tensor([0]))
    assert a.layer.weight_error.abs().sum() > 0
    b = make()
    b.load_state_dict(a.state_dict(), strict=True)
    assert torch.equal(b.layer.weight_error, a.layer.weight_error) and b.layer.next_index == 3
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = a.layer(x)
    assert type(merge_srlora(a).layer) is nn.Linear
    torch.testing.assert_close(a.layer(x), y, rtol=2e-2, atol=2e-2)


def bf16_drift_after_switches(n_switches, compensate, seed, m=96, n=80, r=4):
    """{N: drift / one rounding}: ||W_eff - W_eff of an fp64 twin|| after N switches, each after a
    training-like change of A and B, over ||round_bf16(W) - W||, one bf16 rounding of the residual."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, n, generator=g) / n ** 0.5)
    k = r // 2
    layer = SRLoRALinear(base.to(torch.bfloat16), r=r, alpha=r, r_target=r + k * max(n_switches))
    twin = copy.deepcopy(layer).double()                     # the same start, switched in fp64
    if compensate:
        layer = compensate_model(wrap(layer)).layer
    drift = {}
    for i in range(1, max(n_switches) + 1):
        with torch.no_grad():
            for name in ("lora_A", "lora_B"):
                step = 0.02 * getattr(twin, name).abs().mean() * torch.randn(getattr(twin, name).shape, generator=g,
                                                                              dtype=torch.float64)
                getattr(layer, name).add_(step.float())
                getattr(twin, name).add_(step)
        slots = torch.randperm(r, generator=g)[:k]
        layer.recycle(slots)
        twin.recycle(slots)
        if i in n_switches:
            one_rounding = (twin.weight.to(torch.bfloat16).double() - twin.weight).norm()
            diff = layer.effective_weight().detach().double() - twin.effective_weight().detach()
            drift[i] = (diff.norm() / one_rounding).item()
    return drift


@settings(max_examples=5)
@given(st.integers(0, 1000))
def test_compensated_bf16_switches_keep_the_drift_at_one_rounding(seed):
    drift = bf16_drift_after_switches((1, 64), compensate=True, seed=seed)
    assert drift[64] <= 1.1 * drift[1] <= 1.1 * 1.05


@settings(max_examples=5)
@given(st.integers(0, 1000))
def test_uncompensated_bf16_drift_grows_like_a_random_walk_of_roundings(seed):
    # Each switch rounds W once, independently: the drift grows as sqrt(N) roundings (measured 8.0 at
    # N = 64), bounded but not constant; compensate() removes the growth.
    drift = bf16_drift_after_switches((1, 16, 64), compensate=False, seed=seed)
    for n_switches, d in drift.items():
        assert 0.7 * n_switches ** 0.5 <= d <= 1.3 * n_switches ** 0.5, (n_switches, d)
