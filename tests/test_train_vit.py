"""Tests of train_vit.py: the dataset loaders on small self-made files in each real format, the
preprocessing, --weights in their naming conventions, a tiny end-to-end run, and one-line errors
for bad command lines."""
import dataclasses
import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_vit
from harness import vit
from harness.errors import UserError
from tests.helpers import ROOT, TINY, random_state, to_hf, write_safetensors
from train_vit import (VisionConfig, load_cifar100, load_dataset, load_mnist_idx, load_mnist_pickle, load_stl10,
                       preprocess)


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


def test_every_dataset_reads_data_dir_so_that_none_ignores_it(tmp_path):
    """A data flag that the chosen data ignores is a trap (train_glue.py refuses --data_dir with
    --task=tweets); here no such case exists: every dataset, MNIST included, reads --data_dir."""
    for dataset in train_vit.N_CLASSES:
        with pytest.raises(UserError, match=f"--data_dir={tmp_path / 'nope'} is not a folder"):
            load_dataset(VisionConfig(dataset=dataset, data_dir=str(tmp_path / "nope")))

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


# --- --weights ----------------------------------------------------------------------------------

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


# --- the script: a tiny end-to-end run and one-line errors ----------------------------------------

@pytest.fixture
def tiny_files(tmp_path):
    """A tiny timm-named ViT (patch 4, grid 3), a tiny MNIST in idx files, and two corrupt weights files."""
    torch.save(random_state(dataclasses.replace(TINY, num_classes=10)), tmp_path / "tiny.pth")
    write_mnist_idx(tmp_path / "mnist", tiny_mnist(16, 0), tiny_mnist(8, 1))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 12)
    return tmp_path


def test_a_tiny_run_trains_every_method_and_writes_metrics(tiny_files):
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


def _corrupt_gzip(t):
    d = t / "mnist-bad"
    write_mnist_idx(d, tiny_mnist(16, 0), tiny_mnist(8, 1))
    gz = d / "train-images-idx3-ubyte.gz"
    raw = bytearray(gz.read_bytes())
    raw[10:30] = b"\xff" * 20                              # a valid gzip header, a broken deflate stream (zlib.error)
    gz.write_bytes(bytes(raw))
    return d


def _nan_weights(t):
    state = random_state(dataclasses.replace(TINY, num_classes=10))
    state["blocks.0.attn.qkv.weight"][1, 2] = float("inf")
    torch.save(state, t / "nan.pth")
    return t / "nan.pth"


def bad_flags(t):
    """{case: (flags over a tiny run, what the line says)}: each must fail before anything is written."""
    return {
        "heads 7": (["--heads=7"], "width 32 is not divisible by heads=7"),
        "heads -1": (["--heads=-1"], "--heads=-1 must be at least 0"),
        "max_eval -5": (["--max_eval=-5"], "--max_eval=-5 must be at least 0"),
        "eval_batch 0": (["--eval_batch=0"], "--eval_batch=0 must be at least 1"),
        "batch_size -4": (["--batch_size=-4"], "--batch_size=-4 must be at least 1"),
        "lr nan": (["--lr=nan"], "--lr=nan must be a finite number > 0"),
        "momentum -0.1": (["--momentum=-0.1"], "--momentum=-0.1 must be in [0, 1)"),
        "device bogus": (["--device=bogus"], "--device=bogus is not a device"),
        "alpha 0": (["--alpha=0"], "--alpha=0.0 must be positive and finite"),
        "flip sometimes": (["--flip=sometimes"], "--flip=sometimes is not auto, true or false"),
        "name ..": (["--name=.."], "--name=.. must be one folder name inside --out_dir"),
        "corrupt gzip": ([f"--data_dir={_corrupt_gzip(t)}"], "train-images-idx3-ubyte.gz: corrupt or truncated gzip"),
        "inf weights": ([f"--weights={_nan_weights(t)}"], "tensor 'blocks.0.attn.qkv.weight' holds 1 NaN or inf value"),
    }


@pytest.mark.parametrize("case", ["heads 7", "heads -1", "max_eval -5", "eval_batch 0", "batch_size -4", "lr nan",
                                  "momentum -0.1", "device bogus", "alpha 0", "flip sometimes", "name ..",
                                  "corrupt gzip", "inf weights"])
def test_every_bad_flag_exits_2_with_one_line_and_writes_nothing(tiny_files, case, monkeypatch, capsys):
    t = tiny_files
    argv, match = bad_flags(t)[case]
    base = [f"--weights={t / 'tiny.pth'}", "--heads=2", f"--data_dir={t / 'mnist'}", "--img_size=12", "--max_steps=4",
            "--eval_every=2", "--batch_size=4", "--warmup=1", "--r=2", "--r_target=4", "--plots=false"]
    code, err = run_cli([*base, *argv, f"--out_dir={t / 'runs'}"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and match in err, err
    assert not (t / "runs").exists()
