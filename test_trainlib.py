"""Tests of trainlib.py, the training loop both scripts share, on a toy model that trains in seconds."""
import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch.nn as nn
import torch.nn.functional as F

import trainlib
from trainlib import (Batches, NonFiniteError, TrainConfig, UserError, active_intervals, parse_config,
                      run_methods, save_atomic, steps_for)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.query, self.value, self.classifier = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.classifier(torch.tanh(self.value(torch.tanh(self.query(x)))))


_g = torch.Generator().manual_seed(0)
X = torch.randn(256, 16, generator=_g)
Y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()


@dataclasses.dataclass
class ToyConfig(TrainConfig):
    targets: str = "query,value"
    lr: float = 1e-2
    warmup: int = 5
    max_steps: int = 40
    eval_every: int = 10
    log_every: int = 5
    r: int = 4
    r_target: int = 16
    batch_size: int = 16
    plots: bool = False


def run(tmp_path, fail_at=None, nan_at=None, **overrides):
    cfg = dataclasses.replace(ToyConfig(out_dir=str(tmp_path)), **overrides)
    calls = {"n": 0}

    def make_batch(idx):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise KeyboardInterrupt("simulated crash")
        return X[idx], Y[idx]

    def loss_fn(model, batch):
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss * math.nan if nan_at is not None and calls["n"] == nan_at else loss

    def evaluate(model, device):
        logits = model(X[:64])
        return F.cross_entropy(logits, Y[:64]).item(), {"accuracy": (logits.argmax(1) == Y[:64]).float().mean().item()}

    return run_methods(cfg, task="toy", build=lambda method: Toy(), n_train=len(X), make_batch=make_batch,
                       loss_fn=loss_fn, evaluate=evaluate)


def folder(tmp_path, methods="lora+pissa+srlora"):
    return tmp_path / f"toy-{methods}-seed0"


def test_flags_presets_and_bools_parse_and_explicit_flags_win():
    presets = {"a": {"lr": 0.5, "r": 2}}
    cfg = parse_config(ToyConfig, ["--lr=0.25", "--method", "srlora", "--plots", "--name=a"], presets, "name")
    assert (cfg.lr, cfg.r, cfg.method, cfg.plots) == (0.25, 2, "srlora", True)
    assert parse_config(ToyConfig, ["--plots=false"]).plots is False


@pytest.mark.parametrize("argv, match", [(["--nope=1"], "unknown flag --nope"), (["--lr=fast"], "--lr=fast"),
                                         (["lr"], "unexpected argument"), (["--r"], "--r needs a value")])
def test_bad_flags_raise_one_line_user_errors(argv, match):
    with pytest.raises(UserError, match=match):
        parse_config(ToyConfig, argv)


def test_steps_for_counts_epochs_and_caps_at_max_steps():
    assert steps_for(2, 100, 16) == 14 and steps_for(2, 100, 16, max_steps=5) == 5


@given(warmup=st.integers(0, 600), max_steps=st.integers(1, 600))
@settings(max_examples=50, deadline=None)
def test_warmup_warning_fires_when_the_warmup_is_not_shorter_than_the_run_and_states_the_lr_peak(warmup, max_steps):
    cfg = ToyConfig(warmup=warmup, max_steps=max_steps, lr=3e-5)
    peak = max(map(trainlib.lr_lambda(cfg), range(max_steps)))      # the factors of the steps the run takes
    message = trainlib.warmup_warning(cfg)
    assert (message is not None) == (warmup >= max_steps)
    if message is None:
        assert peak == 1.0
    else:
        assert f"--warmup={warmup} " in message and f"peaks at {peak:.0%} of --lr=3e-05" in message


def test_a_warmup_longer_than_the_run_is_warned_on_stderr_before_training(tmp_path, capsys):
    run(tmp_path, method="lora", warmup=10, max_steps=4)
    err = capsys.readouterr().err
    assert "warning: --warmup=10 is not shorter than the 4 steps of this run" in err
    run(tmp_path, method="lora", overwrite=True)                     # the toy's warm-up of 5 in 40 steps
    assert "--warmup" not in capsys.readouterr().err


def test_a_run_writes_config_log_metrics_and_table(tmp_path):
    results = run(tmp_path)
    out = folder(tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["method"] for m in metrics] == ["lora", "pissa", "srlora"] == [r["method"] for r in results]
    for m in metrics:
        assert {"method", "task", "best_step", "dev_loss", "dev", "params"} <= set(m)
        assert m["dev_loss"] == min(e["dev_loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines())
                                    if e["event"] == "eval" and e["method"] == m["method"])
        assert m["params"]["adapter"] == 4 * (16 + 32) + 4 * (32 + 32)
    records = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    switches = [r for r in records if r["event"] == "switch"]
    assert switches and all(r["method"] == "srlora" for r in switches)
    assert "| srlora |" in (out / "results.md").read_text()
    assert json.loads((out / "config.json").read_text())["task"] == "toy"


def test_an_existing_run_folder_is_kept_unless_overwrite_is_given(tmp_path):
    run(tmp_path, method="lora")
    before = (folder(tmp_path, "lora") / "metrics.json").read_text()
    with pytest.raises(UserError, match="--overwrite"):
        run(tmp_path, method="lora", lr=0.5)
    assert (folder(tmp_path, "lora") / "metrics.json").read_text() == before
    run(tmp_path, method="lora", lr=0.5, overwrite=True)
    assert (folder(tmp_path, "lora") / "metrics.json").read_text() != before


def test_resume_refuses_other_settings_or_a_folder_without_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no run there"):
        run(tmp_path, resume=str(tmp_path / "nothing"))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, method="srlora", fail_at=25, save_every=10)
    with pytest.raises(UserError, match="lr=0.01"):
        run(tmp_path, method="srlora", lr=0.02, resume=str(folder(tmp_path, "srlora")))
    config = folder(tmp_path, "srlora") / "config.json"     # a run started before a flag existed
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "switch_stop"}))
    with pytest.raises(UserError, match="switch_stop=None"):
        run(tmp_path, method="srlora", save_every=10, switch_stop=0.5, resume=str(folder(tmp_path, "srlora")))
    run(tmp_path, method="srlora", save_every=10, resume=str(folder(tmp_path, "srlora")))   # at the default: resumes


def test_resume_after_a_crash_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    run(tmp_path / "a", save_every=10)
    with pytest.raises(KeyboardInterrupt):                 # dies in srlora, after switches and a checkpoint
        run(tmp_path / "b", save_every=10, fail_at=2 * 40 + 27)
    assert not (folder(tmp_path / "b") / "ckpt" / "srlora" / "last.pt.tmp").exists()
    run(tmp_path / "b", save_every=10, resume=str(folder(tmp_path / "b")))
    a, b = folder(tmp_path / "a"), folder(tmp_path / "b")
    ma, mb = (json.loads((f / "metrics.json").read_text()) for f in (a, b))
    for x, y in zip(ma, mb):
        x.pop("train_seconds"), y.pop("train_seconds")
    assert ma == mb
    for method in ("lora", "pissa", "srlora"):
        sa = torch.load(a / "ckpt" / method / "last.pt", weights_only=False)
        sb = torch.load(b / "ckpt" / method / "last.pt", weights_only=False)
        assert sa["step"] == sb["step"] == 40
        for k in sa["model"]:
            v, w = sa["model"][k], sb["model"][k]
            assert (torch.equal(v, w) if torch.is_tensor(v) else v == w), k
    assert (a / "log.jsonl").read_text() == (b / "log.jsonl").read_text()


def test_adaptive_schedule_with_every_option_resumes_bitwise_identically(tmp_path):
    options = dict(method="srlora", switch_schedule="adaptive", adapt_every=2, adapt_ratio=0.8, score="relative",
                   grace=1, switch_stop=0.8, save_every=5)
    run(tmp_path / "a", **options)
    with pytest.raises(KeyboardInterrupt):                 # dies after switches and a checkpoint
        run(tmp_path / "b", fail_at=9, **options)
    run(tmp_path / "b", resume=str(folder(tmp_path / "b", "srlora")), **options)
    a, b = folder(tmp_path / "a", "srlora"), folder(tmp_path / "b", "srlora")
    assert (a / "log.jsonl").read_text() == (b / "log.jsonl").read_text()
    switches = [json.loads(l) for l in (a / "log.jsonl").read_text().splitlines() if '"switch"' in l]
    assert switches and all(e["step"] <= 0.8 * 40 and e["step"] % 2 == 0 for e in switches)
    sa, sb = (torch.load(f / "ckpt" / "srlora" / "last.pt", weights_only=False) for f in (a, b))
    assert sa["schedule"] == sb["schedule"] and sa["schedule"]["last"]
    for k in sa["model"]:
        v, w = sa["model"][k], sb["model"][k]
        assert (torch.equal(v, w) if torch.is_tensor(v) else v == w), k


def test_a_non_finite_loss_stops_the_run_before_it_touches_the_weights(tmp_path):
    with pytest.raises(NonFiniteError, match="step 23"):
        run(tmp_path, method="srlora", nan_at=23, save_every=10)
    ckpt = torch.load(folder(tmp_path, "srlora") / "ckpt" / "srlora" / "last.pt", weights_only=False)
    assert ckpt["step"] == 20 and all(
        torch.isfinite(v).all() for v in ckpt["model"].values() if torch.is_tensor(v) and v.is_floating_point())


def test_grad_accum_gives_the_importance_scores_of_one_big_batch(tmp_path):
    run(tmp_path / "one", method="srlora", max_steps=8, save_every=8)
    run(tmp_path / "four", method="srlora", max_steps=8, save_every=8, grad_accum=4)
    one, four = (torch.load(folder(tmp_path / d, "srlora") / "ckpt" / "srlora" / "last.pt", weights_only=False)
                 for d in ("one", "four"))
    for layer in ("query", "value"):
        for key in ("ibar_A", "ubar_A", "ibar_B", "ubar_B"):
            torch.testing.assert_close(four["tracker"][layer][key], one["tracker"][layer][key], rtol=1e-4, atol=1e-9)
    for k in one["model"]:
        torch.testing.assert_close(four["model"][k], one["model"][k], rtol=1e-4, atol=1e-6)


def test_batches_follow_seeded_epochs_and_resume_from_their_state():
    a = Batches(10, 3, seed=1)
    seen = [a.next() for _ in range(3)]
    assert sorted(sum(seen, [])) == sorted(set(sum(seen, []))) and len(sum(seen, [])) == 9
    b = Batches(10, 3, seed=1)
    b.load_state_dict(a.state_dict())
    assert [a.next() for _ in range(5)] == [b.next() for _ in range(5)]
    with pytest.raises(UserError, match="batch_size"):
        Batches(2, 3, 0)


def test_active_intervals_follow_the_switch_events():
    records = [{"event": "train", "method": "srlora", "step": 30},
               {"event": "switch", "method": "srlora", "step": 10, "layer": "q", "slots": [1], "fused_out": [1], "brought_in": [2]},
               {"event": "switch", "method": "srlora", "step": 20, "layer": "q", "slots": [0], "fused_out": [0], "brought_in": [3]}]
    assert active_intervals(records, r=2) == {"q": {0: 20, 1: 10, 2: 20, 3: 10}}


def test_atomic_save_keeps_the_previous_file_when_writing_fails(tmp_path):
    target = tmp_path / "x.pt"
    save_atomic({"a": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        save_atomic({"a": Unpicklable()}, target)
    assert torch.equal(torch.load(target)["a"], torch.ones(2)) and not (tmp_path / "x.pt.tmp").exists()


def test_config_errors_name_the_flag(tmp_path):
    for overrides, match in ((dict(method="dora"), "unknown method"), (dict(r_target=2), "r_target=2"),
                             (dict(gamma=0.0), "gamma"), (dict(targets="nothing"), "match no nn.Linear"),
                             (dict(r=40), "r=40"), (dict(batch_size=10, grad_accum=4), "divisible"),
                             (dict(score="size"), "score"), (dict(grace=2), "grace=2"),
                             (dict(switch_stop=0.0), "switch_stop"), (dict(switch_schedule="often"), "switch_schedule"),
                             (dict(residual_dtype="half"), "--residual_dtype=half")):
        with pytest.raises(UserError, match=match):
            run(tmp_path, **overrides)
    assert not any(tmp_path.iterdir())                     # nothing was written


@pytest.mark.parametrize("residual_dtype, stored", [("model", torch.float32), ("bfloat16", torch.bfloat16)])
def test_residual_dtype_flag_sets_the_stored_w_and_a_bf16_run_trains(tmp_path, residual_dtype, stored):
    cfg = ToyConfig(residual_dtype=residual_dtype)
    model = trainlib.prepare(cfg, "srlora", lambda method: Toy(), ("classifier",), torch.device("cpu"))
    assert model.query.weight.dtype == model.query.U.dtype == stored and model.query.lora_A.dtype == torch.float32
    (result,) = run(tmp_path, methods="srlora", amp="bf16", residual_dtype=residual_dtype)
    assert math.isfinite(result["dev_loss"]) and result["dev"]["accuracy"] > 0.5


def toy_main(argv):
    """The toy run as a script, for the multi-process test: python -c 'import test_trainlib as t; t.toy_cli()'."""
    cfg = parse_config(ToyConfig, argv)
    return run_methods(cfg, task="toy", build=lambda method: Toy(), n_train=len(X),
                       make_batch=lambda idx: (X[idx], Y[idx]),
                       loss_fn=lambda model, b: F.cross_entropy(model(b[0]), b[1]),
                       evaluate=lambda model, device: (F.cross_entropy(model(X[:64]), Y[:64]).item(), {}))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["fixed", "adaptive"])   # adaptive: every rank must take the same decisions
def test_two_gloo_processes_agree_and_match_one_process(tmp_path, schedule):
    import os
    import socket
    import subprocess
    import sys
    root = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    code = "import sys, test_trainlib as t; t.toy_main(sys.argv[1:])"
    args = ["--method=srlora", "--max_steps=24", "--eval_every=12", "--batch_size=16",
            f"--switch_schedule={schedule}", "--adapt_every=2", "--adapt_ratio=0.9"]
    subprocess.run([sys.executable, "-c", code, f"--out_dir={tmp_path / 'one'}", *args], env=env, check=True,
                   capture_output=True, timeout=300)
    with socket.socket() as s:                             # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                "--no-python", sys.executable, "-c", code]
    done = subprocess.run(torchrun + [f"--out_dir={tmp_path / 'two'}", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    cause = [l for l in done.stderr.splitlines() if "rror" in l or "terminate" in l or "Abort" in l][:10]
    assert done.returncode == 0, "\n".join(cause) + "\n" + done.stderr[-2000:]
    one, two = (folder(tmp_path / d, "srlora") for d in ("one", "two"))
    records = [json.loads(l) for l in (two / "log.jsonl").read_text().splitlines()]
    assert [r["identical"] for r in records if r["event"] == "ranks"] == [True]
    assert sum(r["event"] == "switch" for r in records) >= 4
    a = torch.load(one / "ckpt" / "srlora" / "last.pt", weights_only=False)["model"]
    b = torch.load(two / "ckpt" / "srlora" / "last.pt", weights_only=False)["model"]
    for k in a:
        if torch.is_tensor(a[k]):
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
        else:
            assert a[k] == b[k]
