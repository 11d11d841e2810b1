"""Ship an SRLoRA model: as an SRLoRA adapter, as merged weights, or as a LoRA adapter for PEFT.

record_switches(model)                   right after apply_srlora: each layer keeps the pairs its
                                         switches fuse into W, so that an adapter save can rebuild W.
save_adapter(model, folder)              what training changed and nothing else (A, B, indices, the
load_adapter(model, folder)              fused pairs, trained heads), about the bytes of a LoRA adapter
                                         of rank r_target; loaded onto a model freshly wrapped from the
                                         same pretrained weights, it gives back the trained model exactly.
export_merged(model, path)               the state dict of merge_srlora(model): load it into a fresh
                                         instance of the model's class with load_state_dict(strict=True).
export_lora_adapter(model, path, base)   dW = W_final - W0 of every adapted layer as a standard LoRA
                                         adapter, which PEFT's PeftModel.from_pretrained(base, path) loads.

Depends on torch and srlora.py; writes safetensors when the safetensors package is importable.
"""
import dataclasses
import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from srlora import SRLoRAConfig, SRLoRALinear, extend_layer, n_recycle, srlora_layers, top_singular

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
    kept = [name for name, layer in adapted.items() if hasattr(layer, "base_layer")]
    if kept:
        raise ValueError(f"export_lora_adapter: {kept[0]} keeps a quantized W0 (srlora_hf, quantized='keep'), whose "
                         f"change this export does not write; save the SRLoRA adapter (model.save_pretrained) or the "
                         f"merged weights (export_merged)")
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


# --- the SRLoRA adapter ---------------------------------------------------------------------
#
# After its switches a layer holds  W = W0 - scaling B_0 A_0 + sum over switches of
# scaling (B_out A_out - B_in A_in)  (Eq. 2, 10, 12).  W0 - scaling B_0 A_0 and every B_in, A_in
# (Eq. 11) are functions of W0 alone, which apply_srlora on the same pretrained weights computes
# again bit for bit (the SVD is deterministic).  Only the fused-out pairs B_out, A_out come from
# training: (r_target - r)(m + n) numbers at most.  So an adapter holds A, B, active_indices,
# next_index and those pairs, and a load replays the switches on a freshly wrapped layer's W with
# recycle() itself: the same arithmetic in the same order, hence the same W, bit for bit.
# Stored instead, the change W - W0 would have rank up to 2 r_target, need W0 at save time, and
# give back W only to rounding.

ADAPTER_WEIGHTS = "model.safetensors"      # the name the Trainer resumes from (pytorch_model.bin without safetensors)
ADAPTER_CONFIG = "srlora_config.json"      # marks the folder: an SRLoRA adapter, not a model
# transformers' AutoModel*.from_pretrained reads config.json, and PEFT's PeftModel.from_pretrained reads
# adapter_config.json.  What they find in an adapter folder makes both refuse it with an error that
# names the right loader (an unknown model_type, an unknown peft_type), instead of loading the model
# without its adapter; with no base_model_name_or_path, transformers does not load a base for PEFT first.
LOAD_HINT = "srlora adapter: load it with srlora_hf.from_pretrained(base, folder) or srlora_export.load_adapter"
# A Trainer checkpoint's weights file also holds the importance EMAs under these names (srlora_hf), so
# that a resume finds them in the very file the Trainer loads; load_adapter leaves them out.
TRACKER_PREFIX = "srlora_tracker."
REFUSALS = {"config.json": {"model_type": LOAD_HINT},
            "adapter_config.json": {"peft_type": LOAD_HINT, "base_model_name_or_path": None}}
ADAPTER_KEYS = ("lora_A", "lora_B", "active_indices", "_extra_state", "fused_A", "fused_B")


class RecordedSRLoRALinear(SRLoRALinear):
    """An SRLoRALinear that keeps the pairs its switches fuse into W, in order: fused_A, fused_B.

    fused_A (r_target - r, n) and fused_B (m, r_target - r), in A's dtype (fp32), hold in rows /
    columns j .. j+k-1 the k pairs fused out by the switch that brought in directions r+j .. r+j+k-1.
    `applied`: the next_index whose switches W holds; a load of an adapter, which sets next_index
    and not W, replays the switches from `applied` on (replay()).
    """

    @torch.no_grad()
    def recycle(self, slots: torch.Tensor) -> dict:
        j, k = self.next_index - self.r, slots.numel()
        if self.next_index + k <= self.r_target:                     # it will switch (not exhausted)
            self.fused_B[:, j:j + k] = self.lora_B[:, slots]          # Eq. (9): the pairs about to be fused
            self.fused_A[j:j + k] = self.lora_A[slots]
        event = super().recycle(slots)                                # Eq. (9)-(12)
        self.applied = self.next_index
        return event

    @torch.no_grad()
    def replay(self) -> None:
        """Apply to W the switches from `applied` to next_index, from fused_A / fused_B; A, B and
        active_indices end as they are now (as loaded)."""
        target, k = self.next_index, n_recycle(self.r, self.config.gamma)
        if target == self.applied:
            return
        if target < self.applied or (target - self.applied) % k:
            raise ValueError(f"load_adapter: this layer's W already holds switches up to direction {self.applied} "
                             f"and the adapter's stop at {target}; load it into a model freshly wrapped from the pretrained weights")
        A, B, active = self.lora_A.clone(), self.lora_B.clone(), self.active_indices.clone()
        slots = torch.arange(k, device=active.device)
        self.next_index = self.applied
        while self.next_index < target:
            j = self.next_index - self.r
            self.lora_B[:, :k] = self.fused_B[:, j:j + k]             # the pairs this switch fused out
            self.lora_A[:k] = self.fused_A[j:j + k]
            self.recycle(slots)                                       # W += scaling (B_out A_out - B_in A_in)
        self.lora_A.copy_(A), self.lora_B.copy_(B), self.active_indices.copy_(active)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        held = self.fused_A[:self.applied - self.r].clone()          # the pairs W already holds
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "_extra_state" not in state_dict:                 # no next_index here (another shard)
            return
        if prefix + "weight" in state_dict:                           # a whole state dict: W came with it
            self.applied, self.history = self.next_index, prefix + "fused_A" in state_dict or self.next_index == self.r
            return
        if prefix + "fused_A" not in state_dict and self.next_index > self.r:
            raise ValueError(f"{prefix[:-1]}: the state dict has next_index={self.next_index} but neither W nor the "
                             f"fused pairs (fused_A, fused_B); save it with srlora_export.save_adapter")
        if not torch.equal(held, self.fused_A[:len(held)]):
            raise ValueError(f"{prefix[:-1]}: W holds switches that this adapter did not make; load it into a "
                             f"model freshly wrapped from the pretrained weights")
        self.replay()


def record_switches(model: nn.Module) -> nn.Module:
    """Give every SRLoRA layer fused_A / fused_B and the recording recycle() (RecordedSRLoRALinear).

    Call it right after apply_srlora, before training and before loading an adapter: the pairs
    fused before it are gone.  Costs (r_target - r)(m + n) fp32 numbers per layer, beside the basis
    of (r_target - r)(m + n) numbers in W's dtype that the layer keeps anyway.  Returns model.
    """
    for name, layer in srlora_layers(model):
        if isinstance(layer, RecordedSRLoRALinear):
            continue
        if layer.next_index > layer.r:
            raise ValueError(f"record_switches: {name} has already switched (next_index={layer.next_index}), and "
                             f"the pairs it fused into W are lost; call it right after apply_srlora")
        if getattr(layer, "sharded", False):
            raise ValueError(f"record_switches: {name} is sharded by srlora_fsdp; save FSDP runs with "
                             f"srlora_fsdp.save_checkpoint")
        _record(layer)
    return model


def _record(layer: SRLoRALinear, add_on: type = RecordedSRLoRALinear, prefix: str = "Recorded") -> None:
    """One layer's zero fused_A / fused_B, and `add_on` (RecordedSRLoRALinear or a subclass of it) in
    front of its class, in front of compensate's if any."""
    n = layer.r_target - layer.r
    layer.register_buffer("fused_A", layer.lora_A.detach().new_zeros(n, layer.in_features))
    layer.register_buffer("fused_B", layer.lora_B.detach().new_zeros(layer.out_features, n))
    layer.applied, layer.history = layer.next_index, True
    extend_layer(layer, add_on, prefix)


def _common_config(model: nn.Module) -> SRLoRAConfig:
    configs = {json.dumps(_config_dict(layer.config)) for _, layer in srlora_layers(model)}
    if len(configs) != 1:
        raise ValueError("model has no SRLoRA layers, or layers wrapped with different SRLoRAConfigs; an adapter "
                         "holds one config: wrap with one apply_srlora call")
    return SRLoRAConfig(**json.loads(configs.pop()))


def _config_dict(cfg: SRLoRAConfig) -> dict:
    return {**dataclasses.asdict(cfg), "targets": list(cfg.targets)}


@torch.no_grad()
def adapter_state_dict(model: nn.Module, weights: bool = False) -> dict:
    """The entries of model.state_dict() that training changed: per SRLoRA layer ADAPTER_KEYS (and W
    itself with weights=True, for layers that keep no record), and every other parameter that
    requires grad (a trained head), under the model's own names."""
    adapted = dict(srlora_layers(model))
    keys = ADAPTER_KEYS + (("weight",) if weights else ())
    for name, layer in adapted.items():
        if layer.next_index > layer.r and not getattr(layer, "history", False) and not weights:
            raise ValueError(f"save_adapter: {name} switched without record_switches(model), so the pairs fused "
                             f"into W are lost; call record_switches right after apply_srlora, or use export_merged")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if (leaf in keys) if owner in adapted else id(value) in trainable:
            state[key] = value.detach()
    return state


def save_adapter(model: nn.Module, folder, extra: dict = None, weights: bool = False, **info) -> Path:
    """Write adapter_state_dict(model, weights) (and the tensors of `extra`, named TRACKER_PREFIX...) to
    folder/model.safetensors and the SRLoRAConfig, the layer names and the trained parameters' names
    (with `info`, e.g. base_model_name_or_path) to folder/srlora_config.json.  config.json and
    adapter_config.json make transformers' and PEFT's from_pretrained refuse the folder, naming the
    right loader (REFUSALS).  Returns the folder."""
    folder = Path(folder)
    cfg, state = _common_config(model), adapter_state_dict(model, weights)
    adapted = {name for name, _ in srlora_layers(model)}
    meta = {"srlora_adapter": 1, **info, **({"weights": True} if weights else {}), "config": _config_dict(cfg),
            "layers": sorted(adapted),
            "trainable": [key for key in state if key.rpartition(".")[0] not in adapted]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    for name, refusal in REFUSALS.items():
        (folder / name).write_text(json.dumps(refusal, indent=2) + "\n")
    _save({**state, **(extra or {})}, folder / (ADAPTER_WEIGHTS if safetensors is not None else "pytorch_model.bin"))
    return folder


def read_adapter_config(folder) -> dict:
    """The contents of folder/srlora_config.json; a folder without it is refused in one line."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{folder} has no {ADAPTER_CONFIG}, so it is no SRLoRA adapter; save one with save_adapter")
    return json.loads(path.read_text())


@torch.no_grad()
def load_adapter(model: nn.Module, folder) -> nn.Module:
    """Load an adapter written by save_adapter into `model`: the pretrained model it was trained
    from, wrapped by apply_srlora with the adapter's config (read_adapter_config(folder)["config"]).
    Rebuilds each W by replaying its switches; the trained parameters require grad again, so that
    training can go on (the tracker and optimizer states are the Trainer's or yours to reload)."""
    folder, meta = Path(folder), read_adapter_config(folder)
    adapted = dict(srlora_layers(model))
    if sorted(adapted) != meta["layers"] or _config_dict(_common_config(model)) != meta["config"]:
        raise ValueError(f"load_adapter: the model's SRLoRA layers ({len(adapted)}) or their config are not the "
                         f"adapter's ({len(meta['layers'])} layers, {meta['config']}); wrap the pretrained model "
                         f"with apply_srlora(model, SRLoRAConfig(**read_adapter_config(folder)['config'])) first")
    if not meta.get("weights"):                    # W itself is in the file: nothing to replay
        record_switches(model)
    path = folder / ADAPTER_WEIGHTS
    if path.is_file():
        state = safetensors.torch.load_file(str(path), device=str(next(iter(adapted.values())).lora_A.device))
    else:
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    state = {key: value for key, value in state.items() if not key.startswith(TRACKER_PREFIX)}
    result = model.load_state_dict(state, strict=False)
    lost = result.unexpected_keys + [key for key in result.missing_keys if key.rpartition(".")[0] in adapted
                                     and key.rpartition(".")[2] in ADAPTER_KEYS]
    if lost:
        raise ValueError(f"load_adapter: {lost[0]} is in the adapter or the model but not in both; load it into "
                         f"the model it was trained from, wrapped the same way")
    params = dict(model.named_parameters(remove_duplicate=False))
    for key in meta["trainable"]:
        params[key].requires_grad_(True)
    return model
