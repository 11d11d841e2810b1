"""SRLoRA: Subspace Recomposition in Low-Rank Adaptation, a reference implementation.

Paper: H. Yang, L. Wang, M. Z. Hossain, "SRLoRA: Subspace Recomposition in Low-Rank
Adaptation via Importance-Based Fusion and Reinitialization" (2025), Section 3 and Algorithm 1.
It builds on PiSSA (Meng et al., 2024) for the SVD initialisation and on AdaLoRA / PLATON
(Zhang et al., 2022, 2023) for the smoothed sensitivity score.

The method is four steps, in the order this file defines them:
  1. PiSSA: W0 = U S V^T; the adapter starts as the top-r directions, W holds the rest.  SRLoRALinear
  2. Per rank-1 pair (column k of B, row k of A), an EMA of sensitivity |w * grad| and of its
     uncertainty (Eq. 3-7).                                          ImportanceTracker.update()
  3. At a switch step, fuse the r' least important pairs into W (Eq. 8-10), refill them from
     the next unused singular directions and subtract those from W (Eq. 11-12), so that the
     effective weight W + scaling * B A does not change.                           recompose()
  4. Evenly spaced switch steps, so that a run visits r_target directions (Eq. 13-14).  switch_steps()

Where the paper is silent, the choice is said where it is made (docs/CHOICES.md lists them).
Depends on torch alone.  Add-ons that import this file: srlora_switch.py (other switch rules),
srlora_precision.py (bf16 switches), srlora_fsdp.py (FSDP2), srlora_hf.py (Trainer), srlora_export.py.
"""
import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SRLoRAConfig:
    """Everything apply_srlora, ImportanceTracker and recompose read; checked when it is made."""
    r: int = 8              # trainable rank per layer; the paper uses 8 everywhere
    alpha: float = 8.0      # scaling = alpha / r; the paper uses alpha = r, i.e. scaling 1
    r_target: int = 32      # largest subspace a layer may visit; r_target == r is plain PiSSA
    gamma: float = 0.5      # fusion ratio: r' = round(gamma * r) slots recycled per switch
    beta1: float = 0.85     # EMA factor of sensitivity, Eq. (4); AdaLoRA's value, as in the paper
    beta2: float = 0.85     # EMA factor of uncertainty, Eq. (5)
    targets: tuple = field(default_factory=lambda: PAPER_TARGETS["bert"])  # module name suffixes to wrap
    init: str = "pissa"     # "pissa": top-r SVD (SRLoRA, PiSSA); "lora": Kaiming A, zero B
    reset: str = "recycled" # importance reset at a switch: "recycled" (Alg. 1 line 10) or "all" (Sec. 3.1)
    moments: str = "reset"  # AdamW 2nd moment of recycled slots: "reset" or "keep" (see recompose)
    svd: str = "auto"       # "full", "lowrank" (randomized, seeded) or "auto" (see top_singular)
    residual_dtype: str = None  # dtype of W and the basis: None keeps the model's (bf16 stays bf16)

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        dtype = None if self.residual_dtype is None else str(self.residual_dtype).removeprefix("torch.")
        self.residual_dtype, r = dtype, self.r
        for ok, message in (
                (isinstance(r, int) and r >= 1, f"r={r!r} must be at least 1 (an integer, e.g. r=8)"),
                (isinstance(self.r_target, int) and self.r_target >= r, f"r_target={self.r_target!r} is smaller "
                 f"than r={r}; use r_target >= r (r_target == r means PiSSA, no switches)"),
                (math.isfinite(self.alpha) and self.alpha > 0, f"alpha={self.alpha} must be positive and finite; "
                 f"scaling = alpha / r, e.g. alpha=r"),
                (0.0 < self.gamma <= 1.0, f"gamma={self.gamma} is outside (0, 1]; it is the fraction of the r "
                 f"slots recycled at each switch, e.g. gamma=0.5"),
                (0.0 <= self.beta1 < 1.0, f"beta1={self.beta1} is outside [0, 1); it is an EMA factor, e.g. 0.85"),
                (0.0 <= self.beta2 < 1.0, f"beta2={self.beta2} is outside [0, 1); it is an EMA factor, e.g. 0.85"),
                (all(isinstance(t, str) and t for t in self.targets) and self.targets != (),
                 f"targets={self.targets!r} must be module name suffixes, e.g. ('query', 'value')"),
                *((getattr(self, name) in allowed, f"{name}={getattr(self, name)!r} is unknown; use one of {allowed}")
                  for name, allowed in (("init", ("pissa", "lora")), ("reset", ("recycled", "all")),
                                        ("moments", ("keep", "reset")), ("svd", ("auto", "full", "lowrank")))),
                (dtype is None or isinstance(getattr(torch, dtype, None), torch.dtype)
                 and getattr(torch, dtype).is_floating_point, f"residual_dtype={dtype!r} is not a floating dtype; "
                 f"use None (the model's dtype), 'float32' or 'bfloat16'")):
            if not ok:
                raise ValueError(message)


def _init_known_fields(self, *args, _init=SRLoRAConfig.__init__, **kwargs):
    # A misspelt or retired field is a ValueError that names it, as a bad value is.
    known = [f.name for f in dataclasses.fields(SRLoRAConfig)]
    for name in kwargs.keys() - set(known):
        raise ValueError(f"SRLoRAConfig has no field {name!r}; its fields are {known} (other switch "
                         f"rules: srlora_switch.py; bf16 compensation: srlora_precision.py)")
    _init(self, *args, **kwargs)


SRLoRAConfig.__init__ = _init_known_fields


def n_recycle(r: int, gamma: float) -> int:
    """r' = round(gamma * r), at least 1 so that every gamma in (0, 1] recycles something."""
    return max(1, round(gamma * r))


# --- 1. the SVD -----------------------------------------------------------------------------

AUTO_FULL_MAX = 1024   # "auto" takes the exact SVD up to this smaller side (cost: docs/BENCHMARKS.md)


@torch.no_grad()
def top_singular(W: torch.Tensor, k: int, method: str = "auto", niter: int = 16, seed: int = 0,
                 oversample: float = 1.0):
    """Top-k singular triplets (U (m, k), S (k,), Vh (k, n)) of W (m, n), in fp32.

    "full" is torch.linalg.svd.  "lowrank" is the randomized range finder of Halko, Martinsson and
    Tropp (2011), with a k + oversample k sketch, `niter` power iterations and a seeded Gaussian test matrix
    (every process gets the same basis; the global RNG is untouched).  The 2k sketch and 16
    iterations are what the directions r .. k-1, which recompose() brings in, need to be exact
    (bench/svd_accuracy.py).  "auto": "full" up to AUTO_FULL_MAX or when the sketch is not narrower.
    """
    W = W.float()
    m, n = W.shape[-2:]
    q = min(k + max(8, int(oversample * k)), m, n)                        # oversampled sketch width
    if method == "auto":
        method = "full" if min(m, n) <= AUTO_FULL_MAX or 2 * q > min(m, n) else "lowrank"
    if method == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[..., :k], S[..., :k], Vh[..., :k, :]
    if method != "lowrank":
        raise ValueError(f"svd={method!r} is unknown; use 'full', 'lowrank' or 'auto'")
    gen = torch.Generator(device=W.device).manual_seed(seed)
    G = torch.randn(*W.shape[:-2], n, q, generator=gen, device=W.device)
    Q = torch.linalg.qr(W @ G).Q                                          # (.., m, q) range of W
    for _ in range(niter):                                                # power iterations sharpen it
        Q = torch.linalg.qr(W.mT @ Q).Q
        Q = torch.linalg.qr(W @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.mT @ W, full_matrices=False)           # SVD of the small (q, n) matrix
    return (Q @ Ub)[..., :k], S[..., :k], Vh[..., :k, :]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): y = x W + b, W stored (in, out); known by name: torch alone."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and weight.shape[1] == getattr(module, "nf", None))


def _out_in_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear or Conv1D in nn.Linear's (out, in) layout (a view for Conv1D)."""
    return module.weight.T if is_conv1d(module) else module.weight


# --- the layer ------------------------------------------------------------------------------

class SRLoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable rank-r pair: y = x W^T + b + scaling * x A^T B^T.

    W (`weight`) is the frozen residual, A (`lora_A`, (r, n)) and B (`lora_B`, (m, r)) train,
    scaling = alpha / r.  With init="pissa", W0 = U S V^T and (Eq. 2)
        B = U[:, :r] sqrt(S[:r] / scaling),  A = sqrt(S[:r] / scaling) V[:, :r]^T,  W = W0 - scaling B A,
    so the layer computes exactly what the wrapped one did.  S is divided by scaling so that
    scaling * B A is the top-r part of W0 for any alpha (PEFT's PiSSA convention; the paper
    writes its equations for scaling = 1).  init="lora" is LoRA: Kaiming-uniform A, zero B, W = W0.

    Slot k holds singular direction active_indices[k]; next_index is p_r of Eq. (11), the next
    unused direction.  Buffers U, S, Vh keep directions r .. r_target-1 (direction p in column p - r).
    `factors`: (U, S, Vh) of the top min(r_target, m, n) directions, if already computed.
    Precision (the paper is silent): W, bias and basis in residual_dtype (None: the wrapped layer's,
    so bf16 stays bf16); A, B, the SVD and each switch in fp32, as PEFT keeps its adapters, since
    AdamW steps on bf16 weights would mostly round away.  srlora_precision.py: the bf16 roundings.
    """

    def __init__(self, base: nn.Linear, config: SRLoRAConfig = None, factors=None, **overrides):
        cfg = dataclasses.replace(config or SRLoRAConfig(), **overrides)
        if isinstance(base, SRLoRALinear) or not isinstance(base, nn.Linear) and not is_conv1d(base):
            raise ValueError(f"SRLoRALinear wraps an nn.Linear or a transformers Conv1D, got "
                             f"{type(base).__name__}; choose targets that name such modules, once")
        if not base.weight.dtype.is_floating_point or hasattr(base.weight, "quant_state"):   # bitsandbytes
            raise ValueError(f"SRLoRALinear: a quantized {type(base).__name__} stores packed codes, not W; wrap "
                             f"the model with srlora_hf.apply_srlora, which dequantizes W for the SVD")
        m, n = _out_in_weight(base).shape
        r, d = cfg.r, min(m, n)
        if r > d:
            raise ValueError(f"r={r} must be between 1 and min(out, in)={d} for this {m}x{n} layer; use a smaller r")
        super().__init__(n, m, bias=base.bias is not None, device="meta")  # a shell: no second weight allocated
        self.config, self.r, self.alpha, self.scaling, self.init = cfg, r, cfg.alpha, cfg.alpha / r, cfg.init
        self.r_target = min(cfg.r_target, d) if cfg.init == "pissa" else r  # at most d directions exist
        self.base_dtype = base.weight.dtype                           # merged() returns to it
        self.base_type = type(base) if is_conv1d(base) else nn.Linear  # and to this layer type
        dtype = getattr(torch, cfg.residual_dtype) if cfg.residual_dtype else base.weight.dtype
        work = torch.promote_types(dtype, torch.float32)              # A, B and all arithmetic: fp32 or fp64
        W0 = _out_in_weight(base).detach().to(work).contiguous()
        if base.bias is not None:
            self.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)

        if cfg.init == "pissa":
            U, S, Vh = factors if factors is not None else top_singular(W0, self.r_target, cfg.svd)
            U, S, Vh = U.to(work), S.to(work), Vh.to(work)
            sqrt_S = (S[:r] / self.scaling).sqrt()                    # divided by scaling: scaling*B*A = U S V^T
            B = U[:, :r] * sqrt_S                                     # Eq. (2)
            A = sqrt_S[:, None] * Vh[:r]                              # Eq. (2)
            W = W0 - self.scaling * (B @ A)                           # Eq. (2) residual
            active = torch.arange(r)
            U, S, Vh = (t.to(dtype).contiguous() for t in (U[:, r:], S[r:], Vh[r:]))  # unused directions only
        else:
            A = torch.empty(r, n, dtype=work, device=W0.device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))               # as loralib and PEFT do
            B = torch.zeros(m, r, dtype=work, device=W0.device)
            W = _out_in_weight(base).detach().contiguous()            # LoRA has no switches: W stays W0
            active = torch.full((r,), -1)                             # -1: not a singular direction
            U, S, Vh = W0.new_zeros(m, 0, dtype=dtype), W0.new_zeros(0, dtype=dtype), W0.new_zeros(0, n, dtype=dtype)
        self.weight = nn.Parameter(W.to(dtype), requires_grad=False)  # the one rounding of a bf16 W at init
        self.lora_A = nn.Parameter(A.contiguous())
        self.lora_B = nn.Parameter(B.contiguous())
        self.register_buffer("U", U)
        self.register_buffer("S", S)
        self.register_buffer("Vh", Vh)
        self.register_buffer("active_indices", active.to(W0.device))
        self.next_index = r                                           # p_r: directions 0..r-1 are in use

    def forward(self, x):
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return self.forward(x.to(self.weight.dtype)).to(x.dtype)  # compute in W's dtype, answer in x's
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)       # fp32 A, B meet a bf16 x as autocast would
        # scaling multiplies the rank-r intermediate (tokens x r), not the (tokens x out) output: cheaper
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, A) * self.scaling, B)

    def effective_weight(self) -> torch.Tensor:
        """W + scaling * B A: the weight forward() applies, and the one merged() writes."""
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def recycle(self, slots: torch.Tensor) -> dict:
        """Eq. (9)-(12): fuse the pairs in `slots` into W and refill them from the next unused directions.

        Preserves effective_weight() up to one rounding of W: what Eq. (10) adds to W is the old
        pairs' product, and what Eq. (12) subtracts is the new pairs' product, which B A now holds.
        Returns the log record, or None if the layer has no unused directions left.
        """
        k, p, s = slots.numel(), self.next_index, self.scaling
        if p + k > self.r_target:                                     # exhausted: never reuse a direction
            return None
        fused_out = self.active_indices[slots].clone()
        cols = torch.arange(p - self.r, p - self.r + k, device=self.S.device)    # directions p .. p+k-1
        B_out, A_out = self.lora_B[:, slots].clone(), self.lora_A[slots]          # Eq. (9): the pairs I_low
        sqrt_S = (self.S[cols].to(A_out.dtype) / s).sqrt()
        B_in = self.U[:, cols] * sqrt_S                                            # Eq. (11)
        A_in = sqrt_S[:, None] * self.Vh[cols]                                     # Eq. (11)
        self.lora_B[:, slots] = B_in
        self.lora_A[slots] = A_in
        self._add_low_rank(self.weight, torch.cat([B_out, B_in], 1), torch.cat([A_out, -A_in]))  # Eq. (10), (12)
        self.active_indices[slots] = torch.arange(p, p + k, device=slots.device)
        self.next_index = p + k
        return {"slots": slots, "fused_out": fused_out, "brought_in": list(range(p, p + k))}

    @torch.no_grad()
    def _add_low_rank(self, W, B, A):
        """W += scaling B A, summed in A's dtype (fp32) and rounded to W's dtype once."""
        exact = W.to(A.dtype)                                         # a fresh fp32 copy of a bf16 W; W if fp32
        exact.addmm_(B, A, alpha=self.scaling)
        W.copy_(exact)

    @torch.no_grad()
    def clear_slots(self, slots, A_like=(), B_like=()):
        """Zero slot k, row k of each A-shaped and column k of each B-shaped tensor (EMAs, moments)."""
        for t in A_like:
            t[slots] = 0
        for t in B_like:
            t[:, slots] = 0

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The frozen layer type this one wrapped (nn.Linear or Conv1D), holding effective_weight()."""
        W = self.effective_weight().to(self.base_dtype)
        with torch.device("meta"):                                    # a shell: no weight allocated, no init run
            layer = (nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
                     if self.base_type is nn.Linear else self.base_type(self.out_features, self.in_features))
        W = W if self.base_type is nn.Linear else W.T                 # Conv1D(nf, nx) holds W as (in, out)
        layer.weight = nn.Parameter(W.contiguous(), requires_grad=False)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().to(self.base_dtype, copy=True), requires_grad=False)
        return layer

    # next_index stays a Python int (no device sync to read it).  It travels in the state dict as
    # one small tensor, (next_index, r, alpha), because save_pretrained and safetensors store tensors only.
    def get_extra_state(self):
        return torch.tensor([self.next_index, self.r, self.alpha], dtype=torch.float64)

    def set_extra_state(self, state):
        self.next_index = int(state["next_index"] if isinstance(state, dict) else state[0])  # dict: older saves

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Refuse another r or alpha before any tensor is copied: a different scaling = alpha / r
        # would load without a shape error and silently change the outputs.
        saved = state_dict.get(prefix + "_extra_state")
        if torch.is_tensor(saved) and (int(saved[1]), float(saved[2])) != (self.r, float(self.alpha)):
            raise ValueError(f"{prefix[:-1] or 'layer'}: the state dict was saved with r={int(saved[1])}, "
                             f"alpha={float(saved[2])} but this model has r={self.r}, alpha={self.alpha}; "
                             f"wrap it with apply_srlora(..., r={int(saved[1])}, alpha={float(saved[2])}) before loading")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, r_target={self.r_target}, init={self.init}"


def srlora_layers(model: nn.Module):
    """(name, layer) for every SRLoRALinear in model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SRLoRALinear)]


_ADD_ON_CLASSES = {}


def extend_layer(layer: SRLoRALinear, add_on: type, prefix: str) -> None:
    """Put `add_on`, an add-on's subclass of SRLoRALinear, in front of layer's class, which may
    already be another add-on's or fully_shard's subclass (how the add-ons change recycle())."""
    cls = type(layer)
    if not issubclass(cls, add_on):
        if (add_on, cls) not in _ADD_ON_CLASSES:
            _ADD_ON_CLASSES[add_on, cls] = add_on if cls is SRLoRALinear else type(prefix + cls.__name__, (add_on, cls), {})
        layer.__class__ = _ADD_ON_CLASSES[add_on, cls]


# --- 2. importance --------------------------------------------------------------------------

class ImportanceTracker:
    """Smoothed sensitivity of every entry of every lora_A and lora_B (Eq. 3-7).

    Four EMA tensors per layer, shaped like A and B, from zero; beta1, beta2 from the layers' config.
    Call update() once per optimizer step, after backward() (after the last micro-batch under
    gradient accumulation) and before optimizer.step(), so that w and its gradient belong together.
    """

    def __init__(self, model: nn.Module):
        named = srlora_layers(model)
        if not named:
            raise ValueError("model has no SRLoRALinear layers; call apply_srlora(model, ...) first")
        betas = {(layer.config.beta1, layer.config.beta2) for _, layer in named}
        if len(betas) > 1:
            raise ValueError(f"the layers were wrapped with different beta1 / beta2 {sorted(betas)}; "
                             f"one ImportanceTracker needs one pair")
        (self.beta1, self.beta2), = betas
        for name, layer in named:         # a DTensor weight needs the FSDP add-on's recycle()
            if hasattr(layer.weight, "device_mesh") and not getattr(layer, "sharded", False):
                raise ValueError(f"{name} is sharded by fully_shard; call srlora_fsdp.shard_basis(model) first")
        self.names = [name for name, _ in named]
        self.layers = [layer for _, layer in named]
        self.index = {id(layer): i for i, layer in enumerate(self.layers)}
        # Flat lists, A's then B's, so update() is one _foreach pass over all adapters.
        self.params = [l.lora_A for l in self.layers] + [l.lora_B for l in self.layers]
        self.ibar = [torch.zeros_like(p) for p in self.params]    # Ibar, Eq. (4)
        self.ubar = [torch.zeros_like(p) for p in self.params]    # Ubar, Eq. (5)

    @torch.no_grad()
    def update(self):
        """One EMA step of Eq. (3)-(5) for every adapter whose .grad is set."""
        self._check_current()
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:        # after zero_grad(), or adapters frozen (by another wrapper): a silent no-op otherwise
            raise RuntimeError("ImportanceTracker.update(): no lora_A / lora_B has a gradient; call it after "
                               "loss.backward() and before optimizer.zero_grad(), with the adapters trainable")
        ibar, ubar = [self.ibar[i] for i in live], [self.ubar[i] for i in live]
        sens = torch._foreach_mul([self.params[i] for i in live], [self.params[i].grad for i in live])
        torch._foreach_abs_(sens)                                            # Eq. (3)  I = |w * dL/dw|
        torch._foreach_mul_(ibar, self.beta1)
        torch._foreach_add_(ibar, sens, alpha=1 - self.beta1)                # Eq. (4)
        dev = torch._foreach_sub(sens, ibar)                                 # uses the updated Ibar
        torch._foreach_abs_(dev)
        torch._foreach_mul_(ubar, self.beta2)
        torch._foreach_add_(ubar, dev, alpha=1 - self.beta2)                 # Eq. (5)

    def pair_scores(self, layer: SRLoRALinear) -> torch.Tensor:
        """S_k for the r pairs of `layer`, shape (r,)."""
        i, L = self.index[id(layer)], len(self.layers)
        s_A = self.ibar[i] * self.ubar[i]                                    # Eq. (6), (r, n)
        s_B = self.ibar[L + i] * self.ubar[L + i]                            # Eq. (6), (m, r)
        scores = s_B.mean(dim=0) + s_A.mean(dim=1)                           # Eq. (7)
        return scores.full_tensor() if hasattr(scores, "full_tensor") else scores  # sharded: whole on every rank

    @torch.no_grad()
    def reset(self, layer: SRLoRALinear, slots: torch.Tensor = None):
        """Zero the importance state of `slots` (rows of A, columns of B), or of all slots."""
        i, L = self.index[id(layer)], len(self.layers)
        layer.clear_slots(slice(None) if slots is None else slots,
                          (self.ibar[i], self.ubar[i]), (self.ibar[L + i], self.ubar[L + i]))

    def _check_current(self):
        # fully_shard (or anything that re-registers lora_A / lora_B) replaces the Parameters;
        # EMAs of the old ones would silently never update again.
        for name, layer, a, b in zip(self.names, self.layers, self.params, self.params[len(self.layers):]):
            if a is not layer.lora_A or b is not layer.lora_B:
                raise RuntimeError(f"ImportanceTracker: {name}.lora_A / lora_B are not the tensors the tracker "
                                   f"was created with (fully_shard replaces them); create the tracker after "
                                   f"fully_shard(model)")

    def state_dict(self) -> dict:
        L = len(self.layers)
        return {"beta1": self.beta1, "beta2": self.beta2,
                **{name: {"ibar_A": self.ibar[i], "ubar_A": self.ubar[i], "ibar_B": self.ibar[L + i],
                          "ubar_B": self.ubar[L + i]} for i, name in enumerate(self.names)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict):
        missing = sorted(set(self.names) - set(state))
        if missing or (state["beta1"], state["beta2"]) != (self.beta1, self.beta2):
            raise ValueError(f"tracker state was saved from a model adapted otherwise (layer {missing[:1]} missing, "
                             f"or beta1, beta2 = {state['beta1']}, {state['beta2']} not {self.beta1}, {self.beta2})")
        L = len(self.layers)
        for i, name in enumerate(self.names):
            for ema, j, key in ((self.ibar, i, "ibar_A"), (self.ubar, i, "ubar_A"),
                                (self.ibar, L + i, "ibar_B"), (self.ubar, L + i, "ubar_B")):
                ema[j].copy_(state[name][key])


# --- 3. recomposition -----------------------------------------------------------------------

FIRST_MOMENTS = ("exp_avg", "momentum_buffer")      # AdamW / SGD-momentum state that follows the gradient
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")   # AdamW state that sets the step size


def lowest_scores(tracker: ImportanceTracker, layer: SRLoRALinear, k: int) -> torch.Tensor:
    """Eq. (8): I_low, the k slots with the lowest S_k.  recompose()'s default `select`."""
    return tracker.pair_scores(layer).topk(k, largest=False).indices


@torch.no_grad()
def recompose(model: nn.Module, tracker: ImportanceTracker, optimizer=None, layers=None, select=None) -> list:
    """Eq. (8)-(12) on every SRLoRALinear: recycle its r' = round(gamma r) lowest-scoring pairs.

    Invariant: every layer's effective_weight(), hence the model's function, is unchanged up to one
    rounding of W per switch; the singular indices ever brought in are 0 .. next_index-1, each once.
    gamma, reset and moments come from the SRLoRAConfig each layer was wrapped with:
    reset:   "recycled" zeroes the importance state of the refilled slots only (Algorithm 1, line 10);
             "all" zeroes every slot of the layer (the text of Section 3.1).
    optimizer: the first moment (exp_avg, momentum_buffer) of recycled slots is zeroed; the new
             directions owe nothing to the old gradients.
    moments: the second moment (exp_avg_sq).  AdamW keeps one `step` per tensor, so a zeroed one is
             bias-corrected as if old and the slot's first updates are ~(1-b1)/sqrt(1-b2) ~ 3x normal.
             "reset" (the default) zeroes it, as for a fresh parameter, and accepts the larger first
             steps; "keep" leaves it: updates restart at ~(1-b1) of normal and grow, a built-in
             warm-up, which measured worse (docs/RESULTS.md, "The moments default").
    layers:  names of the layers to switch (None: all).  select(tracker, layer, k): the k slots to
             recycle (lowest_scores by default; srlora_switch.py has others).
    Returns one record per layer that switched: layer name, slots, indices fused out and brought in.
    """
    events = []
    for name, layer in _checked(model, tracker, optimizer):
        cfg, k = layer.config, n_recycle(layer.r, layer.config.gamma)
        if layers is not None and name not in layers or layer.next_index + k > layer.r_target:
            continue                                                   # not asked for, or exhausted
        finite, zero = torch.stack([(s := tracker.pair_scores(layer)).isfinite().all(), (s == 0).all()]).tolist()
        if not finite or zero:
            raise ValueError(f"recompose: {name}'s pair scores are {'not finite' if not finite else 'all 0'}; "
                             f"call tracker.update() after each loss.backward(), with finite gradients")
        slots = (select or lowest_scores)(tracker, layer, k)                               # Eq. (8)
        event = layer.recycle(slots)                                                      # Eq. (9)-(12)
        tracker.reset(layer, slots if cfg.reset == "recycled" else None)
        if optimizer is not None:
            keys = FIRST_MOMENTS + (SECOND_MOMENTS if cfg.moments == "reset" else ())
            def state_of(p):   # the optimizer keys its state by the Parameter itself: no name lookups
                return [v for key, v in optimizer.state.get(p, {}).items()
                        if key in keys and torch.is_tensor(v) and v.shape == p.shape]
            layer.clear_slots(slots, state_of(layer.lora_A), state_of(layer.lora_B))
        events.append({"layer": name, "slots": slots.tolist(),
                       "fused_out": event["fused_out"].tolist(), "brought_in": event["brought_in"]})
    return events


def _checked(model, tracker, optimizer) -> list:
    """srlora_layers(model), once each misuse that would otherwise pass silently is ruled out."""
    if optimizer is not None and not hasattr(optimizer, "param_groups"):
        raise TypeError(f"recompose(model, tracker, optimizer): got {optimizer!r} for the optimizer; "
                        f"gamma, reset and moments come from the SRLoRAConfig given to apply_srlora")
    named = srlora_layers(model)
    held = None if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, layer in named:
        if id(layer) not in tracker.index:
            raise ValueError(f"recompose: {name} is not a layer of the tracker's model; use ImportanceTracker(model)")
        if held is not None and id(layer.lora_A) not in held:
            raise ValueError(f"recompose: the optimizer does not hold {name}.lora_A; build it after apply_srlora "
                             f"(and fully_shard), from the parameters that require grad")
    if not named:
        raise ValueError(f"recompose: {type(model).__name__} has no SRLoRALinear layers; call apply_srlora first")
    return named


def switch_steps(total_steps: int, r: int, r_target: int, gamma: float) -> list:
    """The switch steps T_switch of Eq. (13)-(14): recompose() runs after these optimizer steps.

    N_switch = (r_target - r) // r' and t_interval = total_steps // N_switch, so the steps are
    t_interval, 2 t_interval, ..., N_switch t_interval: the last switch falls at (or just before)
    the end of training.  r_target <= r gives no switches (SRLoRA reduces to PiSSA).
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma={gamma} is outside (0, 1]; it is the fraction of the r slots "
                         f"recycled at each switch, e.g. gamma=0.5")
    n_switch = min((r_target - r) // n_recycle(r, gamma), total_steps)   # Eq. (13)
    if n_switch <= 0:
        return []
    interval = total_steps // n_switch                                    # Eq. (14)
    return [interval * i for i in range(1, n_switch + 1)]


# --- applying it to a model -----------------------------------------------------------------

# The paper's maps per block: Q, K, V, attention output, FFN (Section 4.1); transformers 5, timm 1.0 names.
PAPER_TARGETS = {
    "bert": ("query", "key", "value",                                 # Bert*; the SRLoRAConfig default
             "attention.output.dense", "intermediate.dense", "output.dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj",            # DebertaV2* (DeBERTa-v3 too)
                   "attention.output.dense", "intermediate.dense", "output.dense"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj",                 # Llama*, Mistral*, Qwen2*: the FFN is
              "gate_proj", "up_proj", "down_proj"),                   # gated, three maps where BERT has two
    "vit": ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),    # transformers ViT*
    "timm-vit": ("qkv", "attn.proj", "fc1", "fc2"),                   # timm ViT: Q, K, V are one map; "attn.proj",
                                                                      # since patch_embed.proj is a Conv2d
    "gpt2": ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"),          # GPT2* (Conv1D); lm_head is tied to wte
}


def apply_srlora(model: nn.Module, config: SRLoRAConfig = None, decompose=None, **overrides) -> nn.Module:
    """Replace every nn.Linear (or Conv1D) whose name matches config.targets by an SRLoRALinear,
    and freeze everything else: only lora_A and lora_B require grad, so unfreeze a head yourself.
    Keywords override fields of `config` (r=4, ...).  Returns model, modified in place.

    A target matches a module whose dotted name equals it or ends with "." + target ("output.dense"
    matches "...attention.output.dense").  A match that is no linear layer is left alone with a
    warning; a weight tied to another (GPT-2's lm_head) is refused: wrapping would untie them.
    decompose(model, names, cfg) -> {name: (U, S, Vh)}: pissa_factors, or srlora_fsdp.spread_factors.
    """
    cfg = dataclasses.replace(config or SRLoRAConfig(), **overrides)
    matched = [(name, m) for name, m in model.named_modules() if matches(name, cfg.targets)]
    found = [(name, m) for name, m in matched if _wrappable(m)]
    skipped = [f"{name} ({type(m).__name__})" for name, m in matched if not _wrappable(m)]
    listed = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    if not found:
        raise ValueError(f"targets={list(cfg.targets)} match no nn.Linear or Conv1D in {type(model).__name__}"
                         f"{' (only ' + listed + ')' if skipped else ''}; pass name suffixes of its "
                         f"linear layers, e.g. {_linear_names(model)[:4]}")
    if skipped:
        warnings.warn(f"targets={list(cfg.targets)} also match modules that are not nn.Linear or Conv1D, "
                      f"left unchanged: {listed}", stacklevel=2)
    weight_names = _weight_names(model)
    for name, m in found:
        tied = [other for other in weight_names.get(id(m.weight), ()) if other != f"{name}.weight"]
        if tied:
            raise ValueError(f"{name}.weight is tied to {tied[0]}; wrapping it would untie them, so "
                             f"choose targets that do not match {name!r}")
    _freeze_but_adapters(model)                           # a second call keeps the first call's adapters trainable
    names = [name for name, _ in found]
    factors = (decompose or pissa_factors)(model, names, cfg) if cfg.init == "pissa" else {}
    for name, m in found:
        _replace(model, name, SRLoRALinear(m, cfg, factors=factors.pop(name, None)))
    return model


def _freeze_but_adapters(model: nn.Module) -> None:
    model.requires_grad_(False)
    for _, layer in srlora_layers(model):
        layer.lora_A.requires_grad_(True), layer.lora_B.requires_grad_(True)


def pissa_factors(model: nn.Module, names, cfg: SRLoRAConfig) -> dict:
    """{name: (U, S, Vh)}: the top min(r_target, m, n) SVD triplets of each weight of `names`, one
    call per weight (a batched call's results depend on a matrix's place in the batch, and the FSDP
    add-on's ranks must match one process bit for bit).  min(m, n) < r: left to SRLoRALinear's error."""
    factors = {}
    for name in names:
        W = _out_in_weight(model.get_submodule(name)).detach()
        k = min(cfg.r_target, *W.shape)
        if k >= cfg.r:
            factors[name] = top_singular(W, k, cfg.svd)
    return factors


def matches(name: str, targets) -> bool:
    """A module name matches a target that it equals or ends with on a dot boundary."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _wrappable(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and not isinstance(module, SRLoRALinear)


def _weight_names(model: nn.Module) -> dict:
    """{id(parameter): every name it has in model}: a tied weight (GPT-2's lm_head and wte) has two."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _linear_names(model):
    """Last name parts of the modules apply_srlora can wrap, tied weights left out."""
    weight_names = _weight_names(model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if _wrappable(m) and len(weight_names.get(id(m.weight), ())) <= 1 and not _in_peft_layer(name)})


def _in_peft_layer(name: str) -> bool:
    """A module of PEFT's own (its base_layer, or its lora_A / lora_B), which SRLoRA never targets."""
    return any(part in ("base_layer", "lora_A", "lora_B") for part in name.split("."))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def merge_srlora(model: nn.Module) -> nn.Module:
    """Replace every SRLoRALinear by the frozen layer type it wrapped, holding effective_weight()."""
    for name, layer in srlora_layers(model):
        _replace(model, name, layer.merged())
    return model
