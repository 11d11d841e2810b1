"""Tests of harness/loop.py, the training loop both scripts share, on the toy run of
tests/helpers.py: outputs, bitwise resume, non-finite losses, gradient accumulation, dtypes."""
import json
import math

import pytest
import torch

from harness import loop
from harness.errors import NonFiniteError
from tests.helpers import Toy, ToyConfig, folder, run


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


@pytest.mark.parametrize("residual_dtype, stored", [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_residual_dtype_flag_sets_the_stored_w_and_a_bf16_run_trains(tmp_path, residual_dtype, stored):
    cfg = ToyConfig(residual_dtype=residual_dtype)
    model = loop.prepare(cfg, "srlora", lambda method: Toy(), ("classifier",), torch.device("cpu"))
    assert model.query.weight.dtype == model.query.U.dtype == stored and model.query.lora_A.dtype == torch.float32
    (result,) = run(tmp_path, methods="srlora", amp="bf16", residual_dtype=residual_dtype)
    assert math.isfinite(result["dev_loss"]) and result["dev"]["accuracy"] > 0.5


def test_a_checkpoint_is_kept_only_if_its_weights_are_finite(tmp_path):
    # SGD with a huge weight decay: the loss of step 1 is finite, the weights after it are not
    with pytest.raises(NonFiniteError, match=r"step 1: .* is no longer finite after this step, so it is not saved"):
        run(tmp_path, method="lora", optimizer="sgd", lr=1e10, weight_decay=1e30, warmup=0, eval_every=1)
    assert not list(folder(tmp_path, "lora").rglob("*.pt"))


def test_the_non_finite_advice_is_a_command_line_the_program_accepts(tmp_path):
    with pytest.raises(NonFiniteError) as e:
        run(tmp_path, method="srlora", nan_at=23, save_every=10)
    message = str(e.value)
    assert "--lr=0.001" in message and "--overwrite" in message and "(step 20)" in message
    (result,) = run(tmp_path, method="srlora", save_every=10, lr=0.001, overwrite=True)   # what it says to do
    assert math.isfinite(result["dev_loss"])


def test_a_resume_between_log_records_logs_full_windows(tmp_path):
    # checkpoints at 7, 14, ...; records every 5 steps; killed at step 10, resumed from step 7
    run(tmp_path / "a", method="lora", save_every=7)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", method="lora", save_every=7, fail_at=10)
    run(tmp_path / "b", method="lora", save_every=7, resume=str(folder(tmp_path / "b", "lora")))
    a, b = (folder(tmp_path / d, "lora") / "log.jsonl" for d in ("a", "b"))
    assert a.read_text() == b.read_text()
