"""Ship an SRLoRA model in the formats other tools read: merged weights, or a LoRA adapter for PEFT.

export_merged(model, path)               the state dict of merge_srlora(model): load it into a fresh
                                         instance of the model's class with load_state_dict(strict=True).
export_lora_adapter(model, path, base)   dW = W_final - W0 of every adapted layer as a standard LoRA
                                         adapter, which PEFT's PeftModel.from_pretrained(base, path) loads.

Depends on torch and srlora.py; writes safetensors when the safetensors package is importable.
"""
import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from srlora import srlora_layers, top_singular

try:
    import safetensors.torch
except ImportError:                      # optional: torch.save is the fallback
    safetensors = None

@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict:
    """The state_dict() of merge_srlora(model), in the same key order, without changing `model`."""
    adapted = dict(srlora_layers(model))
    state = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner not in adapted:
            state[key] = value
        elif leaf == "weight":                       # an SRLoRALinear's first key: put its merged keys here
            state.update({f"{owner}.{k}": v for k, v in adapted[owner].merged().state_dict().items()})
    return state


def _save(state: dict, path: Path) -> None:
    # safetensors wants contiguous tensors that share no storage: clone the second of two tied weights.
    plain, seen = {}, set()
    for key, value in state.items():
        value = value.detach().contiguous()
        storage = value.untyped_storage().data_ptr()
        plain[key] = value.clone() if storage in seen else value
        seen.add(storage)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(plain, str(path), metadata={"format": "pt"})
    else:
        torch.save(plain, path)


def export_merged(model: nn.Module, path) -> Path:
    """Write the state dict of merge_srlora(model) to `path`; `model` itself stays an SRLoRA model.

    The keys are those of the model before apply_srlora, so a fresh instance of its class loads the
    file with load_state_dict(..., strict=True).  Format: a path ending in .safetensors or .pt is
    written as such; any other path gets .safetensors appended when the safetensors package is
    importable, .pt otherwise.  Returns the path written.
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".pt"):
        path = path.with_name(path.name + (".safetensors" if safetensors is not None else ".pt"))
    if path.suffix == ".safetensors" and safetensors is None:
        raise ValueError(f"path={str(path)!r} asks for safetensors, which is not installed; "
                         f"pip install safetensors, or give a path ending in .pt")
    _save(merged_state_dict(model), path)
    return path


def _svd_of_change(dW: torch.Tensor, next_index: int, tol: float):
    """SVD (U, S, Vh) of dW = W_final - W0 of one layer, in dW's dtype, exact for all of it above `tol`.

    dW has rank at most 2 next_index: W_final - W0 = -(W0's top next_index directions, which PiSSA and
    every refill subtracted from W) + (the next_index - r pairs fused into W) + scaling B A.  So a
    seeded random sketch of its range with next_index + 8 columns to spare holds all of it, the SVD
    of dW projected on that range is the SVD of dW, and it costs O(m n next_index), not a full SVD.  If dW is not that low-rank (W was changed
    by other means), the part the sketch misses shows up and the full SVD is taken instead.
    """
    m, n = dW.shape
    q = 3 * next_index + 8
    if q < min(m, n):
        gen = torch.Generator(device=dW.device).manual_seed(0)
        G = torch.randn(n, q, generator=gen, device=dW.device, dtype=dW.dtype)
        Q = torch.linalg.qr(dW @ G).Q                                     # (m, q) range of dW
        C = Q.mT @ dW                                                     # (q, n): dW = Q C
        if (dW - Q @ C).norm() <= tol * min(m, n) ** 0.5:                 # nothing above rounding missed
            Uc, S, Vh = torch.linalg.svd(C, full_matrices=False)
            return Q @ Uc, S, Vh
    return torch.linalg.svd(dW, full_matrices=False)


@torch.no_grad()
def export_lora_adapter(model: nn.Module, path, base, rank: int = None) -> dict:
    """Write W_final - W0 of every adapted layer as a LoRA adapter that PEFT loads onto `base`.

    Why the pretrained weights are needed: SRLoRA's change from the pretrained model is not the
    adapter.  Every recompose() fuses pairs into the frozen W (Eq. 10) and subtracts the new
    directions from it (Eq. 12), so W drifts from the PiSSA residual, and the change is
        dW = W_final - W0 = (W + scaling B A) - W0,
    whose rank can exceed r.  PEFT's PiSSA-to-LoRA conversion assumes W never moved and is wrong
    for SRLoRA.  SRLoRALinear does not keep W0 (that would double the frozen weights' memory), so
    `base` must hold the pretrained weights: a copy of the model taken before apply_srlora (which
    changes its argument in place), the same model loaded again, or its state_dict().

    Each layer's dW = U S V^T is written as B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T with
    lora_alpha = k (scaling 1).  rank=None takes the exact rank k of dW: the singular values above
    the level that fp32 rounding of W itself leaves in dW (see `tol`), so outputs agree to fp32
    rounding.  rank=int keeps at most that many per layer, the best rank-k approximation.  Layers
    whose ranks differ from the most common one go in rank_pattern / alpha_pattern.  Parameters
    that differ from `base` outside the adapted layers (a trained classifier head) are written
    whole, module by module, as modules_to_save.

    Writes adapter_config.json and adapter_model.safetensors (adapter_model.bin when safetensors is
    missing) into the folder `path`.  Load it with PeftModel.from_pretrained(base_model, path).
    Returns {"rank": {layer: k}, "rel_error": {layer: ||dW - B A||_F / ||dW||_F}}, and prints the
    largest relative error.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank={rank} must be >= 1; use rank=None for the exact rank of each layer's change")
    adapted = dict(srlora_layers(model))
    if not adapted:
        raise ValueError("model has no SRLoRALinear layers; export the model you called apply_srlora on")
    if base is model or (isinstance(base, nn.Module) and srlora_layers(base)) or (
            isinstance(base, dict) and any(key.endswith(".lora_A") for key in base)):
        raise ValueError("base is itself an SRLoRA model (apply_srlora changes the model in place); pass "
                         "a copy of the pretrained model taken before apply_srlora, or its state_dict()")
    base_state = base if isinstance(base, dict) else base.state_dict()
    state = merged_state_dict(model)
    missing = [key for key in state if key not in base_state]
    if missing:
        raise ValueError(f"base lacks {missing[:3]}; pass the pretrained model that apply_srlora was "
                         f"applied to (before applying it), or its state_dict()")

    tensors, ranks, errors = {}, {}, {}
    for name, layer in adapted.items():
        if layer.bias is not None and not torch.equal(layer.bias, base_state[f"{name}.bias"].to(layer.bias)):
            raise ValueError(f"{name}.bias differs from base, and a LoRA adapter carries no bias change; "
                             f"keep the biases of adapted layers frozen, or use export_merged")
        W0 = base_state[f"{name}.weight"].to(layer.weight.device, torch.float64)
        W0 = W0.T if layer.base_type is not nn.Linear else W0             # a Conv1D stores it as (in, out)
        dW = layer.effective_weight().double() - W0                       # (m, n), fused pairs included
        # A direction of dW below eps sqrt(max(m, n)) ||W0||_2 moves W x less than the rounding of
        # W x itself in W's dtype; it is what recompose's in-place adds leave behind, not training.
        eps = torch.finfo(layer.weight.dtype).eps
        tol = eps * max(dW.shape) ** 0.5 * top_singular(W0, 1, "lowrank")[1][0].item()
        U, S, Vh = _svd_of_change(dW, layer.next_index, tol)
        k = int((S > tol).sum())
        k = k if rank is None else min(k, rank)
        approx = (U[:, :k] * S[:k]) @ Vh[:k]
        errors[name] = ((dW - approx).norm() / dW.norm()).item() if dW.norm() > 0 else 0.0
        ranks[name] = k
        if k == 0:                                                        # unchanged layer: nothing to write
            continue
        sqrt_S = S[:k].sqrt()
        prefix = f"base_model.model.{name}"                               # PeftModel's name for the module
        tensors[f"{prefix}.lora_A.weight"] = (sqrt_S[:, None] * Vh[:k]).float()   # (k, n)
        tensors[f"{prefix}.lora_B.weight"] = (U[:, :k] * sqrt_S).float()          # (m, k)
    exported = [name for name in adapted if ranks[name] > 0]
    if not exported:
        raise ValueError("no adapted layer differs from base; train the model (or pass the right base) "
                         "before exporting an adapter")

    modules_to_save = []
    for key, value in state.items():
        owner = key.rpartition(".")[0]
        if (owner in adapted or owner in modules_to_save or not torch.is_tensor(value)
                or torch.equal(value, base_state[key].to(value))):
            continue
        if not owner or any(name.startswith(owner + ".") for name in adapted):
            raise ValueError(f"{key} differs from base but its module {owner or type(model).__name__!r} "
                             f"holds adapted layers, which PEFT cannot also save whole; keep it frozen")
        modules_to_save.append(owner)
    for owner in modules_to_save:
        tensors.update({f"base_model.model.{key}": value for key, value in state.items()
                        if key.startswith(owner + ".")})

    r = Counter(ranks[name] for name in exported).most_common(1)[0][0]
    pattern = {name: ranks[name] for name in exported if ranks[name] != r}
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": getattr(base, "name_or_path", None),
        "task_type": None,
        "r": r,
        "lora_alpha": r,                  # alpha = rank: scaling 1, dW = B A exactly
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "target_modules": exported,       # full names: exactly the layers written, no suffix guessing
        "modules_to_save": modules_to_save or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(adapted[name].base_type is not nn.Linear for name in exported),  # Conv1D (GPT-2)
        "init_lora_weights": True,
        "inference_mode": True,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _save(tensors, path / ("adapter_model.safetensors" if safetensors is not None else "adapter_model.bin"))
    worst = max(exported, key=errors.get)
    print(f"export_lora_adapter: {len(exported)} layers, ranks {min(ranks[n] for n in exported)}.."
          f"{max(ranks[n] for n in exported)}, largest relative error {errors[worst]:.2e} ({worst})")
    return {"rank": ranks, "rel_error": errors}
