"""SRLoRA on Hugging Face and timm models: the paper's targets (srlora.PAPER_TARGETS) on
each family, outputs kept through wrapping, switches and merging, and the exports loaded back,
by PEFT too.

The tests skip when transformers or timm is missing, the PEFT round trips when peft is.  Every
model is built from a config with random weights (no download): small sizes, the real module
names; the `slow` tests build the full sizes.
"""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

from srlora import apply_srlora, merge_srlora, srlora_layers
from srlora import PAPER_TARGETS
from srlora_export import export_lora_adapter, export_merged, merged_state_dict
from tests.helpers import adapter_file, assert_same_outputs, load_tensors, train


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
