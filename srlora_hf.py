"""SRLoRA inside Hugging Face's Trainer: one callback, SRLoRACallback.

    model = apply_srlora(model, targets=PAPER_TARGETS["llama"], r=8, r_target=64, gamma=0.5)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SRLoRACallback()])
    trainer.train()                                # importance every optimizer step, switches from max_steps
    trainer.train(resume_from_checkpoint=True)     # continues exactly: same switches, same weights

The callback does what a hand-written SRLoRA training loop does: it builds the
ImportanceTracker, calls tracker.update() once per optimizer step, runs recompose() after the
optimizer step of every switch step of Eq. (13)-(14), and keeps the tracker's EMAs in every Trainer
checkpoint.  The model itself (W, A, B, the basis and next_index) saves through save_pretrained.
transformers is imported lazily, so importing this module costs nothing without it.
"""
import os

import torch

from srlora import FIRST_MOMENTS, SECOND_MOMENTS, ImportanceTracker, recompose, srlora_layers, switch_steps

TRACKER_FILE = "srlora_tracker.pt"   # written next to the model in every Trainer checkpoint folder


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
    - Resume: on_save writes the tracker to TRACKER_FILE in the checkpoint folder; on_train_begin of
      a resumed run reads it from output_dir/checkpoint-<global_step>, so the EMAs, and with them
      the switch decisions, continue as if the run had not stopped.
    `events` holds one record per layer switch: step, layer, slots, indices fused out and brought in.
    """

    def __init__(self, **retired):
        if retired:
            raise TypeError(f"SRLoRACallback() takes no arguments, got {sorted(retired)}: gamma, beta1, beta2, "
                            f"reset and moments come from the SRLoRAConfig given to apply_srlora")
        self.tracker, self.switches, self.events, self._warned = None, set(), [], False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = [layer for _, layer in srlora_layers(model)]
        self.tracker = ImportanceTracker(model)
        # The largest r_target any layer kept: apply_srlora clamps it to min(m, n) per layer.
        r_target = max(layer.r_target for layer in layers)
        self.switches = set(switch_steps(state.max_steps, layers[0].r, r_target, layers[0].config.gamma))
        if state.global_step > 0:                                  # resumed from a checkpoint
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", TRACKER_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"resume_from_checkpoint: {path} is missing, so the importance EMAs "
                                 f"would restart; resume from a checkpoint that SRLoRACallback wrote "
                                 f"in args.output_dir")
            self.tracker.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

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

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:                                       # the processes that wrote the checkpoint
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            torch.save(self.tracker.state_dict(), os.path.join(folder, TRACKER_FILE))

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


def __getattr__(name):
    # PEP 562: `from srlora_hf import SRLoRACallback` imports transformers here, at first use, and
    # makes the class a TrainerCallback (the Trainer calls every on_* event its base defines).
    if name == "SRLoRACallback":
        from transformers import TrainerCallback
        globals()[name] = type(name, (SRLoRACallbackLogic, TrainerCallback), {"__doc__": SRLoRACallbackLogic.__doc__})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
