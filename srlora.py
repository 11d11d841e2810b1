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
alpha/r scaling, the SVD algorithm, optimizer state of recycled slots, which importance
state is reset, and the precision of W in half-precision models.  Alternatives that change
the switch dynamics (score, grace, switch_stop, switch_schedule) are fields of SRLoRAConfig;
the defaults are the paper's.  Models sharded with PyTorch FSDP2 work unchanged: each rank
updates and recycles its own rows (see "How to touch a possibly sharded tensor"; srlora_fsdp.py
shards the basis too).  Depends on torch alone.
"""
import dataclasses
import math
import sys
import warnings
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
    residual_dtype: str = None  # dtype of W and the basis: None keeps the model's (bf16 stays bf16); "float32" for fp32
    compensate: bool = False    # half-precision W: carry each switch's rounding error to the next (one W-sized buffer)
    # Alternatives that change the switch dynamics (README: silent choices); each default is the paper's.
    score: str = "paper"    # "paper": Eq. (7); "relative": Eq. (7) / (|B_k| |A_k|)^2, so a slot's score does not grow with its size
    grace: int = 0          # a slot refilled at one switch cannot be recycled at its layer's next `grace` switches
    switch_stop: float = 1.0        # the fixed schedule puts every switch within the first switch_stop of the steps
    switch_schedule: str = "fixed"  # "fixed": Eq. (13)-(14); "adaptive": each layer when AdaptiveSchedule says so
    adapt_ratio: float = 0.1        # adaptive: a layer switches when its lowest score < adapt_ratio * its mean score
                                    # (0.5 switched 29-31 of MiniLM's 36 layers at every check they were allowed)
    adapt_every: int = 10           # adaptive: steps between checks (each check reads one number per layer)


def _as_dtype(dtype):
    """None, a torch.dtype, or its name ("float32", "bfloat16") -> None or a floating torch.dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(getattr(torch, str(dtype), None), torch.dtype) and getattr(torch, dtype).is_floating_point:
        return getattr(torch, dtype)
    raise ValueError(f"residual_dtype={dtype!r} is not a floating dtype; use None (the model's dtype), "
                     f"'float32' or 'bfloat16'")


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
    iterations gave |cos| down to 0.025 there.  Leading batch dimensions are allowed (the
    benchmarks use them); apply_srlora calls it once per weight (see pissa_factors).
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
    """True for transformers' Conv1D (GPT-2, GPT, ...): a linear map y = x W + b that stores W as (in, out).

    Recognised by its class name, `nf` and weight shape, not by isinstance, so that this file needs
    torch alone (PEFT calls this layout fan_in_fan_out).
    """
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and weight.shape[1] == getattr(module, "nf", None))


def _out_in_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear or Conv1D in nn.Linear's (out, in) layout (a view for Conv1D)."""
    return module.weight.T if is_conv1d(module) else module.weight


# How to touch a possibly sharded tensor.  Under PyTorch FSDP2 (fully_shard) every parameter, and
# every tensor created from one (the tracker's EMAs, the optimizer's moments), is a DTensor cut into
# row blocks, one per rank (Shard(0) on a 1-D mesh, as torch.chunk cuts).  The equations run on each
# rank's own rows; these functions are the only code that knows.  Whole tensors pass through.

def _sharded(t) -> bool:
    """t is a DTensor.  None exists before torch.distributed.tensor is imported, so a run without
    FSDP never pays for importing it (0.5-1 s measured)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _row_block(t: torch.Tensor) -> int:
    """Index of the first row of t that this rank holds (t a DTensor)."""
    from torch.distributed.tensor import Shard
    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise ValueError(f"a tensor is sharded as {t.placements}; SRLoRA supports FSDP2's default, Shard(0) "
                         f"on a 1-D mesh: call fully_shard(module) without a 2-D (HSDP) mesh or shard_placement_fn")
    size = -(-t.shape[0] // t.device_mesh.size())                   # torch.chunk's block size
    return min(t.device_mesh.get_local_rank() * size, t.shape[0])


def _local(t: torch.Tensor, like: torch.Tensor = None) -> torch.Tensor:
    """This rank's rows of t, as a plain tensor that writes through to t.  A whole t beside a sharded
    `like` (the basis U beside W, when shard_basis was not called) is cut to like's rows."""
    if _sharded(t):
        return t.to_local()
    if _sharded(like):
        start = _row_block(like)
        return t[start:start + like.to_local().shape[0]]
    return t


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index], whole on every rank: a sharded t's rows are summed over ranks, each from its holder."""
    if not _sharded(t):
        return t[index]
    local, start = t.to_local(), _row_block(t)
    mine = (index >= start) & (index < start + local.shape[0])
    out = local.new_zeros(index.numel(), *local.shape[1:])
    out[mine] = local[index[mine] - start]
    torch.distributed.all_reduce(out, group=t.device_mesh.get_group())  # one holder per row: the sum is exact
    return out


def _whole(t: torch.Tensor) -> torch.Tensor:
    """t as a whole tensor on every rank (a DTensor reduction over the ranks, such as one score per slot)."""
    return t.full_tensor() if _sharded(t) else t


def _set_rows(t: torch.Tensor, index, value) -> None:
    """t[index] = value (a tensor of len(index) rows, or a number); each rank writes the rows it holds."""
    if not _sharded(t):
        t[index] = value
        return
    local, start = t.to_local(), _row_block(t)
    index = torch.arange(t.shape[0], device=local.device)[index]   # a slice -> its row numbers
    mine = (index >= start) & (index < start + local.shape[0])
    local[index[mine] - start] = value[mine] if torch.is_tensor(value) else value


class SRLoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable rank-r pair: y = x W^T + b + scaling * x A^T B^T.

    W (`weight`) is the frozen residual, A (`lora_A`, (r, n)) and B (`lora_B`, (m, r)) train,
    scaling = alpha / r.  With init="pissa", W0 = U S V^T and (Eq. 2)
        B = U[:, :r] sqrt(S[:r] / scaling),  A = sqrt(S[:r] / scaling) V[:, :r]^T,  W = W0 - scaling B A,
    so the layer computes exactly what the wrapped one did.  S is divided by scaling so that
    scaling * B A is the top-r part of W0 for any alpha (PEFT's PiSSA convention; the paper
    writes its equations for scaling = 1).  init="lora" is LoRA: Kaiming-uniform A, zero B, W = W0.

    Slot k holds singular direction active_indices[k]; next_index is p_r of Eq. (11), the next
    unused direction.  Only directions r .. r_target-1 are kept (buffers U, S, Vh): direction p
    sits in column p - r.  `factors` = (U, S, Vh) of the top min(r_target, m, n) directions, if
    already computed.  `base` may also be a transformers Conv1D (see is_conv1d): W is then its
    weight transposed, kept in this (out, in) layout, and merge_srlora() gives back a Conv1D.

    Precision (the paper is silent).  W, its bias and the basis U, S, Vh are stored in
    `residual_dtype`: None keeps the wrapped layer's dtype, so a bf16 model stays at bf16 cost;
    "float32" keeps an fp32 residual.  A and B are fp32 for a half-precision model (as PEFT
    keeps its adapters), since AdamW steps on bf16 weights would mostly round away.  The SVD,
    the PiSSA split and every switch's arithmetic run in fp32; W is rounded once per switch.
    With a bf16 W that rounding moves the effective weight by about one bf16 rounding of W per
    switch, a random walk over the switches; compensate=True keeps the rounding error in a
    W-shaped buffer and adds it back at the next switch, so the drift stays at one rounding
    for any number of switches, at the cost of a second W.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 8.0, r_target: int = None,
                 init: str = "pissa", svd: str = "auto", factors=None, residual_dtype=None,
                 compensate: bool = False):
        if not isinstance(base, nn.Linear) and not is_conv1d(base):
            raise ValueError(f"SRLoRALinear wraps an nn.Linear or a transformers Conv1D, got "
                             f"{type(base).__name__}; choose targets that name such modules")
        m, n = _out_in_weight(base).shape
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
        self.base_type = type(base) if is_conv1d(base) else nn.Linear  # and to this layer type
        dtype = _as_dtype(residual_dtype) or base.weight.dtype        # W, bias and basis (see the docstring)
        work = torch.promote_types(dtype, torch.float32)              # A, B and all arithmetic: fp32 or fp64
        W0 = _out_in_weight(base).detach().to(work).contiguous()
        if base.bias is not None:                                     # frozen; shares storage unless cast
            self.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)

        if init == "pissa":
            U, S, Vh = factors if factors is not None else top_singular(W0, self.r_target, svd)
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
            W = _out_in_weight(base).detach().contiguous()            # never changed in place: LoRA has no switches
            active = torch.full((r,), -1)                            # -1: not a singular direction
            U, S, Vh = W0.new_zeros(m, 0, dtype=dtype), W0.new_zeros(0, dtype=dtype), W0.new_zeros(0, n, dtype=dtype)
        self.weight = nn.Parameter(W.to(dtype), requires_grad=False)  # the one rounding of a bf16 W at init
        self.lora_A = nn.Parameter(A.contiguous())
        self.lora_B = nn.Parameter(B.contiguous())
        self.register_buffer("U", U)
        self.register_buffer("S", S)
        self.register_buffer("Vh", Vh)
        self.register_buffer("active_indices", active.to(W0.device))
        # Compensated (Kahan) summation: what rounding W lost at the last switch, added back at the next.
        compensate = compensate and init == "pissa" and dtype.itemsize < 4
        self.register_buffer("weight_error", torch.zeros_like(self.weight) if compensate else None)
        self.next_index = r                                          # p_r: directions 0..r-1 are in use

    def forward(self, x):
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return self.forward(x.to(self.weight.dtype)).to(x.dtype)  # compute in W's dtype, answer in x's
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)       # fp32 A, B meet a bf16 x as autocast would
        # scaling multiplies the rank-r intermediate (tokens x r), not the (tokens x out) output: cheaper
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, A) * self.scaling, B)

    def effective_weight(self) -> torch.Tensor:
        """W + scaling * B A: the weight forward() applies, and the one merge_srlora() writes."""
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)

    def pair_norms(self) -> torch.Tensor:
        """|B_k| |A_k| for the r pairs, shape (r,): sigma_k / scaling when pair k was filled."""
        return _whole(self.lora_B.norm(dim=0) * self.lora_A.norm(dim=1))

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
        B, U = _local(self.lora_B), _local(self.U, like=self.lora_B)  # this rank's rows: all, in one process
        B_out, A_out = B[:, slots].clone(), _rows(self.lora_A, slots)              # Eq. (9): the pairs I_low
        cols = torch.arange(p - self.r, p - self.r + k, device=self.S.device)      # directions p .. p+k-1
        sqrt_S = (self.S[cols].to(A_out.dtype) / s).sqrt()
        B[:, slots] = U[:, cols] * sqrt_S                                           # Eq. (11)
        A_in = sqrt_S[:, None] * _rows(self.Vh, cols)                               # Eq. (11)
        _set_rows(self.lora_A, slots, A_in)
        self._add_low_rank(B_out, A_out, B_in=B[:, slots], A_in=A_in)              # Eq. (10), (12)
        self.active_indices[slots] = torch.arange(p, p + k, device=slots.device)
        self.next_index = p + k
        return {"slots": slots, "fused_out": fused_out, "brought_in": list(range(p, p + k))}

    @torch.no_grad()
    def _add_low_rank(self, B_out, A_out, B_in, A_in):
        """W += scaling (B_out A_out - B_in A_in): Eq. (10) and Eq. (12) in one write.

        The sum is taken in the adapters' dtype (fp32) and W is rounded to its own dtype once per
        switch.  With weight_error (compensate=True) the sum also adds back what the last rounding
        lost and keeps what this one loses: Kahan's compensated summation, so the rounding errors of
        successive switches cancel instead of adding up."""
        W = _local(self.weight)                           # B_out, B_in: the same rows of B as W's
        error = None if self.weight_error is None else _local(self.weight_error, like=self.weight)
        exact = W.to(A_out.dtype)                         # a fresh fp32 copy of a bf16 W; W itself if fp32
        exact.addmm_(torch.cat([B_out, B_in], 1), torch.cat([A_out, -A_in]), alpha=self.scaling)
        if error is not None:
            exact += error
        W.copy_(exact)
        if error is not None:
            error.copy_(exact - W)

    # next_index stays a Python int (no device sync to read it).  It travels in the state dict as
    # one small tensor, (next_index, r, alpha), because save_pretrained and safetensors store tensors only.
    def get_extra_state(self):
        return torch.tensor([self.next_index, self.r, self.alpha], dtype=torch.float64)

    def set_extra_state(self, state):
        self.next_index = int(state["next_index"] if isinstance(state, dict) else state[0])  # dict: older saves

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Refuse a state dict saved with another r or alpha before any tensor is copied: a different
        # scaling = alpha / r would load without a shape error and silently change the outputs.
        saved = state_dict.get(prefix + "_extra_state")
        if torch.is_tensor(saved) and (int(saved[1]), float(saved[2])) != (self.r, float(self.alpha)):
            raise ValueError(f"{prefix[:-1] or 'layer'}: the state dict was saved with r={int(saved[1])}, "
                             f"alpha={float(saved[2])} but this model has r={self.r}, alpha={self.alpha}; "
                             f"wrap it with apply_srlora(..., r={int(saved[1])}, alpha={float(saved[2])}) before loading")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, r_target={self.r_target}, init={self.init}, base={self.base_type.__name__}")


def srlora_layers(model: nn.Module):
    """(name, layer) for every SRLoRALinear in model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SRLoRALinear)]


def _matches(name: str, targets) -> bool:
    # A target matches a module whose dotted name equals it or ends with "." + target.
    return any(name == t or name.endswith("." + t) for t in targets)


def _wrappable(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and not isinstance(module, SRLoRALinear)


def _weight_names(model: nn.Module) -> dict:
    """{id(parameter): every name it has in model}: a tied weight (GPT-2's lm_head and wte) has two."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def apply_srlora(model: nn.Module, config: SRLoRAConfig = None, decompose=None, **overrides) -> nn.Module:
    """Replace every nn.Linear (or transformers Conv1D) whose name matches `targets` by an
    SRLoRALinear; freeze the rest.

    `targets` are name suffixes on dot boundaries: "value" matches "encoder.layer.0.attention.self.value",
    "output.dense" matches both "...attention.output.dense" and "...layer.0.output.dense".  Modules
    that match but cannot be wrapped (a Conv2d named "proj", a whole block) are left alone with a
    warning that names them.  A weight tied to another module's (GPT-2's lm_head, tied to the token
    embedding) is refused: SRLoRA replaces it by a residual, which would untie the two.
    Afterwards only lora_A and lora_B require grad; unfreeze a classifier head yourself.
    `decompose(model, names, cfg) -> {name: (U, S, Vh)}` computes the SVDs: None is pissa_factors,
    all in this process; srlora_fsdp.spread_factors spreads them over the ranks.  Returns model,
    modified in place.
    """
    cfg = dataclasses.replace(config or SRLoRAConfig(), **overrides)
    decompose = decompose or pissa_factors
    check_gamma(cfg.gamma)
    targets = [cfg.targets] if isinstance(cfg.targets, str) else list(cfg.targets)
    matched = [(name, m) for name, m in model.named_modules() if _matches(name, targets)]
    found = [(name, m) for name, m in matched if _wrappable(m)]
    skipped = [f"{name} ({type(m).__name__})" for name, m in matched if not _wrappable(m)]
    listed = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    if not found:
        raise ValueError(f"targets={targets} match no nn.Linear or Conv1D in {type(model).__name__}"
                         f"{' (only ' + listed + ')' if skipped else ''}; pass name suffixes of its "
                         f"linear layers, e.g. {_linear_names(model)[:4]}")
    if skipped:
        warnings.warn(f"targets={targets} also match modules that are not nn.Linear or Conv1D, "
                      f"left unchanged: {listed}", stacklevel=2)
    weight_names = _weight_names(model)
    for name, m in found:
        tied = [other for other in weight_names.get(id(m.weight), ()) if other != f"{name}.weight"]
        if tied:
            raise ValueError(f"{name}.weight is tied to {tied[0]}; wrapping it would untie them, so "
                             f"choose targets that do not match {name!r}")
    model.requires_grad_(False)
    names = [name for name, _ in found]
    factors = decompose(model, names, cfg) if cfg.init == "pissa" else {}
    for name, m in found:
        layer = SRLoRALinear(m, r=cfg.r, alpha=cfg.alpha, r_target=cfg.r_target, init=cfg.init,
                             svd=cfg.svd, factors=factors.pop(name, None),
                             residual_dtype=cfg.residual_dtype, compensate=cfg.compensate)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model


def pissa_factors(model: nn.Module, names, cfg: SRLoRAConfig) -> dict:
    """{name: (U, S, Vh)}: the top min(r_target, m, n) SVD triplets of each weight of `names`
    (apply_srlora's default `decompose`).  One top_singular call per weight, not one batched call
    per shape: a batched LAPACK call gives a matrix results that depend on where it sits in the
    batch (1e-6 apart, measured), so a weight's factors would depend on which others shared its
    call, and srlora_fsdp.spread_factors, which gives each rank a different subset, could not
    match one process bit for bit.  On a CPU the batched call is a loop anyway, and no stacked
    copy of the weights is made.  A weight with min(m, n) < r is left out, so that SRLoRALinear
    raises its clear error about r."""
    factors = {}
    for name in names:
        W = _out_in_weight(model.get_submodule(name)).detach()
        k = min(cfg.r_target, *W.shape)
        if k >= cfg.r:
            factors[name] = top_singular(W, k, cfg.svd)
    return factors


def _linear_names(model):
    """Last name parts of the modules apply_srlora can wrap, tied weights (GPT-2's lm_head) left out."""
    weight_names = _weight_names(model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if _wrappable(m) and len(weight_names.get(id(m.weight), ())) <= 1})


@torch.no_grad()
def merge_srlora(model: nn.Module) -> nn.Module:
    """Replace every SRLoRALinear by the frozen layer type it wrapped, nn.Linear or Conv1D, holding
    effective_weight() in that type's own layout.  Not on a model sharded with fully_shard (see the error)."""
    for name, layer in srlora_layers(model):
        if _sharded(layer.weight):
            raise ValueError(f"merge_srlora: {name}.weight is sharded with fully_shard; merge an unsharded copy: "
                             f"load get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) "
                             f"into the model as it was before fully_shard and merge that")
        W = layer.effective_weight().to(layer.base_dtype)
        if layer.base_type is nn.Linear:
            merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        else:                                                        # transformers Conv1D(nf, nx): W as (in, out)
            with torch.device("meta"):                               # a shell: no weight allocated, no init run
                merged = layer.base_type(layer.out_features, layer.in_features)
            W = W.T
        merged.weight = nn.Parameter(W.contiguous(), requires_grad=False)
        if layer.bias is not None:
            merged.bias = nn.Parameter(layer.bias.detach().to(layer.base_dtype, copy=True), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, merged)
    return model


class ImportanceTracker:
    """Smoothed sensitivity of every entry of every lora_A and lora_B (Eq. 3-7).

    Holds four EMA tensors per layer, shaped like A and B and starting at zero.  Call update()
    once per optimizer step, after backward() and before optimizer.step(), so that w and its
    gradient belong to the same step.  With gradient accumulation call it once, after the last
    micro-batch; under DDP the gradients are already all-reduced, so every rank agrees.  Under
    FSDP2 (fully_shard) the EMAs are DTensors cut like A and B: each rank updates its own rows,
    and pair_scores() sums over the ranks, so every rank ranks the same pairs.
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

    def _check_current(self):
        # fully_shard (or anything that re-registers lora_A / lora_B) replaces the Parameters;
        # EMAs of the old ones would silently never update again.
        L = len(self.layers)
        for i, (name, layer) in enumerate(zip(self.names, self.layers)):
            if self.params[i] is not layer.lora_A or self.params[L + i] is not layer.lora_B:
                raise RuntimeError(f"ImportanceTracker: {name}.lora_A / lora_B are not the tensors the tracker "
                                   f"was created with (fully_shard replaces them); create the tracker after "
                                   f"fully_shard(model)")

    @torch.no_grad()
    def update(self):
        """One EMA step of Eq. (3)-(5) for every adapter whose .grad is set."""
        self._check_current()
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        ps = [_local(self.params[i]) for i in live]                         # under FSDP2: each rank's rows
        grads = [_local(self.params[i].grad) for i in live]
        ibar = [_local(self.ibar[i]) for i in live]
        ubar = [_local(self.ubar[i]) for i in live]
        sens = torch._foreach_mul(ps, grads)
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
        scores = _whole(s_B.mean(dim=0) + s_A.mean(dim=1))                   # Eq. (7), the same on every rank
        if relative:
            size = layer.pair_norms()                                        # |B_k| |A_k|
            scores = scores / size.square().clamp_min(torch.finfo(size.dtype).tiny)
        return scores

    @torch.no_grad()
    def reset(self, layer: SRLoRALinear, slots: torch.Tensor = None):
        """Zero the importance state of `slots` (rows of A, columns of B), or of all slots."""
        i, L = self.index[id(layer)], len(self.layers)
        slots = slots if slots is not None else slice(None)
        for t in (self.ibar[i], self.ubar[i]):
            _set_rows(t, slots, 0)
        for t in (self.ibar[L + i], self.ubar[L + i]):
            _local(t)[:, slots] = 0

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

    def state_of(param):
        return [value for key, value in optimizer.state.get(param, {}).items()
                if key in keys and torch.is_tensor(value) and value.shape == param.shape]
    for value in state_of(layer.lora_A):
        _set_rows(value, slots, 0)                                   # rows of A
    for value in state_of(layer.lora_B):
        _local(value)[:, slots] = 0                                  # columns of B


def check_grace(grace: int, k: int, r: int) -> None:
    if grace < 0 or (grace + 1) * k > r:
        raise ValueError(f"grace={grace} with r'={k} of r={r} leaves fewer than r' slots to recycle; "
                         f"use grace in 0 .. {r // k - 1} or a smaller gamma")


def eligible(layer: SRLoRALinear, k: int, grace: int = 0) -> torch.Tensor:
    """(r,) bool: the slots a switch may recycle.  With grace g, a slot refilled at one of the
    layer's last g switches is not.  No extra state: direction p >= r came in at the layer's
    switch (p - r) // r', so a slot's age is read off active_indices, which checkpoints hold."""
    check_grace(grace, k, layer.r)
    p = layer.active_indices
    return (p < layer.r) | (layer.next_index - p > grace * k)


def check_options(gamma, reset, moments, score):
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
    up to one rounding of W per switch; the singular indices ever brought in are 0 .. next_index-1, each once.

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
    FSDP2:   on a model sharded with fully_shard, each rank rewrites its own rows of W, B, the EMAs
             and the moments; the r' rows of A and Vh it needs come from the ranks that hold them.
             No rank ever holds a whole W.
    Returns one record per layer that switched: layer name, slots, indices fused out and brought in.
    """
    check_options(gamma, reset, moments, score)
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
        check_options(gamma, "recycled", "keep", score)
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
