"""Compensated switches for SRLoRA layers whose residual W is half precision (bf16, fp16).

srlora.py sums each switch's Eq. (10) and (12) in fp32 and rounds W to its own dtype once.  With a
bf16 W, that moves the effective weight by about one bf16 rounding of W per switch, a random walk
over the switches.  compensate(model) keeps the rounding error in a W-shaped buffer and adds it
back at the next switch (Kahan's compensated summation), so the drift stays at one rounding for
any number of switches, at the cost of a second W (measured: docs/BENCHMARKS.md, bench/bf16.py).

    model = apply_srlora(model, residual_dtype=None)   # a bf16 model keeps a bf16 W
    compensate(model)                                   # before fully_shard, optimizer or loading a checkpoint
"""
import torch
import torch.nn as nn

from srlora import SRLoRALinear, extend_layer, srlora_layers


class CompensatedSRLoRALinear(SRLoRALinear):
    """An SRLoRALinear with a `weight_error` buffer: what rounding W lost at its last switch."""

    def _error_for(self, W: torch.Tensor) -> torch.Tensor:
        return self.weight_error                      # the FSDP add-on returns this rank's rows

    @torch.no_grad()
    def _add_low_rank(self, W, B, A):
        """W += scaling B A + the last rounding error, in fp32; keep what this rounding loses."""
        error = self._error_for(W)
        exact = W.to(A.dtype)
        exact.addmm_(B, A, alpha=self.scaling)
        exact += error
        W.copy_(exact)
        error.copy_(exact - W)


def compensate(model: nn.Module) -> nn.Module:
    """Give every half-precision SRLoRA layer (init="pissa") a zero weight_error buffer and the
    compensated switch.  Layers with an fp32 or fp64 W, whose rounding is already fine, and LoRA
    layers, which never switch, are left as they are.  Returns model, modified in place."""
    for _, layer in srlora_layers(model):
        if hasattr(layer, "base_layer"):              # W0 kept quantized (srlora_hf): no switch rounds W
            continue
        if layer.init == "pissa" and layer.weight.element_size() < 4 and not isinstance(layer, CompensatedSRLoRALinear):
            layer.register_buffer("weight_error", torch.zeros_like(layer.weight))
            extend_layer(layer, CompensatedSRLoRALinear, "Compensated")
    return model
