"""SRLoRA on Hugging Face and timm models, and the exports of srlora_export.py.

The export tests at the top need torch alone.  The model-family tests skip when transformers or
timm is missing, the PEFT round trip when peft is.  Every model is built from a config with random
weights (no download): small sizes, the real module names; the `slow` tests build the full sizes.
"""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from srlora import ImportanceTracker, SRLoRALinear, apply_srlora, merge_srlora, recompose, srlora_layers, switch_steps
from srlora_export import PAPER_TARGETS, _svd_of_change, export_lora_adapter, export_merged, merged_state_dict


def load_tensors(path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, weights_only=True)


def adapter_file(folder):
    found = [p for p in folder.iterdir() if p.name in ("adapter_model.safetensors", "adapter_model.bin")]
    assert len(found) == 1
    return found[0]


def train(model, inputs, labels, forward, steps=4, r=4, r_target=8, gamma=0.5):
    """AdamW steps with importance tracking and the switch schedule; returns the recompose events and,
    for each switch, the eval-mode outputs (before, after) it."""
    tracker = ImportanceTracker(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
    switches = set(switch_steps(steps, r=r, r_target=r_target, gamma=gamma))
    events, around_switch = [], []
    for step in range(1, steps + 1):
        model.train()
        loss = F.cross_entropy(forward(model, inputs), labels)
        loss.backward()
        assert torch.isfinite(loss)
        tracker.update()
        opt.step()
        opt.zero_grad()
        if step in switches:
            model.eval()
            with torch.no_grad():
                before = forward(model, inputs)
                events += recompose(model, tracker, gamma=gamma, optimizer=opt)
                around_switch.append((before, forward(model, inputs)))
    model.eval()
    return events, around_switch


def assert_same_outputs(a, b, tol=1e-5):
    """Equal to fp32 rounding: `tol` of the largest output (1e-5 is ~100 fp32 eps).  An absolute
    tolerance would be too loose here: the small random BERT and DeBERTa heads give logits of ~0.02."""
    torch.testing.assert_close(a, b, rtol=0, atol=tol * b.abs().max().item())


# --- exports on a plain torch model: these run everywhere ------------------------------------

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


# --- Hugging Face transformers and timm models --------------------------------------------------

class Family:
    """How to build, feed and read one model family: `blocks` transformer blocks, `head` the modules
    trained whole, `plain` the nn.Linear layers that the paper's targets leave alone."""

    def __init__(self, make, inputs, forward, head, plain, blocks):
        self.make, self.inputs, self.forward = make, inputs, forward
        self.head, self.plain, self.blocks = head, plain, blocks


def hf_forward(model, inputs):
    return model(**inputs).logits


def timm_forward(model, inputs):
    return model(inputs)


def tokens(vocab=100):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def images(size=32, n=4):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def family(name, full_size=False):
    """The model class of `name` with random weights, small or at its real default size."""
    if name == "timm-vit":
        timm = pytest.importorskip("timm")
        size = {} if full_size else dict(depth=2, embed_dim=32, num_heads=2, img_size=32)

        def make(seed):
            torch.manual_seed(seed)
            return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=3, **size).eval()
        return Family(make, lambda: images(224 if full_size else 32), timm_forward, ["head"], ["head"],
                      12 if full_size else 2)

    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if name == "deberta-v2":
        # DeBERTa-v3-base: relative positions in 256 log buckets, p2c + c2p attention, shared keys.
        v3 = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True,
                  norm_rel_ebd="layer_norm", max_relative_positions=-1, position_biased_input=False)
        # Full size: DeBERTa-v3-base, but 1000 tokens instead of 128100 (the embedding is not adapted).
        size = (dict(vocab_size=1000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, position_buckets=256) if full_size else
                dict(vocab_size=100, pooler_hidden_size=32, position_buckets=16, **small))
        config = transformers.DebertaV2Config(num_labels=3, **v3, **size)
        cls, inputs = transformers.DebertaV2ForSequenceClassification, tokens
        head = plain = ["pooler.dense", "classifier"]
    elif name == "gpt2":
        # GPT-2's maps are transformers Conv1D (weight stored (in, out)); the classifier is `score`.
        size = (dict(vocab_size=1000) if full_size else
                dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32))
        config = transformers.GPT2Config(num_labels=3, pad_token_id=0, bos_token_id=0, eos_token_id=0, **size)
        cls, inputs = transformers.GPT2ForSequenceClassification, tokens
        head = plain = ["score"]
    elif name == "bert":
        config = transformers.BertConfig(num_labels=3, **({} if full_size else dict(vocab_size=100, **small)))
        cls, inputs = transformers.BertForSequenceClassification, tokens
        head, plain = ["classifier"], ["bert.pooler.dense", "classifier"]
    else:
        config = transformers.ViTConfig(num_labels=3, **({} if full_size else
                                                         dict(image_size=32, patch_size=8, **small)))
        cls, head, plain = transformers.ViTForImageClassification, ["classifier"], ["classifier"]
        inputs = lambda: {"pixel_values": images(224 if full_size else 32)}

    def make(seed):
        torch.manual_seed(seed)
        return cls(config).eval()
    return Family(make, inputs, hf_forward, head, plain, config.num_hidden_layers)


FAMILIES = ["deberta-v2", "bert", "vit", "timm-vit", "gpt2"]
R, R_TARGET = 4, 8


@pytest.mark.parametrize("name", FAMILIES)
def test_paper_targets_adapt_every_map_of_every_block_and_nothing_else(name):
    fam = family(name)
    model = fam.make(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no target matches a module it cannot wrap
        apply_srlora(model, targets=PAPER_TARGETS[name], r=R, r_target=R_TARGET)
    adapted = [n for n, _ in srlora_layers(model)]
    assert len(adapted) == fam.blocks * len(PAPER_TARGETS[name])
    for target in PAPER_TARGETS[name]:                       # every name is used, in every block
        assert sum(n == target or n.endswith("." + target) for n in adapted) >= fam.blocks
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert plain == fam.plain                                # the pooler and classifier head stay plain


@pytest.mark.parametrize("name", FAMILIES)
def test_wrapping_keeps_the_outputs(name):
    fam = family(name)
    original = fam.make(0)
    model = apply_srlora(copy.deepcopy(original), targets=PAPER_TARGETS[name], r=R, r_target=R_TARGET)
    with torch.no_grad():
        assert_same_outputs(fam.forward(model, fam.inputs()), fam.forward(original, fam.inputs()))


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request):
    """(family, pretrained model, SRLoRA model after training with two recomposes, inputs, switch outputs)."""
    fam = family(request.param)
    base = fam.make(0)
    model = apply_srlora(copy.deepcopy(base), targets=PAPER_TARGETS[request.param], r=R, r_target=R_TARGET)
    for h in fam.head:
        model.get_submodule(h).requires_grad_(True)
    inputs, labels = fam.inputs(), torch.tensor([0, 1, 2, 1])
    events, around_switch = train(model, inputs, labels, fam.forward, steps=4, r=R, r_target=R_TARGET)
    assert len(events) == 2 * len(srlora_layers(model))     # every layer switched at steps 2 and 4
    return fam, base, model, inputs, around_switch


def test_recompose_keeps_the_outputs_while_training(trained):
    fam, base, model, inputs, around_switch = trained
    for before, after in around_switch:
        assert_same_outputs(after, before)


def test_merged_weights_load_strictly_into_a_fresh_instance_with_the_same_outputs(trained, tmp_path):
    fam, base, model, inputs, _ = trained
    path = export_merged(model, tmp_path / "merged")
    fresh = fam.make(seed=1)                                 # other random weights, same class
    fresh.load_state_dict(load_tensors(path), strict=True)
    with torch.no_grad():
        assert_same_outputs(fam.forward(fresh, inputs), fam.forward(model, inputs))
        assert not torch.allclose(fam.forward(base, inputs), fam.forward(model, inputs))   # it did train
    assert srlora_layers(model)                              # still an SRLoRA model


def test_merge_gives_back_each_layers_own_type_in_its_own_layout(trained):
    fam, base, model, inputs, _ = trained
    merged = merge_srlora(copy.deepcopy(model))
    for name, layer in srlora_layers(model):
        original, back = base.get_submodule(name), merged.get_submodule(name)
        assert type(back) is type(original) and back.weight.shape == original.weight.shape   # Conv1D: (in, out)
        assert not back.weight.requires_grad
    with torch.no_grad():
        assert_same_outputs(fam.forward(merged, inputs), fam.forward(model, inputs))


def test_peft_loads_the_exported_adapter_onto_the_base_with_the_same_outputs(trained, tmp_path):
    peft = pytest.importorskip("peft")
    fam, base, model, inputs, _ = trained
    report = export_lora_adapter(model, tmp_path, base)
    assert max(report["rank"].values()) > R                  # W moved: the adapter alone is not dW
    conv1d = [type(base.get_submodule(name)).__name__ == "Conv1D" for name in report["rank"]]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] == any(conv1d) == all(conv1d)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)          # PEFT warns when it has to correct fan_in_fan_out
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert_same_outputs(fam.forward(loaded, inputs), fam.forward(model, inputs))
        merged = loaded.merge_and_unload()
        assert_same_outputs(fam.forward(merged, inputs), fam.forward(model, inputs))
    expected = merged_state_dict(model)
    for name, _ in srlora_layers(model):                     # PEFT's W0 + B A is SRLoRA's W + scaling B A
        W = expected[f"{name}.weight"]
        torch.testing.assert_close(merged.get_submodule(name).weight, W, rtol=0, atol=1e-6 * W.abs().max().item())


def test_peft_loads_the_bin_adapter_written_without_safetensors(trained, tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    import srlora_export
    monkeypatch.setattr(srlora_export, "safetensors", None)  # as if the package were not installed
    fam, base, model, inputs, _ = trained
    export_lora_adapter(model, tmp_path, base)
    assert adapter_file(tmp_path).name == "adapter_model.bin"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert_same_outputs(fam.forward(loaded, inputs), fam.forward(model, inputs))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_paper_targets_on_the_full_size_model_keep_the_outputs(name):
    fam = family(name, full_size=True)
    model = fam.make(0)
    inputs = fam.inputs()
    inputs = {k: v[:1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:1]
    with torch.no_grad():
        before = fam.forward(model, inputs)
        apply_srlora(model, targets=PAPER_TARGETS[name], r=8, r_target=8)
        assert len(srlora_layers(model)) == 12 * len(PAPER_TARGETS[name])
        assert [n for n, m in model.named_modules() if type(m) is nn.Linear] == fam.plain
        # 12 blocks of 768-wide fp32 products feed logits of ~0.04 from a random head: 10x the rounding
        assert_same_outputs(fam.forward(model, inputs), before, tol=1e-4)


def test_gpt2_lm_adapts_every_conv1d_refuses_the_tied_head_and_round_trips_through_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    assert base.lm_head.weight is base.transformer.wte.weight
    with pytest.raises(ValueError, match=r"^lm_head.weight is tied to transformer.wte.weight; "):
        apply_srlora(copy.deepcopy(base), targets=["c_attn", "lm_head"])
    with pytest.raises(ValueError, match=r"e.g. \['c_attn', 'c_fc', 'c_proj'\]$"):   # never the tied lm_head
        apply_srlora(copy.deepcopy(base), targets=["nothing"])

    model = apply_srlora(copy.deepcopy(base), targets=["c_attn", "c_proj", "c_fc"], r=R, r_target=R_TARGET)
    conv1d = [n for n, m in base.named_modules() if type(m) is transformers.pytorch_utils.Conv1D]
    assert [n for n, _ in srlora_layers(model)] == conv1d and len(conv1d) == 2 * 4   # "c_proj": attn's and mlp's
    ids = tokens()["input_ids"]
    with torch.no_grad():
        assert_same_outputs(model(ids).logits, base(ids).logits)
    next_token = lambda m, x: m(input_ids=x).logits[:, -1]
    events, _ = train(model, ids[:, :-1], ids[:, -1], next_token, steps=4)
    assert len(events) == 2 * len(srlora_layers(model))

    export_lora_adapter(model, tmp_path, base)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert_same_outputs(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    merged = merge_srlora(model)
    assert all(type(merged.get_submodule(n)) is transformers.pytorch_utils.Conv1D for n in conv1d)
    assert merged.lm_head.weight is merged.transformer.wte.weight
    with torch.no_grad():
        assert_same_outputs(merged(input_ids=ids).logits, loaded(input_ids=ids).logits)
