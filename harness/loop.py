"""The training loop for LoRA / PiSSA / SRLoRA that train_glue.py and train_vit.py share: one
method trained with checkpoints and resume (train_method), every method in turn into one run
folder (run_methods), and the results table.  Several processes (DDP, FSDP2) go through parallel."""
import hashlib
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from harness import parallel
from harness.config import check_config, method_list, srlora_config
from harness.errors import NonFiniteError, UserError
from harness.plots import plot_run
from harness.rundir import Run, save_atomic, write_json
from harness.weights import read_checkpoint
from harness.schedule import Batches, lr_lambda, rng_state, seed_everything, set_rng_state, warmup_warning
from srlora import ImportanceTracker, apply_srlora, recompose, srlora_layers
from srlora_switch import AdaptiveSchedule, SlotRule, pair_norms, switch_steps_within


# --- helpers of the training loop -----------------------------------------------------------

def to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def adapted_state(model):
    """What training changes: every tensor of every SRLoRALinear (residual W, A, B, basis,
    active_indices, next_index) and every trainable parameter (the head)."""
    prefixes = tuple(name + "." for name, _ in srlora_layers(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes) or k in trainable}


def count_params(model):
    adapter = sum(l.lora_A.numel() + l.lora_B.numel() for _, l in srlora_layers(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the SVD basis buffers are bookkeeping, not model parameters
    total = sum(p.numel() for p in model.parameters())
    return {"adapter": adapter, "trainable": trainable, "total": total}


def fmt_count(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One line per log_every steps: method, step, loss, lr, it/s, ETA (overwritten in place on a terminal)."""

    def __init__(self, method, total, start_step, enabled):
        self.method, self.total, self.enabled = method, total, enabled
        self.t0, self.s0 = time.time(), start_step
        self.tty = sys.stdout.isatty()

    def show(self, step, loss, lr):
        if not self.enabled:
            return
        rate = (step - self.s0) / max(1e-9, time.time() - self.t0)
        eta = (self.total - step) / max(rate, 1e-9)
        line = (f"[{self.method}] step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{rate:.2f} it/s  ETA {fmt_time(eta)}")
        print(("\r" + line + " " * 4) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def done(self):
        if self.enabled and self.tty:
            print()


# --- one method -----------------------------------------------------------------------------

def pick_device(cfg):
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def prepare(cfg, method, build, head, device):
    """A fresh model for `method`: LoRA (Kaiming A, zero B), PiSSA (top-r SVD, no switches)
    or SRLoRA (PiSSA init, switches up to r_target); the head trains fully."""
    model = build(method).to(device)
    decompose = None
    if dist.is_initialized():                       # DDP or FSDP2: each weight's SVD once, on one rank
        from srlora_fsdp import spread_factors
        decompose = spread_factors
    try:
        apply_srlora(model, srlora_config(cfg, method), decompose=decompose)
    except ValueError as e:                         # bad r / targets: the same one line as other input errors
        raise UserError(str(e)) from None
    for name, p in model.named_parameters():
        if name.startswith(tuple(head)):
            p.requires_grad_(True)
    return parallel.shard(model) if cfg.fsdp else model


def train_method(cfg, method, model, run, *, n_train, make_batch, loss_fn, evaluate, rank, world, device):
    """Train one adapted model for cfg.max_steps optimizer steps; returns its metrics at the
    step with the lowest dev loss.  Resumes from run's last checkpoint for this method if any."""
    params = [p for p in model.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(("lora_A", "lora_B"))]
    groups = [{"params": [p for p in params if not any(p is h for h in head)]},
              {"params": head, "lr": cfg.head_lr or cfg.lr}]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    tracker = ImportanceTracker(model) if method == "srlora" else None       # beta1, beta2 from the config
    rule = SlotRule(cfg.score, cfg.grace)                                      # the paper's Eq. (8) by default
    adaptive = AdaptiveSchedule(cfg.max_steps, cfg.r, cfg.r_target, cfg.gamma, cfg.adapt_ratio, cfg.adapt_every,
                                stop=cfg.switch_stop, rule=rule) \
        if tracker and cfg.switch_schedule == "adaptive" else None
    switches = set(switch_steps_within(cfg.max_steps, cfg.r, cfg.r_target, cfg.gamma, cfg.switch_stop)) \
        if tracker and not adaptive else set()
    batches = Batches(n_train, cfg.batch_size, cfg.seed)
    best = {"dev_loss": math.inf, "step": 0, "dev": {}}
    step, elapsed, window = 0, 0.0, []
    seed_everything(cfg.seed)

    last, resumed = run.ckpt(method), None
    if cfg.resume and (last.exists() or run.ckpt(method, "best").exists()):
        if cfg.fsdp:                                  # on any number of ranks: the shards are re-cut as they load
            ckpt, resumed = parallel.load_sharded(last, model, opt, tracker), last
        else:
            ckpt, resumed = resume_checkpoint(run, method, device)
            load_exactly(model, ckpt["model"], resumed)
            opt.load_state_dict(ckpt["optimizer"])
            if tracker:
                tracker.load_state_dict(ckpt["tracker"])
        check_position(ckpt, cfg, n_train, resumed)
        sched.load_state_dict(ckpt["scheduler"])
        if adaptive:
            adaptive.load_state_dict(ckpt["schedule"])
        batches.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        step, best, elapsed = ckpt["step"], ckpt["best"], ckpt["elapsed"]
        window = list(ckpt.get("window", []))         # the losses since the last log record: full windows
        run.truncate_log(method, step)
        if rank == 0:
            print(f"[{method}] resumed from {resumed} at step {step}")

    saved_step = step if resumed else 0

    def checkpoint(kind):
        nonlocal saved_step
        weights = adapted_state(model)
        bad = parallel.first_non_finite(weights, cfg.fsdp)
        if bad is not None:                            # a checkpoint is kept only if it is a good one to resume
            raise NonFiniteError(f"[{method}] step {step}: {bad} is no longer finite after this step, so it is "
                                 f"not saved. {advice()}")
        saved_step = step if kind == "last" else saved_step
        state = {"method": method, "step": step, "schedule": adaptive.state_dict() if adaptive else None,
                 "scheduler": sched.state_dict(), "data": batches.state_dict(), "rng": rng_state(), "best": best,
                 "elapsed": elapsed + time.time() - t0, "window": list(window)}
        if cfg.fsdp:                                   # every rank writes its shards
            parallel.save_sharded(run.ckpt(method, kind), model, opt, tracker, step, state)
        elif rank == 0:
            save_atomic({**state, "model": weights, "tracker": tracker.state_dict() if tracker else None,
                         "optimizer": opt.state_dict()}, run.ckpt(method, kind))

    ddp = parallel.forward_module(model, world, cfg.fsdp)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    progress = Progress(method, cfg.max_steps, step, enabled=rank == 0)
    t0 = time.time()

    def advice():
        # Not "--resume with a lower --lr": the lr shapes the schedule and the optimizer state, so a
        # resume with another lr would be a run that its config.json does not describe; --resume
        # refuses it.  A new run with a lower lr is what the program accepts.
        good = f"The last finite checkpoint, {last} (step {saved_step}), is kept. " if saved_step else ""
        return (f"{good}Start again with a lower learning rate, e.g. --lr={cfg.lr / 10:g} (with --overwrite, "
                f"or another --name to keep this run)")

    model.train()
    while step < cfg.max_steps:
        step += 1
        local = batches.next()[rank::world]              # this rank's share of the global batch
        loss_sum = torch.zeros((), device=device)
        for j in range(cfg.grad_accum):
            chunk = local[j * micro:(j + 1) * micro]
            sync = j == cfg.grad_accum - 1                # gradients are reduced on the last micro-batch only
            with amp, parallel.gradient_sync(ddp, sync, cfg.fsdp):
                loss = loss_fn(ddp, to_device(make_batch(chunk), device)) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        # One host sync per step: the loss for the log and a finite check of every gradient.
        grad_norm = parallel.grad_norm(params, cfg.fsdp)
        if world > 1:                                     # log the global batch's loss, not this rank's share
            dist.all_reduce(loss_sum)
            loss_sum /= world
        loss_value, grad_value = torch.stack([loss_sum, grad_norm]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            raise NonFiniteError(f"[{method}] step {step}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'}; "
                                 f"stopped before this step changed any weight. {advice()}")
        if tracker:
            tracker.update()                              # Eq. (3)-(5), before the optimizer moves w
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss_value)
        if step in switches or adaptive:                  # Eq. (8)-(12)
            layers = adaptive.due(step, tracker) if adaptive else None      # None: every layer
            if layers is None or layers:
                before = switch_diagnostics(tracker)
                for event in recompose(model, tracker, opt, layers=layers, select=rule):
                    run.log({"event": "switch", "method": method, "step": step, **event, **before[event["layer"]]})
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            lr = sched.get_last_lr()[0]
            run.log({"event": "train", "method": method, "step": step, "loss": sum(window) / len(window), "lr": lr})
            progress.show(step, sum(window) / len(window), lr)
            window = []
        if (step % cfg.eval_every == 0 or step == cfg.max_steps) and (rank == 0 or cfg.fsdp):
            model.eval()                                  # FSDP2: every rank, since a forward needs them all
            with torch.no_grad(), amp:
                dev_loss, dev = evaluate(model, device)
            model.train()
            if cfg.fsdp and world > 1:                    # rank 0's numbers decide, so all save "best" together
                shared = [(dev_loss, dev)]
                dist.broadcast_object_list(shared, src=0)
                dev_loss, dev = shared[0]
            run.log({"event": "eval", "method": method, "step": step, "dev_loss": dev_loss, "dev": dev})
            if dev_loss < best["dev_loss"]:
                best = {"dev_loss": dev_loss, "step": step, "dev": dev}
                checkpoint("best")
        if step % (cfg.save_every or cfg.eval_every) == 0 or step == cfg.max_steps:
            checkpoint("last")
    progress.done()
    if world > 1 and not cfg.fsdp:                       # FSDP2: each rank holds other rows, by design
        _check_ranks_agree(model, method, run)
    return best, elapsed + time.time() - t0


def resume_checkpoint(run, method, device):
    """(checkpoint, its path): last.pt, or best.pt when last.pt is missing or unreadable (saying so);
    one line naming both when neither reads."""
    last, best = run.ckpt(method), run.ckpt(method, "best")
    errors = []
    for path in (last, best):
        if not path.exists():
            errors.append(f"{path} does not exist")
            continue
        try:
            ckpt = read_checkpoint(path, map_location=device)
        except UserError as e:
            errors.append(str(e))
            continue
        if errors:
            print(f"warning: {errors[0]}; resuming from {path} instead, at its earlier step", file=sys.stderr)
        return ckpt, path
    raise UserError(f"--resume: no readable checkpoint for {method}: {'; and '.join(errors)}; "
                    f"start again with --overwrite")


def load_exactly(model, saved: dict, path):
    """Load a checkpoint's adapted weights only if it holds exactly the tensors that this model
    trains (adapted_state), each of the same shape: a missing or extra tensor is an error."""
    own = adapted_state(model)
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model does not train"
        raise UserError(f"--resume: {path} does not fit this model (it {what}); repeat the original flags")
    for k, v in saved.items():
        if not torch.is_tensor(v) or v.shape != own[k].shape:
            raise UserError(f"--resume: {path}: {k} has shape {tuple(getattr(v, 'shape', ()))}, the model's is "
                            f"{tuple(own[k].shape)}; repeat the original flags")
    model.load_state_dict(saved, strict=False)          # strict=False: the frozen weights come from the model itself


def check_position(ckpt, cfg, n_train, path):
    """A checkpoint's step lies within the run, and its data order and schedule are at that step."""
    step = ckpt.get("step")
    if type(step) is not int or not 0 <= step <= cfg.max_steps:
        raise UserError(f"--resume: {path} is at step {step!r}, outside this run's 0..{cfg.max_steps}; "
                        f"the checkpoint was edited or is from another run")
    per_epoch = n_train // cfg.batch_size                # Batches: full batches per epoch
    data = {"epoch": (step - 1) // per_epoch, "pos": ((step - 1) % per_epoch + 1) * cfg.batch_size} if step \
        else {"epoch": 0, "pos": 0}
    if ckpt.get("data") != data or ckpt.get("scheduler", {}).get("last_epoch") != step:
        raise UserError(f"--resume: {path}: its data position {ckpt.get('data')} or schedule does not match its "
                        f"step {step}; the checkpoint was edited or is from another run")


@torch.no_grad()
def switch_diagnostics(tracker):
    """{layer: what its slots looked like just before a switch}: the pair scores S_k of Eq. (7)
    that pick the recycled slots, and each pair's magnitude scaling * |B_k| |A_k| (its singular
    value when it was brought in).  Logged with the switch, so the dynamics can be read back."""
    return {name: {"scores": tracker.pair_scores(layer).tolist(),
                   "norms": (layer.scaling * pair_norms(layer)).tolist()}
            for name, layer in zip(tracker.names, tracker.layers)}


def _check_ranks_agree(model, method, run):
    """Under DDP every rank must hold the same adapted weights; compare their digests."""
    digest = hashlib.sha256()
    for k, v in sorted(adapted_state(model).items()):
        if torch.is_tensor(v):
            digest.update(k.encode() + v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    run.log({"event": "ranks", "method": method, "step": -1, "identical": len(set(digests)) == 1})
    if len(set(digests)) != 1:
        raise RuntimeError(f"[{method}] DDP ranks ended with different adapted weights: {digests}")


# --- all methods ----------------------------------------------------------------------------

def run_methods(cfg, *, task, build, n_train, make_batch, loss_fn, evaluate, head=("classifier",)):
    """Train every method of cfg in turn from the same pretrained model, seed and data order,
    and write the run folder (see Run).  Returns one metrics dict per method."""
    check_config(cfg)
    Batches(n_train, cfg.batch_size, cfg.seed)      # fewer examples than a batch: fail before the folder is touched
    if cfg.fsdp and not parallel.launched_by_torchrun():
        raise UserError("--fsdp shards the model over the processes torchrun starts; run "
                        "torchrun --nproc_per_node=2 <script> -- --fsdp ... (one process or more)")
    rank, world = parallel.start(cfg.fsdp)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UserError(f"--batch_size={cfg.batch_size} must be divisible by --grad_accum={cfg.grad_accum} "
                        f"x {world} processes")
    device = pick_device(cfg)
    run = Run(cfg, task, writer=rank == 0)
    try:
        return _run_methods(cfg, run, task, build, n_train, make_batch, loss_fn, evaluate, head, rank, world, device)
    finally:
        run.close()                                  # the lock; also when a method fails or is interrupted


def _run_methods(cfg, run, task, build, n_train, make_batch, loss_fn, evaluate, head, rank, world, device):
    warning = warmup_warning(cfg)
    if warning and rank == 0:
        print(warning, file=sys.stderr)
    results = list(run.done)
    todo = [m for m in method_list(cfg) if m not in {r["method"] for r in results}]
    seed_everything(cfg.seed)
    # Build the first model before writing anything: a bad --targets or --r fails here and
    # leaves any earlier run in the folder untouched.
    model = prepare(cfg, todo[0], build, head, device) if todo else None
    run.start()
    for i, method in enumerate(todo):
        if i > 0:
            seed_everything(cfg.seed)
            model = prepare(cfg, method, build, head, device)
        params = count_params(model)
        if rank == 0:
            print(f"[{method}] {params['adapter']:,} adapter + {params['trainable'] - params['adapter']:,} head "
                  f"parameters train, of {params['total']:,}; {cfg.max_steps} steps on {device}")
        best, seconds = train_method(cfg, method, model, run, n_train=n_train, make_batch=make_batch,
                                     loss_fn=loss_fn, evaluate=evaluate, rank=rank, world=world, device=device)
        results.append({"method": method, "task": task, "best_step": best["step"], "dev_loss": best["dev_loss"],
                        "dev": best["dev"], "params": params, "steps": cfg.max_steps, "train_seconds": round(seconds, 1)})
        run.done = results
        if rank == 0:
            write_json(results, run.path / "metrics.json")
        del model
    if rank == 0:
        table = results_table(results)
        save_atomic(table, run.path / "results.md")
        print("\n" + table)
        if cfg.plots:
            plot_run(run.path)
        print(f"outputs in {run.path}/")
    parallel.stop()
    return results


def results_table(results) -> str:
    """A Table-3-style comparison: dev metrics x100 at the step with the lowest dev loss."""
    names = list(dict.fromkeys(k for r in results for k in r["dev"]))
    lines = ["| method | trainable / total params | " + " | ".join(names) + " | dev loss | best step | train time |",
             "|---" * (len(names) + 5) + "|"]
    for r in results:
        p = r["params"]
        cells = [f"{100 * r['dev'][k]:.1f}" if k in r["dev"] else "-" for k in names]
        lines.append(f"| {r['method']} | {fmt_count(p['trainable'])} / {fmt_count(p['total'])} | " + " | ".join(cells)
                     + f" | {r['dev_loss']:.4f} | {r['best_step']} | {fmt_time(r['train_seconds'])} |")
    task = results[0]["task"] if results else "?"
    return f"Task {task}: dev metrics x100 at the step with the lowest dev loss.\n\n" + "\n".join(lines) + "\n"
