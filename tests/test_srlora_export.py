"""Tests of srlora_export.py on a plain torch model (torch alone): the merged state dict and file,
and the PEFT LoRA adapter that holds the whole weight change, truncated or not."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from srlora import apply_srlora, srlora_layers
from srlora_export import _svd_of_change, export_lora_adapter, export_merged, merged_state_dict
from tests.helpers import adapter_file, assert_same_outputs, load_tensors, train


class Net(nn.Module):
    """Two adapted maps and a trainable head, named like a transformer block's."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.query = nn.Linear(48, 64)      # wide enough for the sketched SVD of the weight change
        self.value = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.value(torch.tanh(self.query(x)))))


def call(model, x):
    return model(x)


@pytest.fixture
def trained_net():
    base = Net()
    model = apply_srlora(copy.deepcopy(base), targets=["query", "value"], r=4, r_target=8)
    model.head.requires_grad_(True)
    x, y = torch.randn(32, 48), torch.randint(0, 3, (32,))
    events, _ = train(model, x, y, call, steps=6)
    assert events, "no recompose happened: W never moved"
    return base, model, x


def test_merged_state_dict_is_that_of_merge_srlora_and_leaves_the_model_adapted(trained_net):
    base, model, x = trained_net
    state = merged_state_dict(model)
    from srlora import merge_srlora
    expected = merge_srlora(copy.deepcopy(model)).state_dict()
    assert list(state) == list(expected) == list(base.state_dict())
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0)
    assert len(srlora_layers(model)) == 2


def test_exported_merged_file_loads_strictly_into_a_fresh_model_with_the_same_outputs(trained_net, tmp_path):
    base, model, x = trained_net
    path = export_merged(model, tmp_path / "merged")
    assert path.suffix in (".safetensors", ".pt") and path.exists()
    fresh = Net(seed=1)
    fresh.load_state_dict(load_tensors(path), strict=True)
    with torch.no_grad():
        assert_same_outputs(fresh(x), model(x))
    assert len(srlora_layers(model)) == 2                    # export_merged did not merge in place
    pt = export_merged(model, tmp_path / "merged.pt")       # an explicit .pt is honoured
    assert pt.name == "merged.pt"
    fresh.load_state_dict(torch.load(pt, weights_only=True), strict=True)


def test_adapter_holds_the_whole_weight_change_not_just_the_adapter(trained_net, tmp_path):
    base, model, x = trained_net
    report = export_lora_adapter(model, tmp_path, base)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_tensors(adapter_file(tmp_path))
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["query", "value"]
    assert config["modules_to_save"] == ["head"]
    for name, layer in srlora_layers(model):
        A = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        k = report["rank"][name]
        assert A.shape == (k, layer.in_features) and B.shape == (layer.out_features, k)
        assert k == config["rank_pattern"].get(name, config["r"])
        scaling = config["alpha_pattern"].get(name, config["lora_alpha"]) / k
        W0 = base.get_submodule(name).weight.double()
        W = layer.effective_weight().double()
        assert (W - W0).abs().max() > 1e-3                   # it trained: the change is far above rounding
        torch.testing.assert_close(W0 + scaling * B @ A, W, rtol=0, atol=1e-6 * W0.abs().max().item())  # ~8 fp32 eps
        assert k > layer.r                                   # fusion moved part of dW into W
    torch.testing.assert_close(tensors["base_model.model.head.weight"], model.head.weight.detach())


def test_adapter_refuses_a_changed_bias_of_an_adapted_layer(trained_net, tmp_path):
    base, model, x = trained_net
    with torch.no_grad():
        model.query.bias += 0.1                              # a LoRA adapter has no place for it
    with pytest.raises(ValueError, match="query.bias differs from base"):
        export_lora_adapter(model, tmp_path, base)


@given(m=st.integers(40, 90), n=st.integers(40, 90), next_index=st.integers(1, 8), full=st.booleans())
@settings(max_examples=30, deadline=None)
def test_sketched_svd_of_the_change_equals_the_full_svd(m, n, next_index, full):
    """Exact for a change of rank <= 2 next_index; a full-rank change falls back to the full SVD."""
    g = torch.Generator().manual_seed(m * 100 + n)
    k = min(m, n) if full else 2 * next_index
    dW = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)
    dW += 1e-12 * torch.randn(m, n, generator=g, dtype=torch.float64)     # rounding noise, below tol
    U, S, Vh = _svd_of_change(dW, next_index, tol=1e-9)
    S_full = torch.linalg.svdvals(dW)
    torch.testing.assert_close(S[:k], S_full[:k], rtol=1e-9, atol=0)
    torch.testing.assert_close((U[:, :k] * S[:k]) @ Vh[:k], dW, rtol=0, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 3])
def test_truncated_adapter_reports_its_relative_error(trained_net, tmp_path, capsys, rank):
    base, model, x = trained_net
    report = export_lora_adapter(model, tmp_path, base, rank=rank)
    tensors = load_tensors(adapter_file(tmp_path))
    worst = 0.0
    for name, layer in srlora_layers(model):
        dW = layer.effective_weight().double() - base.get_submodule(name).weight.double()
        BA = (tensors[f"base_model.model.{name}.lora_B.weight"].double()
              @ tensors[f"base_model.model.{name}.lora_A.weight"].double())
        err = ((dW - BA).norm() / dW.norm()).item()
        S = torch.linalg.svdvals(dW)
        assert report["rank"][name] == rank
        assert report["rel_error"][name] == pytest.approx(err, rel=1e-4)
        assert err == pytest.approx((S[rank:].norm() / S.norm()).item(), rel=1e-4)   # best rank-k (Eckart-Young)
        worst = max(worst, err)
    assert f"{worst:.2e}" in capsys.readouterr().out


def test_adapter_export_needs_the_pretrained_base(trained_net, tmp_path):
    base, model, x = trained_net
    with pytest.raises(ValueError, match="base lacks"):
        export_lora_adapter(model, tmp_path, {"head.weight": base.head.weight})
    with pytest.raises(ValueError, match="rank=0"):
        export_lora_adapter(model, tmp_path, base, rank=0)
    with pytest.raises(ValueError, match="itself an SRLoRA model"):
        export_lora_adapter(model, tmp_path, model)          # apply_srlora(base) changed base in place
    with pytest.raises(ValueError, match="itself an SRLoRA model"):
        export_lora_adapter(model, tmp_path, model.state_dict())
    untrained = apply_srlora(copy.deepcopy(base), targets=["query", "value"], r=4, r_target=8)
    with pytest.raises(ValueError, match="no adapted layer differs"):
        export_lora_adapter(untrained, tmp_path, base)       # PiSSA alone does not change W0 + BA


# the SRLoRA adapter ------------------------------------------------------------------------------

from srlora import ImportanceTracker, recompose, switch_steps
from srlora_export import load_adapter, record_switches, save_adapter


def fit(model, tracker, opt, x, y, steps, switches):
    for step in steps:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        tracker.update()
        opt.step()
        opt.zero_grad()
        if step in switches:
            recompose(model, tracker, opt)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0])
def test_an_adapter_loaded_into_a_fresh_wrap_gives_back_w_bit_for_bit_and_training_goes_on_exactly(tmp_path, gamma):
    base, x, y = Net(), torch.randn(32, 48), torch.randint(0, 3, (32,))
    wrap = lambda: record_switches(apply_srlora(copy.deepcopy(base), targets=["query", "value"], r=4, r_target=12,
                                                gamma=gamma))

    def start(model):
        model.head.requires_grad_(True)
        return ImportanceTracker(model), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    switches = set(switch_steps(12, 4, 12, gamma))
    whole = wrap()
    tracker, opt = start(whole)
    fit(whole, tracker, opt, x, y, range(1, 13), switches)

    first = wrap()
    tracker, opt = start(first)
    fit(first, tracker, opt, x, y, range(1, 7), switches)
    save_adapter(first, tmp_path)
    torch.save({"tracker": tracker.state_dict(), "opt": opt.state_dict()}, tmp_path / "state.pt")
    resumed = apply_srlora(copy.deepcopy(base), targets=["query", "value"], r=4, r_target=12, gamma=gamma)
    load_adapter(resumed, tmp_path)
    for (name, a), (_, b) in zip(srlora_layers(first), srlora_layers(resumed)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.lora_A, b.lora_A) and a.next_index == b.next_index
    tracker, opt = ImportanceTracker(resumed), torch.optim.AdamW(
        [p for p in resumed.parameters() if p.requires_grad], lr=1e-3)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    tracker.load_state_dict(state["tracker"]), opt.load_state_dict(state["opt"])
    fit(resumed, tracker, opt, x, y, range(7, 13), switches)
    assert torch.equal(resumed(x), whole(x))
    for (name, a), (_, b) in zip(srlora_layers(whole), srlora_layers(resumed)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.effective_weight(), b.effective_weight()), name


def test_an_adapter_of_switches_made_before_record_switches_is_refused(trained_net, tmp_path):
    base, model, x = trained_net                             # switched without record_switches
    with pytest.raises(ValueError, match=r"^record_switches: query has already switched"):
        record_switches(model)
    with pytest.raises(ValueError, match=r"^save_adapter: query switched without record_switches"):
        save_adapter(model, tmp_path)


def test_an_adapter_is_refused_by_a_model_wrapped_otherwise_or_already_trained(trained_net, tmp_path):
    base, _, x = trained_net
    y = torch.randint(0, 3, (32,))
    model = record_switches(apply_srlora(copy.deepcopy(base), targets=["query", "value"], r=4, r_target=12))
    train(model, x, y, call, steps=2, r_target=12)           # two switches: next_index 8
    save_adapter(model, tmp_path)
    other = apply_srlora(copy.deepcopy(base), targets=["query", "value"], r=4, r_target=16)
    with pytest.raises(ValueError, match="wrap the pretrained model with apply_srlora"):
        load_adapter(other, tmp_path)
    train(model, x, y, call, steps=2, r_target=12)           # two more: W holds switches the adapter lacks
    with pytest.raises(ValueError, match="load it into a model freshly wrapped from the pretrained weights"):
        load_adapter(model, tmp_path)
