"""SRLoRA for Hugging Face models: wrapping, adapter saves that load, and the Trainer callback.

    model = apply_srlora(AutoModelForCausalLM.from_pretrained(base), r=8, r_target=64)  # targets_for(model)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SRLoRACallback()])
    trainer.train()                                # importance every optimizer step, switches from max_steps
    trainer.train(resume_from_checkpoint=True)     # continues exactly: same switches, same weights
    model.save_pretrained(folder)                  # the adapter alone (srlora_export.save_adapter)
    model = from_pretrained(base, folder)          # the trained model again, bit for bit

apply_srlora here is srlora.apply_srlora with what a transformers model needs around it: the
paper's targets for its model_type (targets_for), a one-line refusal of a PeftModel and of a
target that matches nothing, bitsandbytes bases kept quantized (QuantizedSRLoRALinear), and
save_pretrained writing an SRLoRA adapter (srlora_export.record_switches / save_adapter): the folder
holds what training changed, and transformers' and PEFT's own from_pretrained refuse it, naming
from_pretrained here, rather than load the model without the adapter.  The callback does what a
hand-written SRLoRA training loop does: it builds the ImportanceTracker, calls tracker.update() once
per optimizer step, runs recompose() after the optimizer step of every switch step of Eq. (13)-(14),
and keeps the tracker's EMAs in every Trainer checkpoint.  transformers, peft and bitsandbytes are imported lazily, so importing this module
costs nothing without them.  Depends on srlora.py and srlora_export.py.
"""
import dataclasses
import os
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

import srlora
from srlora import (FIRST_MOMENTS, PAPER_TARGETS, SECOND_MOMENTS, ImportanceTracker, SRLoRAConfig, recompose,
                    srlora_layers, switch_steps)
from srlora_export import (ADAPTER_CONFIG, TRACKER_PREFIX, RecordedSRLoRALinear, _record, load_adapter,
                           read_adapter_config, record_switches)
from srlora_export import save_adapter as srlora_export_save


# The paper's maps (Q, K, V, attention output, FFN) per transformers model_type.  Phi-3 fuses Q, K, V
# into qkv_proj and the gate and up maps into gate_up_proj: the Llama names would match 4 of its 9 maps.
MODEL_TYPE_TARGETS = {
    **{t: PAPER_TARGETS["llama"] for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                           "olmo", "olmo2", "granite", "smollm3")},
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": PAPER_TARGETS["gpt2"], "bert": PAPER_TARGETS["bert"], "roberta": PAPER_TARGETS["bert"],
    "deberta-v2": PAPER_TARGETS["deberta-v2"], "vit": PAPER_TARGETS["vit"],
}


def targets_for(model) -> tuple:
    """The paper's targets for a transformers model (or a model_type string), fused projections mapped."""
    model_type = model if isinstance(model, str) else getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TARGETS:
        raise ValueError(f"targets_for: no targets known for model_type={model_type!r} (known: "
                         f"{sorted(MODEL_TYPE_TARGETS)}); pass targets=(...) naming its linear layers")
    return MODEL_TYPE_TARGETS[model_type]


def apply_srlora(model: nn.Module, config: SRLoRAConfig = None, quantized: str = "keep", record: bool = True,
                 **overrides) -> nn.Module:
    """srlora.apply_srlora for a transformers model, plus what it needs around it:

    - targets: targets_for(model) unless config or a targets= keyword names them; each target must
      match some module of the model (a name that matches nothing is refused, not skipped);
    - a PeftModel is refused: SRLoRA is the adapter, so wrap the model PEFT was given instead;
    - bitsandbytes Linear4bit / Linear8bitLt targets: the SVD is of their dequantized weight (never
      of packed bytes or int8 codes).  quantized="keep" (QLoRA's memory): the layer keeps W0
      quantized and untouched and holds the change as factors (QuantizedSRLoRALinear);
      "dequantize": the layer becomes a dense residual W in residual_dtype (dequantize_targets);
    - record_switches(model), and save_pretrained writes the adapter (srlora_export.save_adapter).
      record=False saves the memory of the record ((r_target - r)(m + n) fp32 numbers per layer) and
      makes every save hold the adapted layers' W too, the size of those layers (save_adapter(weights=True)).
    Returns model, modified in place.
    """
    if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
        raise ValueError(f"apply_srlora: model is a {type(model).__name__}, whose adapters PEFT already trains; "
                         f"call it on the model you gave get_peft_model (SRLoRA is the adapter), without peft_config")
    if config is None and "targets" not in overrides:
        overrides["targets"] = targets_for(model)
    cfg = dataclasses.replace(config or SRLoRAConfig(), **overrides)
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in cfg.targets if not any(srlora.matches(n, (t,)) for n in names)]
    if unmatched:
        hint = f"targets_for(model) gives {list(targets_for(model))}" if getattr(getattr(model, "config", None),
                                                                            "model_type", None) in MODEL_TYPE_TARGETS else \
            "pass name suffixes of its linear layers"
        raise ValueError(f"apply_srlora: targets {unmatched} match no module of {type(model).__name__}; {hint}")
    if quantized not in QUANTIZED_ROUTES:
        raise ValueError(f"apply_srlora: quantized={quantized!r} is unknown; use one of {QUANTIZED_ROUTES}")
    if not record and quantized == "keep" and _bnb_targets(model, cfg):
        raise ValueError("apply_srlora: record=False with quantized='keep': a layer that keeps W0 quantized reads "
                         "W - W0 from the record; pass quantized='dequantize' or record=True")
    kinds = (keep_quantized_targets if quantized == "keep" else dequantize_targets)(model, cfg)
    if any(srlora._wrappable(m) and srlora.matches(name, cfg.targets) for name, m in model.named_modules()):
        srlora.apply_srlora(model, cfg)
    else:                                                   # every target was quantized and is wrapped already
        srlora._freeze_but_adapters(model)
    if kinds:
        model.srlora_quantized = quantized
    model.srlora_record = record
    return _saves_adapters(model, kinds)


def _saves_adapters(model: nn.Module, quantized=None) -> nn.Module:
    """record_switches(model); model.save_pretrained(folder) = save_adapter(model, folder), and
    model.load_state_dict keeps a checkpoint's importance EMAs aside for SRLoRACallback."""
    if getattr(model, "srlora_record", True):
        record_switches(model)
    if hasattr(model, "save_pretrained") and not hasattr(model.save_pretrained, "srlora"):
        if quantized is not None:
            model.srlora_dequantized = quantized
        model.save_pretrained = types.MethodType(_save_pretrained, model)
        model.load_state_dict = types.MethodType(_load_state_dict, model)
        model.print_trainable_parameters = types.MethodType(print_trainable_parameters, model)   # PEFT's habits
        model.merge_and_unload = types.MethodType(merge_and_unload, model)
    # The Trainer refuses a quantized model "without trainable adapters" unless this is set: one whose
    # bitsandbytes targets were dequantized, and one loaded from a GGUF file (dequantized on load).
    if quantized or getattr(model, "hf_quantizer", None) is not None:
        model._hf_peft_config_loaded = True
    return model


def _save_pretrained(self, save_directory, state_dict=None, is_main_process=True, push_to_hub=False, **ignored):
    # What the Trainer and a user call: an adapter folder, whatever shard size or serialization is asked.
    if push_to_hub:
        raise ValueError("save_pretrained(push_to_hub=True): an SRLoRA adapter is pushed as a folder; "
                         "save it, then upload the folder with huggingface_hub.upload_folder")
    if is_main_process:
        _check_intact(self, "save_pretrained")
        tracker = getattr(self, "srlora_tracker", None)       # set by SRLoRACallback while it trains
        checkpoint = os.path.basename(os.path.normpath(save_directory)).startswith("checkpoint-")
        save_adapter(self, save_directory, extra=tracker_tensors(tracker) if tracker and checkpoint else None,
                     weights=not getattr(self, "srlora_record", True))


_save_pretrained.srlora = True


def _load_state_dict(self, state_dict, strict=True, assign=False):
    # What the Trainer calls on a resume, with the weights of the checkpoint it resumes from, whatever
    # path it was given: the importance EMAs in them wait for SRLoRACallback.on_train_begin.
    ema = {key: value for key, value in state_dict.items() if key.startswith(TRACKER_PREFIX)}
    if ema:
        self.srlora_resumed_tracker = ema
        state_dict = {key: value for key, value in state_dict.items() if key not in ema}
    return type(self).load_state_dict(self, state_dict, strict=strict, assign=assign)


def tracker_tensors(tracker: ImportanceTracker) -> dict:
    """The tracker's state as flat tensors for a weights file: TRACKER_PREFIX + "<layer>.ibar_A", ..."""
    flat = {f"{TRACKER_PREFIX}betas": torch.tensor([tracker.beta1, tracker.beta2], dtype=torch.float64)}
    for name, emas in tracker.state_dict().items():
        if isinstance(emas, dict):
            flat.update({f"{TRACKER_PREFIX}{name}.{key}": t.detach().contiguous() for key, t in emas.items()})
    return flat


def tracker_state(flat: dict) -> dict:
    """tracker_tensors' inverse: the dict ImportanceTracker.load_state_dict takes."""
    beta1, beta2 = flat[f"{TRACKER_PREFIX}betas"].tolist()
    state = {"beta1": beta1, "beta2": beta2}
    for key, t in flat.items():
        name, _, leaf = key[len(TRACKER_PREFIX):].rpartition(".")
        if name:
            state.setdefault(name, {})[leaf] = t
    return state


def save_adapter(model: nn.Module, folder, extra: dict = None, weights: bool = False):
    """srlora_export.save_adapter, with the base model's name and the quantized layer types and route."""
    kinds = getattr(model, "srlora_dequantized", {})
    return srlora_export_save(model, folder, extra, weights,
                              base_model_name_or_path=getattr(model, "name_or_path", None) or None,
                              dequantized=kinds, **({"quantized": model.srlora_quantized} if kinds else {}))


def from_pretrained(base, adapter_dir, model_class=None, **kwargs) -> nn.Module:
    """The model trained in adapter_dir: `base` (a name or folder, loaded with
    model_class.from_pretrained(base, **kwargs), AutoModelForCausalLM by default; or the pretrained
    model itself) wrapped with the adapter's SRLoRAConfig, its switches replayed (load_adapter)."""
    meta = read_adapter_config(adapter_dir)
    if isinstance(base, (str, os.PathLike)):
        if model_class is None:
            from transformers import AutoModelForCausalLM as model_class
        base = model_class.from_pretrained(base, **kwargs)
    kinds = {name: type(base.get_submodule(name)).__name__ for name in meta.get("dequantized", {})
             if name in dict(base.named_modules())}
    if kinds != meta.get("dequantized", {}):
        raise ValueError(f"from_pretrained: the adapter was trained on a base with {meta.get('dequantized') or 'no'} "
                         f"bitsandbytes layers, this one has {kinds or 'none'}; load the base as it was trained "
                         f"(the same quantization_config)")
    # adapters written before quantized="keep" existed were trained on dequantized layers
    model = apply_srlora(base, SRLoRAConfig(**meta["config"]), quantized=meta.get("quantized", "dequantize"),
                         record=not meta.get("weights", False))
    return load_adapter(model, adapter_dir)


# --- quantized bases ------------------------------------------------------------------------
#
# The paper is silent on quantized bases.  W0 may not be rewritten at a switch: re-quantizing it
# every time would pile up quantization error.  Two routes, both decomposing the dequantized W0:
#   "keep" (the default): W0 stays quantized and untouched, and W - W0 is kept as factors.  After
#       its switches a layer's W - W0 is -scaling * (the directions brought in, Eq. 2 and 12) plus
#       scaling * (the pairs fused out, Eq. 10); the first are the SVD basis the layer keeps anyway
#       (and its top-r part), the second are record_switches' fused_A / fused_B.  So the change
#       costs r (m + n) fp32 numbers beyond an adapter save's, and each forward a low-rank product
#       of rank r + 2 (next_index - r) at most, in fp32 (the large principal parts cancel there).
#   "dequantize": a dense residual W in residual_dtype, as for an unquantized model; QLoRA's
#       memory saving is lost on the adapted maps, and forward is one dense matmul.

QUANTIZED_ROUTES = ("keep", "dequantize")
BNB_LINEARS = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")


class QuantizedSRLoRALinear(RecordedSRLoRALinear):
    """An SRLoRA layer on a bitsandbytes layer (`base_layer`, frozen, W0 quantized and never written).

    forward(x) = base_layer(x) + scaling x (A^T B^T + L^T R^T), with W - W0 = scaling R L:
    R L = -init_B init_A - (directions r .. applied-1 as Eq. 11 writes them) + fused_B fused_A.
    A switch writes only A, B, the indices and the record (recycle() adds nothing to W0).
    """

    weight = property(lambda self: self.base_layer.weight)   # the quantized W0; recycle() passes it along

    @torch.no_grad()
    def _add_low_rank(self, W, B, A):
        pass                                                  # the change is read from the record in forward

    def _change(self):
        """(L (K, n), R (m, K)) with W - W0 = scaling R L for the switches W holds (`applied`)."""
        j, s = self.applied - self.r, self.scaling
        sqrt_S = (self.S[:j].to(self.lora_A.dtype) / s).sqrt()              # as recycle() computes Eq. (11)
        B_in, A_in = self.U[:, :j] * sqrt_S, sqrt_S[:, None] * self.Vh[:j]
        return (torch.cat([self.init_A, A_in, self.fused_A[:j]]),
                torch.cat([-self.init_B, -B_in, self.fused_B[:, :j]], 1))

    def forward(self, x):
        L, R = self._change()
        h = x.to(self.lora_A.dtype)                                          # the low-rank part in fp32
        low = F.linear(F.linear(h, torch.cat([self.lora_A, L])) * self.scaling, torch.cat([self.lora_B, R], 1))
        y = self.base_layer(x)
        return y + low.to(y.dtype)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        L, R = self._change()
        return dequantized(self.base_layer).to(L.dtype) + self.scaling * (self.lora_B @ self.lora_A + R @ L)


def keep_quantized_targets(model: nn.Module, cfg: SRLoRAConfig) -> dict:
    """Wrap every bitsandbytes layer that cfg.targets match as a QuantizedSRLoRALinear, one layer at a
    time (one dense W0 in memory at once).  Returns {name: the bitsandbytes class name}."""
    kept = {}
    for name, module in _bnb_targets(model, cfg):
        layer = srlora.SRLoRALinear(_dense_copy(module), cfg)       # the SVD of the dequantized W0
        del layer.weight                                             # W0 - scaling B A: W0 stays quantized
        layer.register_buffer("init_A", layer.lora_A.detach().clone())
        layer.register_buffer("init_B", layer.lora_B.detach().clone())
        layer.base_layer = module.requires_grad_(False)
        # bitsandbytes repacks a 4-bit weight for its CPU inference kernel at the first eval forward, which
        # rounds absmax to bf16: W0 would move under the factors decomposed from it, and the adapter
        # would no longer replay onto a fresh load.  Keep the training kernel, whose W0 is the one decomposed.
        module.support_avx512bf16_for_cpu = False
        _record(layer, QuantizedSRLoRALinear, "Quantized")             # the record, and the class reading it
        srlora._replace(model, name, layer)
        kept[name] = type(module).__name__
    return kept


def dequantize_targets(model: nn.Module, cfg: SRLoRAConfig) -> dict:
    """Replace every bitsandbytes Linear4bit / Linear8bitLt that cfg.targets match by an nn.Linear
    holding its dequantized weight (4-bit: in the dtype it was quantized from; 8-bit: fp32), for
    srlora.apply_srlora to wrap.  Returns {name: the bitsandbytes class name} of the layers replaced."""
    replaced = {}
    for name, module in _bnb_targets(model, cfg):
        srlora._replace(model, name, _dense_copy(module))
        replaced[name] = type(module).__name__
    return replaced


def _bnb_targets(model: nn.Module, cfg: SRLoRAConfig) -> list:
    """(name, module) of every bitsandbytes linear layer that cfg.targets match."""
    return [(name, m) for name, m in model.named_modules()
            if type(m).__name__ in BNB_LINEARS and srlora.matches(name, cfg.targets)]


def _dense_copy(module: nn.Module) -> nn.Linear:
    """A frozen nn.Linear holding a bitsandbytes layer's dequantized weight and a copy of its bias."""
    with torch.device("meta"):
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    plain.weight = nn.Parameter(dequantized(module), requires_grad=False)
    if module.bias is not None:
        plain.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return plain


@torch.no_grad()
def dequantized(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes Linear4bit or Linear8bitLt computes with."""
    import bitsandbytes.functional as bnbf
    weight = module.weight
    if type(module).__name__ == "Linear8bitLt":
        if weight.dtype != torch.int8:                               # has_fp16_weights: not quantized
            return weight.detach().clone()
        scb = getattr(weight, "SCB", None)
        scb = scb if scb is not None else module.state.SCB
        return bnbf.int8_vectorwise_dequant(weight.data, scb)        # codes * row absmax / 127, fp32
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        # The repacking rounds absmax to bf16: its weight is not the one a fresh load dequantizes to,
        # so an adapter trained on it would not replay onto from_pretrained(base).
        raise ValueError(f"a forward pass on CPU repacked this {type(module).__name__} (absmax now bf16); "
                         f"call srlora_hf.apply_srlora before the model's first forward")
    return bnbf.dequantize_4bit(weight.data, weight.quant_state)     # (out, in) in the dtype it was quantized from


# The body of SRLoRACallback.  The class itself, a transformers.TrainerCallback, is made at its
# first use (module __getattr__ at the end), so that this file imports without transformers.
class SRLoRACallbackLogic:
    """SRLoRA for transformers' Trainer: importance, switches and checkpointed tracker state.

    gamma, beta1, beta2, reset and moments come from the SRLoRAConfig the model was wrapped with.

    - Importance: tracker.update() runs in on_pre_optimizer_step, i.e. once per optimizer step,
      after the last micro-batch of a gradient-accumulation window, before optimizer.step().
    - Switches: srlora.switch_steps(state.max_steps, r, r_target, gamma), with r and r_target read
      from the wrapped layers; recompose() runs in on_step_end, after the optimizer step, so a
      checkpoint written at a switch step already holds the recomposed layers.
    - Optimizer: the Trainer's own, whatever `optim` names.  recompose() zeroes the first moment of
      recycled slots under the keys torch's optimizers use (exp_avg, momentum_buffer; exp_avg_sq with
      moments="reset").  Optimizers that name their state otherwise, such as bitsandbytes' 8-bit and
      paged optimizers (state1, state2, absmax1, qmap1, ...), are left untouched: recycled slots
      then keep the old slots' moments.  The callback warns once when it sees such keys.
    - Checkpoints: at Trainer(...) (on_init_end) the model gets record_switches and the adapter
      save_pretrained, so each checkpoint's model.safetensors is the adapter (A, B, indices, fused
      pairs), not the model.  A resume loads it into the freshly wrapped model, and each layer
      replays its switches onto W: the same W, bit for bit.
    - Resume: a checkpoint's model.safetensors also holds the tracker's EMAs (tracker_tensors), and
      the Trainer loads that file from whatever folder it resumes from; on_train_begin of a resumed
      run takes them back, so the EMAs, and with them the switch decisions, continue as if the run
      had not stopped.
    - Refused at the start, in one line: adapters that do not require grad (get_peft_model or
      SFTTrainer(peft_config=...) on top of SRLoRA freezes them, and nothing would train).
    `events` holds one record per layer switch: step, layer, slots, indices fused out and brought in.
    """

    def __init__(self, **retired):
        if retired:
            raise TypeError(f"SRLoRACallback() takes no arguments, got {sorted(retired)}: gamma, beta1, beta2, "
                            f"reset and moments come from the SRLoRAConfig given to apply_srlora")
        self.tracker, self.switches, self.events, self._warned = None, set(), [], False

    # At Trainer(...) time, before a resume loads a checkpoint: fused pairs recorded, adapter saves.
    def on_init_end(self, args, state, control, model=None, **kwargs):
        _check_trainable(model)
        _saves_adapters(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _check_trainable(model)
        _check_intact(model, "SRLoRACallback")
        _warn_adapter_dtype(model)
        layers = [layer for _, layer in srlora_layers(model)]
        if state.global_step == 0:
            _saves_adapters(model)                                 # a callback added after Trainer(...)
        elif getattr(model, "srlora_record", True) and not all(hasattr(layer, "fused_A") for layer in layers):
            raise ValueError("SRLoRACallback: the checkpoint was loaded before the callback recorded the model's "
                             "switches; pass it as Trainer(callbacks=[SRLoRACallback()]) or wrap with "
                             "srlora_hf.apply_srlora")
        self.tracker = ImportanceTracker(model)
        # The largest r_target any layer kept: apply_srlora clamps it to min(m, n) per layer.
        r_target = max(layer.r_target for layer in layers)
        self.switches = set(switch_steps(state.max_steps, layers[0].r, r_target, layers[0].config.gamma))
        model.srlora_tracker = self.tracker                        # a checkpoint's save_pretrained writes it
        resumed = model.__dict__.pop("srlora_resumed_tracker", None)
        if state.global_step > 0:                                  # resumed from a checkpoint
            if resumed is None:
                raise ValueError(f"resume_from_checkpoint: the checkpoint of step {state.global_step} holds no "
                                 f"importance EMAs ({TRACKER_PREFIX}*), so they would restart; resume from a "
                                 f"checkpoint that SRLoRACallback wrote")
            self.tracker.load_state_dict(tracker_state(resumed))

    # Importance sees the gradients the optimizer is about to apply: this hook fires after the
    # Trainer's max_grad_norm clipping (and after fp16 unscaling).  The paper is silent.  We keep
    # the clipped ones: global clipping multiplies every gradient of a step by one factor, so it
    # never reorders the pairs that one layer compares in Eq. (8); it only gives clipped steps less
    # weight in the EMAs, and a spike that clipping tames does not dominate the scores either.
    # For the sensitivity of the unclipped gradient, set max_grad_norm=0 in TrainingArguments.
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.tracker.update()                                                # Eq. (3)-(5)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step not in self.switches:
            return
        self._warn_unknown_moments(optimizer)
        events = recompose(model, self.tracker, optimizer)                           # Eq. (8)-(12)
        self.events += [{"step": state.global_step, **e} for e in events]
        if state.is_world_process_zero:
            brought = sorted({i for e in events for i in e["brought_in"]})
            span = f"{brought[0]}..{brought[-1]}" if brought else "none (all exhausted)"
            print(f"srlora: step {state.global_step}: switched {len(events)} layers, "
                  f"brought in directions {span}")

    def _warn_unknown_moments(self, optimizer):
        if self._warned or optimizer is None:
            return
        known = set(FIRST_MOMENTS + SECOND_MOMENTS + ("step",))
        keys = {k for p in self.tracker.params for k in optimizer.state.get(p, {}) if k not in known}
        if keys:
            import warnings
            inner = getattr(optimizer, "optimizer", optimizer)      # the Trainer hands over accelerate's wrapper
            warnings.warn(f"optimizer {type(inner).__name__} keeps state {sorted(keys)}, which recompose() "
                          f"does not reset: recycled slots keep the old slots' values there (it resets "
                          f"{FIRST_MOMENTS}, and {SECOND_MOMENTS} with moments='reset')", stacklevel=2)
        self._warned = True


def _check_intact(model: nn.Module, where: str) -> None:
    """Refuse a model in which a linear layer that the SRLoRA targets match is no SRLoRA layer any more:
    resize_token_embeddings replaces a wrapped lm_head by a plain Linear holding only the residual W."""
    named = srlora_layers(model)
    targets = named[0][1].config.targets if named else ()
    for name, m in model.named_modules():
        if ((isinstance(m, nn.Linear) or srlora.is_conv1d(m)) and not isinstance(m, srlora.SRLoRALinear)
                and srlora.matches(name, targets)
                and not srlora._in_peft_layer(name)):
            raise ValueError(f"{where}: {name} matches the SRLoRA targets but is a plain {type(m).__name__} now, "
                             f"holding the residual W without its adapter (resize_token_embeddings replaces "
                             f"lm_head and the embeddings); call resize_token_embeddings before apply_srlora")


def _warn_adapter_dtype(model: nn.Module) -> None:
    """Warn in one line when a cast after wrapping (model.to(torch.bfloat16)) made the adapters half precision."""
    low = [(name, layer.lora_A.dtype) for name, layer in srlora_layers(model) if layer.lora_A.dtype.itemsize < 4]
    if low:
        import warnings
        warnings.warn(f"{low[0][0]}.lora_A is {low[0][1]} ({len(low)} layers): a cast after "
                      f"apply_srlora changed the adapters, whose AdamW steps then mostly round away and whose "
                      f"switches no longer replay exactly; cast the model before apply_srlora, which keeps A and B "
                      f"in fp32", stacklevel=3)


def print_trainable_parameters(model: nn.Module) -> None:
    """PeftModel.print_trainable_parameters for an SRLoRA model (also model.print_trainable_parameters()
    on one from apply_srlora here): the same line, counting parameters (W, A, B, biases, the rest), not
    buffers (the basis, the fused pairs); a 4-bit weight counts two per packed byte, as PEFT counts it."""
    count = lambda p: p.numel() * (2 if hasattr(p, "quant_state") and p.dtype == torch.uint8 else 1)  # noqa: E731
    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def merge_and_unload(model: nn.Module) -> nn.Module:
    """PeftModel.merge_and_unload for an SRLoRA model: srlora.merge_srlora (every SRLoRA layer back to
    the layer type it wrapped, holding W + scaling B A), and the model's own save_pretrained and
    Trainer checks back.  Returns model, a plain transformers model again."""
    srlora.merge_srlora(model)
    for attribute in ("save_pretrained", "load_state_dict", "print_trainable_parameters", "merge_and_unload",
                      "srlora_dequantized", "srlora_quantized", "srlora_tracker", "srlora_record",
                      "_hf_peft_config_loaded"):
        model.__dict__.pop(attribute, None)         # the instance attributes _saves_adapters set
    return model


class SRLoRAPeftConfig:
    """What a PEFT user reaches for, get_peft_model(model, SRLoRAPeftConfig(...)): refused in one line.

    PEFT 0.21 registers only members of its closed PeftType enum, and every PeftModel feature
    (disable_adapter, unmerge, several adapters on one base, PeftModel.from_pretrained) assumes the
    base layer keeps W0, which SRLoRA's switches rewrite.  docs/HUGGINGFACE.md gives the reasoning."""

    def __init__(self, *args, **kwargs):
        raise ValueError("SRLoRAPeftConfig: SRLoRA is no PEFT method (PEFT has no registration for outside methods, "
                         "and its base layer must stay W0 while SRLoRA's switches rewrite W); use "
                         "srlora_hf.apply_srlora(model, r=..., r_target=...), model.save_pretrained(folder) and "
                         "srlora_hf.from_pretrained(base, folder)")


def _check_trainable(model: nn.Module) -> None:
    """Refuse, at the start, SRLoRA layers whose adapters another wrapper froze (a silent no-op)."""
    named = srlora_layers(model)
    if not named:
        raise ValueError(f"SRLoRACallback: {type(model).__name__} has no SRLoRA layers; wrap it with "
                         f"srlora_hf.apply_srlora(model, ...) before Trainer(...)")
    frozen = [name for name, layer in named if not (layer.lora_A.requires_grad and layer.lora_B.requires_grad)]
    if frozen:
        raise ValueError(f"SRLoRACallback: {frozen[0]}.lora_A does not require grad ({len(frozen)} of {len(named)} "
                         f"layers), so SRLoRA would not train (get_peft_model or SFTTrainer(peft_config=...) froze "
                         f"it); drop peft_config and get_peft_model: SRLoRA is the adapter")


def __getattr__(name):
    # PEP 562: `from srlora_hf import SRLoRACallback` imports transformers here, at first use, and
    # makes the class a TrainerCallback (the Trainer calls every on_* event its base defines).
    if name == "SRLoRACallback":
        from transformers import TrainerCallback
        globals()[name] = type(name, (SRLoRACallbackLogic, TrainerCallback), {"__doc__": SRLoRACallbackLogic.__doc__})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
