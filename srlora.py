"""SRLoRA: Subspace Recomposition in Low-Rank Adaptation, a reference implementation.

Paper: H. Yang, L. Wang, M. Z. Hossain, "SRLoRA: Subspace Recomposition in Low-Rank
Adaptation via Importance-Based Fusion and Reinitialization" (2025), Section 3 and Algorithm 1.
It builds on PiSSA (Meng et al., 2024) for the SVD initialisation and on AdaLoRA / PLATON
(Zhang et al., 2022, 2023) for the smoothed sensitivity score.

The whole method is four steps:
  1. PiSSA: W0 = U S V^T; the adapter starts as the top-r directions and W holds the rest.
  2. Track, per rank-1 pair (column k of B, row k of A), an EMA of sensitivity |w * grad|
     and of its uncertainty (Eq. 3-7).                                ImportanceTracker.update()
  3. At a switch step, fuse the r' least important pairs into W (Eq. 8-10), refill them
     from the next unused singular directions and subtract those from W (Eq. 11-12).
     The effective weight W + scaling * B A does not change.                   recompose()
  4. Switch steps are evenly spaced so that the run ends having visited r_target
     directions (Eq. 13-14).                                                switch_steps()
     Or each layer switches when its own scores say so (the paper's future work).  AdaptiveSchedule

Where the paper is silent this file makes a choice and says so where it is made:
alpha/r scaling, the SVD algorithm, optimizer state of recycled slots, and which
importance state is reset.  Alternatives that change the switch dynamics (score, grace,
switch_stop, switch_schedule) are fields of SRLoRAConfig; the defaults are the paper's.
Depends on torch alone.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SRLoRAConfig:
    r: int = 8              # trainable rank per layer; the paper uses 8 everywhere
    alpha: float = 8.0      # scaling = alpha / r; the paper uses alpha = r, i.e. scaling 1
    r_target: int = 32      # largest subspace a layer may visit; r_target == r is plain PiSSA
    gamma: float = 0.5      # fusion ratio: r' = round(gamma * r) slots recycled per switch
    beta1: float = 0.85     # EMA factor of sensitivity, Eq. (4); AdaLoRA's value, as in the paper
    beta2: float = 0.85     # EMA factor of uncertainty, Eq. (5)
    targets: tuple = ("query", "key", "value", "attention.output.dense",
                      "intermediate.dense", "output.dense")  # BERT names of the paper's six maps
    init: str = "pissa"     # "pissa": top-r SVD (SRLoRA, PiSSA); "lora": Kaiming A, zero B
    reset: str = "recycled" # importance reset at a switch: "recycled" (Alg. 1 line 10) or "all" (Sec. 3.1)
    moments: str = "keep"   # optimizer 2nd moment of recycled slots: "keep" or "reset" (see recompose)
    svd: str = "auto"       # "full", "lowrank" (randomized, seeded) or "auto" (full up to AUTO_FULL_MAX wide, else lowrank)
    # Alternatives that change the switch dynamics (README: silent choices); each default is the paper's.
    score: str = "paper"    # "paper": Eq. (7); "relative": Eq. (7) / (|B_k| |A_k|)^2, so a slot's score does not grow with its size
    grace: int = 0          # a slot refilled at one switch cannot be recycled at its layer's next `grace` switches
    switch_stop: float = 1.0        # the fixed schedule puts every switch within the first switch_stop of the steps
    switch_schedule: str = "fixed"  # "fixed": Eq. (13)-(14); "adaptive": each layer when AdaptiveSchedule says so
    adapt_ratio: float = 0.1        # adaptive: a layer switches when its lowest score < adapt_ratio * its mean score
                                    # (0.5 switched 29-31 of MiniLM's 36 layers at every check they were allowed)
    adapt_every: int = 10           # adaptive: steps between checks (each check reads one number per layer)


def n_recycle(r: int, gamma: float) -> int:
    """r' = round(gamma * r), at least 1 so that every gamma in (0, 1] recycles something."""
    return max(1, round(gamma * r))


def check_gamma(gamma: float) -> None:
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma={gamma} is outside (0, 1]; it is the fraction of the r slots "
                         f"recycled at each switch, e.g. gamma=0.5")


def switch_steps(total_steps: int, r: int, r_target: int, gamma: float, stop: float = 1.0) -> list:
    """The switch steps T_switch of Eq. (13)-(14): recompose() runs after these optimizer steps.

    N_switch = (r_target - r) // r' and t_interval = total_steps // N_switch, so the steps are
    t_interval, 2 t_interval, ..., N_switch t_interval.  This is the paper's schedule: its last
    switch falls at (or just before) the end of training, so the directions it brings in are
    barely trained.  stop < 1 spreads the same N_switch switches over the first round(stop *
    total_steps) steps instead, so the last directions still train for the rest of the run.
    r_target <= r gives no switches (SRLoRA reduces to PiSSA).
    """
    check_gamma(gamma)
    if not 0.0 < stop <= 1.0:
        raise ValueError(f"stop={stop} is outside (0, 1]; it is the fraction of the steps within "
                         f"which all switches fall, e.g. stop=0.8 (1.0 is the paper's schedule)")
    horizon = round(stop * total_steps)
    n_switch = (r_target - r) // n_recycle(r, gamma)                      # Eq. (13)
    n_switch = min(n_switch, horizon)
    if n_switch <= 0:
        return []
    interval = horizon // n_switch                                        # Eq. (14), over the horizon
    return [interval * i for i in range(1, n_switch + 1)]


# "auto" takes the exact SVD up to this smaller side: 1.6 s per 1024x1024 matrix on one CPU thread,
# against 9.5 s at 2048 and 75 s at 4096 (bench/svd_accuracy.py, docs/BENCHMARKS.md).
AUTO_FULL_MAX = 1024


@torch.no_grad()
def top_singular(W: torch.Tensor, k: int, method: str = "auto", niter: int = 16, seed: int = 0,
                 oversample: float = 1.0):
    """Top-k singular triplets (U (.., m, k), S (.., k), Vh (.., k, n)) of W (.., m, n), in fp32.

    "full" is the exact torch.linalg.svd.  "lowrank" is the randomized range finder of Halko,
    Martinsson and Tropp (2011) with a sketch of k + max(8, oversample k) columns and `niter` power iterations;
    its Gaussian test matrix comes from a generator seeded with `seed`, so every process (e.g.
    every DDP rank) gets the same basis and the global RNG is left untouched.  "auto" is "full"
    when min(m, n) <= AUTO_FULL_MAX or the sketch is not much narrower than W, else "lowrank".
    The 2k sketch and 16 iterations are what it took on real weights for the directions that
    recompose() brings in, the tail r .. k-1 of the window, to be the exact singular vectors
    (|cos| >= 0.99 wherever neighbouring singular values differ by > 1%); a 1.5k sketch with 4
    iterations gave |cos| down to 0.025 there.  Leading batch dimensions are allowed, so
    same-shaped weights share one call.
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


class SRLoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable rank-r pair: y = x W^T + b + scaling * x A^T B^T.

    W (`weight`) is the frozen residual, A (`lora_A`, (r, n)) and B (`lora_B`, (m, r)) train,
    scaling = alpha / r.  With init="pissa", W0 = U S V^T and (Eq. 2)
        B = U[:, :r] sqrt(S[:r] / scaling),  A = sqrt(S[:r] / scaling) V[:, :r]^T,  W = W0 - scaling B A,
    so the layer computes exactly what the wrapped one did.  S is divided by scaling so that
    scaling * B A is the top-r part of W0 for any alpha (PEFT's PiSSA convention; the paper
    writes its equations for scaling = 1).  init="lora" is LoRA: Kaiming-uniform A, zero B, W = W0.

    Slot k holds singular direction active_indices[k]; next_index is p_r of Eq. (11), the next
    unused direction.  Only directions r .. r_target-1 are kept (buffers U, S, Vh, in fp32):
    direction p sits in column p - r.  W and the basis are kept in fp32 (fp64 for fp64 input)
    so that repeated fuse/reinit does not accumulate half-precision rounding.
    `factors` = (U, S, Vh) of the top min(r_target, m, n) directions, if already computed.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 8.0, r_target: int = None,
                 init: str = "pissa", svd: str = "auto", factors=None):
        if not isinstance(base, nn.Linear):
            raise ValueError(f"SRLoRALinear wraps an nn.Linear, got {type(base).__name__}; "
                             f"choose targets that name nn.Linear modules")
        m, n = base.out_features, base.in_features
        d = min(m, n)
        r_target = r if r_target is None else r_target
        if not 1 <= r <= d:
            raise ValueError(f"r={r} must be between 1 and min(out, in)={d} for this "
                             f"{m}x{n} layer; use a smaller r")
        if r_target < r:
            raise ValueError(f"r_target={r_target} is smaller than r={r}; use r_target >= r "
                             f"(r_target == r means PiSSA, no switches)")
        if init not in ("pissa", "lora"):
            raise ValueError(f"init={init!r} is unknown; use 'pissa' or 'lora'")
        # Build the nn.Linear shell on the meta device: no second (m, n) weight is allocated.
        super().__init__(n, m, bias=base.bias is not None, device="meta")
        self.r, self.alpha, self.scaling, self.init = r, alpha, alpha / r, init
        self.r_target = min(r_target, d) if init == "pissa" else r   # a layer cannot visit more than d directions
        self.base_dtype = base.weight.dtype                          # merge_srlora() returns to it
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        W0 = base.weight.detach().to(dtype)
        if base.bias is not None:                                     # frozen; shares storage unless upcast
            self.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)

        if init == "pissa":
            U, S, Vh = factors if factors is not None else top_singular(W0, self.r_target, svd)
            U, S, Vh = U.to(dtype), S.to(dtype), Vh.to(dtype)
            sqrt_S = (S[:r] / self.scaling).sqrt()                    # divided by scaling: scaling*B*A = U S V^T
            B = U[:, :r] * sqrt_S                                     # Eq. (2)
            A = sqrt_S[:, None] * Vh[:r]                              # Eq. (2)
            W = W0 - self.scaling * (B @ A)                           # Eq. (2) residual
            active = torch.arange(r)
            U, S, Vh = U[:, r:].contiguous(), S[r:].contiguous(), Vh[r:].contiguous()  # unused directions only
        else:
            A = torch.empty(r, n, dtype=dtype, device=W0.device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))               # as loralib and PEFT do
            B = torch.zeros(m, r, dtype=dtype, device=W0.device)
            W = W0                                                    # never changed in place: LoRA has no switches
            active = torch.full((r,), -1)                            # -1: not a singular direction
            U, S, Vh = W0.new_zeros(m, 0), W0.new_zeros(0), W0.new_zeros(0, n)
        self.weight = nn.Parameter(W, requires_grad=False)
        self.lora_A = nn.Parameter(A.contiguous())
        self.lora_B = nn.Parameter(B.contiguous())
        self.register_buffer("U", U)
        self.register_buffer("S", S)
        self.register_buffer("Vh", Vh)
        self.register_buffer("active_indices", active.to(W0.device))
        self.next_index = r                                          # p_r: directions 0..r-1 are in use

    def forward(self, x):
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return self.forward(x.to(self.weight.dtype)).to(x.dtype)  # a half-precision model: compute in fp32
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def effective_weight(self) -> torch.Tensor:
        """W + scaling * B A: the weight forward() applies, and the one merge_srlora() writes."""
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def recycle(self, slots: torch.Tensor) -> dict:
        """Fuse the pairs in `slots` into W and refill them from the next unused directions.

        Preserves effective_weight() up to rounding: what Eq. (10) adds to W is the old pairs'
        product and what Eq. (12) subtracts is the new pairs' product, which B A now holds.
        Returns the log record, or None if the layer has no unused directions left.
        """
        k = slots.numel()
        p = self.next_index
        if p + k > self.r_target:                                    # exhausted: never reuse a direction
            return None
        fused_out = self.active_indices[slots].clone()
        s = self.scaling
        self.weight.addmm_(self.lora_B[:, slots], self.lora_A[slots], alpha=s)     # Eq. (9)-(10)
        cols = torch.arange(p - self.r, p - self.r + k, device=self.U.device)      # directions p .. p+k-1
        sqrt_S = (self.S[cols] / s).sqrt()
        self.lora_B[:, slots] = self.U[:, cols] * sqrt_S                            # Eq. (11)
        self.lora_A[slots] = sqrt_S[:, None] * self.Vh[cols]                        # Eq. (11)
        self.weight.addmm_(self.lora_B[:, slots], self.lora_A[slots], alpha=-s)    # Eq. (12)
        self.active_indices[slots] = torch.arange(p, p + k, device=slots.device)
        self.next_index = p + k
        return {"slots": slots, "fused_out": fused_out, "brought_in": list(range(p, p + k))}

    # next_index is a Python int (no device sync to read it); it travels in the state dict here.
    def get_extra_state(self):
        return {"next_index": self.next_index}

    def set_extra_state(self, state):
        self.next_index = int(state["next_index"])

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, r_target={self.r_target}, init={self.init}")


def srlora_layers(model: nn.Module):
    """(name, layer) for every SRLoRALinear in model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SRLoRALinear)]


def _matches(name: str, targets) -> bool:
    # A target matches a module whose dotted name equals it or ends with "." + target.
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_srlora(model: nn.Module, config: SRLoRAConfig = None, **overrides) -> nn.Module:
    """Replace every nn.Linear whose name matches `targets` by an SRLoRALinear; freeze the rest.

    `targets` are name suffixes on dot boundaries: "value" matches "encoder.layer.0.attention.self.value",
    "output.dense" matches both "...attention.output.dense" and "...layer.0.output.dense".  Modules
    that match but are not nn.Linear (a Conv2d named "proj") are left alone.  Same-shaped weights
    share one batched SVD.  Afterwards only lora_A and lora_B require grad; unfreeze a classifier
    head yourself.  Returns model, modified in place.
    """
    cfg = dataclasses.replace(config or SRLoRAConfig(), **overrides)
    check_gamma(cfg.gamma)
    targets = [cfg.targets] if isinstance(cfg.targets, str) else list(cfg.targets)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, SRLoRALinear) and _matches(name, targets)]
    if not found:
        raise ValueError(f"targets={targets} match no nn.Linear in {type(model).__name__}; "
                         f"pass name suffixes of its linear layers, e.g. {_linear_names(model)[:4]}")
    model.requires_grad_(False)
    factors = {}
    if cfg.init == "pissa":                    # one batched SVD per group of same-shaped weights
        groups = {}
        for name, m in found:
            groups.setdefault((tuple(m.weight.shape), m.weight.device), []).append(name)
        for (shape, _), names in groups.items():
            k = min(cfg.r_target, *shape)
            if k < cfg.r:                      # let SRLoRALinear raise its clear error
                continue
            Ws = torch.stack([model.get_submodule(nm).weight.detach() for nm in names])
            U, S, Vh = top_singular(Ws, k, cfg.svd)
            factors.update({nm: (U[i], S[i], Vh[i]) for i, nm in enumerate(names)})
            del Ws
    for name, m in found:
        layer = SRLoRALinear(m, r=cfg.r, alpha=cfg.alpha, r_target=cfg.r_target, init=cfg.init,
                             svd=cfg.svd, factors=factors.pop(name, None))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model


def _linear_names(model):
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


@torch.no_grad()
def merge_srlora(model: nn.Module) -> nn.Module:
    """Replace every SRLoRALinear by a plain, frozen nn.Linear holding effective_weight()."""
    for name, layer in srlora_layers(model):
        merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.base_dtype)
        merged.weight.copy_(layer.effective_weight())
        if layer.bias is not None:
            merged.bias.copy_(layer.bias)
        merged.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, merged)
    return model


class ImportanceTracker:
    """Smoothed sensitivity of every entry of every lora_A and lora_B (Eq. 3-7).

    Holds four EMA tensors per layer, shaped like A and B and starting at zero.  Call update()
    once per optimizer step, after backward() and before optimizer.step(), so that w and its
    gradient belong to the same step.  With gradient accumulation call it once, after the last
    micro-batch; under DDP the gradients are already all-reduced, so every rank agrees.
    """

    def __init__(self, model: nn.Module, beta1: float = 0.85, beta2: float = 0.85):
        for nm, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{nm}={b} is outside [0, 1); it is an EMA factor, e.g. 0.85")
        self.beta1, self.beta2 = beta1, beta2
        named = srlora_layers(model)
        if not named:
            raise ValueError("model has no SRLoRALinear layers; call apply_srlora(model, ...) first")
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
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        ps = [self.params[i] for i in live]
        ibar = [self.ibar[i] for i in live]
        ubar = [self.ubar[i] for i in live]
        sens = torch._foreach_mul(ps, [p.grad for p in ps])
        torch._foreach_abs_(sens)                                            # Eq. (3)  I = |w * dL/dw|
        torch._foreach_mul_(ibar, self.beta1)
        torch._foreach_add_(ibar, sens, alpha=1 - self.beta1)                # Eq. (4)
        dev = torch._foreach_sub(sens, ibar)                                 # uses the updated Ibar
        torch._foreach_abs_(dev)
        torch._foreach_mul_(ubar, self.beta2)
        torch._foreach_add_(ubar, dev, alpha=1 - self.beta2)                 # Eq. (5)

    def pair_scores(self, layer: SRLoRALinear, relative: bool = False) -> torch.Tensor:
        """S_k for the r pairs of `layer`, shape (r,).

        relative=True divides S_k by (|B_k| |A_k|)^2: each I of Eq. (3) is |w * dL/dw|, which
        for pair k is proportional to |B_k| |A_k|, so Eq. (6)-(7) grow as its square and a slot
        that starts from a large singular value outscores a small one for that reason alone.
        """
        i, L = self.index[id(layer)], len(self.layers)
        s_A = self.ibar[i] * self.ubar[i]                                    # Eq. (6), (r, n)
        s_B = self.ibar[L + i] * self.ubar[L + i]                            # Eq. (6), (m, r)
        scores = s_B.mean(dim=0) + s_A.mean(dim=1)                           # Eq. (7)
        if relative:
            size = layer.lora_B.norm(dim=0) * layer.lora_A.norm(dim=1)       # |B_k| |A_k| = sigma_k / scaling at refill
            scores = scores / size.square().clamp_min(torch.finfo(size.dtype).tiny)
        return scores

    @torch.no_grad()
    def reset(self, layer: SRLoRALinear, slots: torch.Tensor = None):
        """Zero the importance state of `slots` (rows of A, columns of B), or of all slots."""
        i, L = self.index[id(layer)], len(self.layers)
        for t in (self.ibar[i], self.ubar[i]):
            t[slots if slots is not None else slice(None)] = 0
        for t in (self.ibar[L + i], self.ubar[L + i]):
            t[:, slots if slots is not None else slice(None)] = 0

    def state_dict(self) -> dict:
        L = len(self.layers)
        state = {"beta1": self.beta1, "beta2": self.beta2}
        for i, name in enumerate(self.names):
            state[name] = {"ibar_A": self.ibar[i], "ubar_A": self.ubar[i],
                           "ibar_B": self.ibar[L + i], "ubar_B": self.ubar[L + i]}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict):
        missing = set(self.names) - set(state)
        if missing:
            raise ValueError(f"tracker state lacks layers {sorted(missing)[:3]}...; it was saved "
                             f"from a model adapted with other targets")
        self.beta1, self.beta2, L = state["beta1"], state["beta2"], len(self.layers)
        for i, name in enumerate(self.names):
            for ema, (a_key, b_key) in ((self.ibar, ("ibar_A", "ibar_B")), (self.ubar, ("ubar_A", "ubar_B"))):
                ema[i].copy_(state[name][a_key])
                ema[L + i].copy_(state[name][b_key])


FIRST_MOMENTS = ("exp_avg", "momentum_buffer")      # AdamW / SGD-momentum state that follows the gradient
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")   # AdamW state that sets the step size


@torch.no_grad()
def _reset_moments(optimizer, layer, slots, moments):
    # The optimizer keys its state by the Parameter object itself: no name lookups needed.
    keys = FIRST_MOMENTS + (SECOND_MOMENTS if moments == "reset" else ())
    for param, index in ((layer.lora_A, (slots,)), (layer.lora_B, (slice(None), slots))):
        for key, value in optimizer.state.get(param, {}).items():
            if key in keys and torch.is_tensor(value) and value.shape == param.shape:
                value[index] = 0


def eligible(layer: SRLoRALinear, k: int, grace: int = 0) -> torch.Tensor:
    """(r,) bool: the slots a switch may recycle.  With grace g, a slot refilled at one of the
    layer's last g switches is not.  No extra state: direction p >= r came in at the layer's
    switch (p - r) // r', so a slot's age is read off active_indices, which checkpoints hold."""
    if (grace + 1) * k > layer.r:
        raise ValueError(f"grace={grace} with r'={k} of r={layer.r} leaves fewer than r' slots to recycle; "
                         f"use grace <= {layer.r // k - 1} or a smaller gamma")
    p = layer.active_indices
    return (p < layer.r) | (layer.next_index - p > grace * k)


def _check_options(gamma, reset, moments, score):
    check_gamma(gamma)
    if reset not in ("recycled", "all") or moments not in ("keep", "reset"):
        raise ValueError(f"reset={reset!r} / moments={moments!r}: use reset in ('recycled', 'all') "
                         f"and moments in ('keep', 'reset')")
    if score not in ("paper", "relative"):
        raise ValueError(f"score={score!r} is unknown; use 'paper' (Eq. 7) or 'relative'")


@torch.no_grad()
def recompose(model: nn.Module, tracker: ImportanceTracker, gamma: float = 0.5, optimizer=None,
              reset: str = "recycled", moments: str = "keep", score: str = "paper", grace: int = 0,
              layers=None) -> list:
    """Eq. (8)-(12) on every SRLoRALinear: recycle its r' lowest-scoring pairs.

    Invariant: every layer's effective_weight() (hence the model's function) is unchanged,
    up to fp32 rounding; the singular indices ever brought in are 0 .. next_index-1, each once.

    reset:   "recycled" zeroes the importance state of the refilled slots only (Algorithm 1,
             line 10: kept slots keep their history); "all" zeroes every slot of the layer
             (the text of Section 3.1).
    optimizer, when given, has the first moment (exp_avg, momentum_buffer) of the recycled rows
             of A and columns of B zeroed: the new directions owe nothing to the old gradients.
    moments: the second moment (exp_avg_sq).  torch.optim.AdamW keeps one `step` per tensor, so
             a zeroed exp_avg_sq is bias-corrected as if it were old, and the first updates of a
             recycled slot come out ~(1-b1)/sqrt(1-b2) ~ 3x larger than a normal step.
             "keep" (default) leaves exp_avg_sq as is: the slot's updates restart at about
             (1-b1) of a normal step and grow as exp_avg refills, a built-in warm-up.  "reset"
             zeroes it too, as if the slot were a freshly created parameter, and accepts the
             larger first steps (per-slot step counters, as in SwitchLoRA, would need a custom optimizer).
    score:   "paper" ranks by Eq. (7); "relative" by Eq. (7) / (|B_k| |A_k|)^2 (see pair_scores).
    grace:   slots refilled at the layer's last `grace` switches are not recycled (see eligible).
    layers:  names of the layers to switch (AdaptiveSchedule.due); None switches every layer.
    Returns one record per layer that switched: layer name, slots, indices fused out and brought in.
    """
    _check_options(gamma, reset, moments, score)
    events = []
    for name, layer in srlora_layers(model):
        if layers is not None and name not in layers:
            continue
        k = n_recycle(layer.r, gamma)                                        # r' = gamma * r
        scores = tracker.pair_scores(layer, relative=score == "relative")
        scores = scores.masked_fill(~eligible(layer, k, grace), math.inf)   # grace: never among the lowest
        slots = scores.topk(k, largest=False).indices                       # Eq. (8): I_low
        event = layer.recycle(slots)
        if event is None:
            continue
        tracker.reset(layer, slots if reset == "recycled" else None)
        if optimizer is not None:
            _reset_moments(optimizer, layer, slots, moments)
        events.append({"layer": name, "slots": slots.tolist(),
                       "fused_out": event["fused_out"].tolist(), "brought_in": event["brought_in"]})
    return events


class AdaptiveSchedule:
    """When each layer switches, decided from its own pair scores (the paper's future work).

    Rule: every `every` steps, a layer switches if (a) `min_interval` steps or more have passed
    since its last switch (or the start), (b) it has r' unused directions left, and (c) the
    lowest score among its eligible slots, the first one recompose() would recycle, is below
    `ratio` times the mean score of its r slots: one pair has fallen well behind the others.
    No switch after round(stop * total_steps).  min_interval defaults to half the fixed
    schedule's interval, so no layer switches more than twice as often as Eq. (14) would.
    Budget: a switch brings in r' directions and a layer stops at r_target, as with the fixed
    schedule, so no layer visits more directions than N_switch switches bring; fewer if it rarely fires.
    DDP: a decision reads only the tracker's EMAs (built from all-reduced gradients and weights
    that every rank holds identically), the layer's buffers and the step, with no randomness,
    so every rank decides the same without communicating.
    Resume: state_dict() holds each layer's last switch step; save it with the tracker.
    Use:   names = schedule.due(step, tracker); recompose(model, tracker, gamma, ..., layers=names)
    """

    def __init__(self, total_steps: int, r: int, r_target: int, gamma: float = 0.5, ratio: float = 0.1,
                 every: int = 10, min_interval: int = None, stop: float = 1.0, score: str = "paper",
                 grace: int = 0):
        if not 0.0 < ratio <= 1.0 or every < 1:
            raise ValueError(f"ratio={ratio} / every={every}: use ratio in (0, 1] (e.g. 0.5) and every >= 1")
        _check_options(gamma, "recycled", "keep", score)
        fixed = switch_steps(total_steps, r, r_target, gamma, stop)
        self.min_interval = min_interval or max(1, (fixed[0] if fixed else total_steps) // 2)
        self.horizon = round(stop * total_steps)
        self.gamma, self.ratio, self.every, self.score, self.grace = gamma, ratio, every, score, grace
        self.last = {}                          # layer name -> step of its last switch; absent: 0

    @torch.no_grad()
    def due(self, step: int, tracker: ImportanceTracker) -> list:
        """Names of the layers that switch after optimizer step `step`; records them as switched."""
        if step % self.every or step > self.horizon:
            return []
        names, fire = [], []
        for name, layer in zip(tracker.names, tracker.layers):
            k = n_recycle(layer.r, self.gamma)
            if step - self.last.get(name, 0) < self.min_interval or layer.next_index + k > layer.r_target:
                continue
            scores = tracker.pair_scores(layer, relative=self.score == "relative")
            lowest = scores.masked_fill(~eligible(layer, k, self.grace), math.inf).min()
            names.append(name)
            fire.append(lowest < self.ratio * scores.mean())
        due = [name for name, f in zip(names, torch.stack(fire).tolist() if fire else []) if f]  # one host sync
        self.last.update({name: step for name in due})
        return due

    def state_dict(self) -> dict:
        return {"last": dict(self.last)}

    def load_state_dict(self, state: dict):
        self.last = dict(state["last"])
