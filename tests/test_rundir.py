"""Tests of harness/rundir.py: atomic writes, and a run folder that is neither replaced nor
resumed by mistake, on the toy run of tests/helpers.py."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from harness.errors import UserError
from harness.rundir import Run, save_atomic
from tests.helpers import ROOT, ToyConfig, folder, run


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


def test_atomic_save_keeps_the_previous_file_when_writing_fails(tmp_path):
    target = tmp_path / "x.pt"
    save_atomic({"a": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        save_atomic({"a": Unpicklable()}, target)
    assert torch.equal(torch.load(target)["a"], torch.ones(2)) and not (tmp_path / "x.pt.tmp").exists()


# --- only a run folder is ever replaced (finding 1) -----------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_run_is_refused_and_left_as_it_is(tmp_path, overwrite):
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "notes.txt").write_text("keep")
    model = tmp_path / "bert-base"                          # a model folder has a config.json too, not a run's
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for name in ("mydata", "bert-base"):
        with pytest.raises(UserError, match="is not a run folder") as e:
            run(tmp_path, method="lora", name=name, overwrite=overwrite)
        assert "\n" not in str(e.value)
    assert (tmp_path / "mydata" / "notes.txt").read_text() == "keep"
    assert json.loads((model / "config.json").read_text()) == {"model_type": "bert"}


@pytest.mark.parametrize("name", [".", "..", "runs/x", "../up", "/abs"])
def test_name_cannot_stand_for_the_output_folder_or_anything_above_it(tmp_path, name):
    runs = tmp_path / "runs"
    run(runs, method="lora")                                # an earlier run in --out_dir
    before = sorted(p.name for p in runs.rglob("*"))
    with pytest.raises(UserError, match="--name=.* must be one folder name inside --out_dir"):
        run(runs, method="lora", name=name, overwrite=True)
    assert sorted(p.name for p in runs.rglob("*")) == before and (tmp_path / "runs").is_dir()


def test_an_empty_folder_holds_a_new_run_and_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    run(tmp_path, method="lora", name="empty")
    assert (tmp_path / "empty" / "metrics.json").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        run(tmp_path, method="lora", name="afile")
    with pytest.raises(UserError, match="cannot write the run folder"):   # --out_dir under a file: not writable
        run(tmp_path / "afile" / "runs", method="lora")
    assert (tmp_path / "afile").read_text() == "x"


# --- one writer per run folder (finding 3) ----------------------------------------------------

def test_a_second_writer_is_refused_while_a_run_holds_the_folder(tmp_path):
    run(tmp_path, method="srlora", max_steps=10, save_every=5)
    path = folder(tmp_path, "srlora")
    cfg = ToyConfig(out_dir=str(tmp_path), method="srlora", max_steps=10, save_every=5, resume=str(path))
    holder = Run(cfg, "toy", writer=True)                  # as a process that is still running would
    try:
        for flags in (dict(resume=str(path)), dict(overwrite=True)):
            with pytest.raises(UserError, match=r"in use by another process \(pid \d+"):
                run(tmp_path, method="srlora", max_steps=10, save_every=5, **flags)
    finally:
        holder.close()
    run(tmp_path, method="srlora", max_steps=10, save_every=5, overwrite=True)      # free again


def test_a_planted_symlink_is_never_followed_by_an_atomic_write(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    target = tmp_path / "ckpt" / "last.pt"
    target.parent.mkdir()
    (tmp_path / "ckpt" / "last.pt.tmp").symlink_to(outside)     # the temporary name writers used to share
    save_atomic({"a": torch.ones(2)}, target)
    assert outside.read_text() == "keep" and torch.equal(torch.load(target)["a"], torch.ones(2))
    target.unlink()
    target.symlink_to(outside)                              # the file itself a symlink: replaced, not written through
    save_atomic({"a": torch.zeros(2)}, target)
    assert outside.read_text() == "keep" and not target.is_symlink()
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.pt", "last.pt.tmp"]   # no temporary left


# --- recovery without a hand (finding 6) ---------------------------------------------------------

def metrics(path):
    return [{k: v for k, v in m.items() if k != "train_seconds"} for m in json.loads((path / "metrics.json").read_text())]


def test_a_half_written_last_log_line_is_dropped_on_resume_with_a_warning(tmp_path, capsys):
    run(tmp_path / "a", method="srlora", save_every=10)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", method="srlora", save_every=10, fail_at=25)
    b = folder(tmp_path / "b", "srlora")
    with open(b / "log.jsonl", "a") as f:
        f.write('{"event": "train", "method": "srl')           # a full disk mid-append
    run(tmp_path / "b", method="srlora", save_every=10, resume=str(b))
    assert "the last line is cut short" in capsys.readouterr().err
    assert (b / "log.jsonl").read_text() == (folder(tmp_path / "a", "srlora") / "log.jsonl").read_text()


def test_a_corrupt_last_checkpoint_falls_back_to_best_and_resumes_to_the_same_result(tmp_path, capsys):
    run(tmp_path / "a", method="srlora", save_every=10)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", method="srlora", save_every=10, fail_at=35)
    b = folder(tmp_path / "b", "srlora")
    (b / "ckpt" / "srlora" / "last.pt").write_bytes(b"PK\x03\x04 half a zip")
    run(tmp_path / "b", method="srlora", save_every=10, resume=str(b))
    err = capsys.readouterr().err
    assert "last.pt: unreadable" in err and "resuming from" in err and "best.pt" in err
    assert metrics(b) == metrics(folder(tmp_path / "a", "srlora"))


def test_when_no_checkpoint_reads_the_error_names_both(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, method="srlora", save_every=10, fail_at=35)
    b = folder(tmp_path, "srlora")
    for kind in ("last", "best"):
        (b / "ckpt" / "srlora" / f"{kind}.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"last\.pt: unreadable.*; and .*best\.pt: unreadable") as e:
        run(tmp_path, method="srlora", save_every=10, resume=str(b))
    assert "\n" not in str(e.value)


def test_a_run_with_only_best_resumes_from_it(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, method="lora", save_every=100, fail_at=35)       # eval at 10, 20, 30: only best.pt
    b = folder(tmp_path, "lora")
    assert not (b / "ckpt" / "lora" / "last.pt").exists() and (b / "ckpt" / "lora" / "best.pt").exists()
    run(tmp_path, method="lora", save_every=100, resume=str(b))
    assert json.loads((b / "metrics.json").read_text())[0]["steps"] == 40


# --- no code from a checkpoint (finding 2) ---------------------------------------------------------

class Payload:
    """Unpickling this calls open(path, "w"): a file appears if the checkpoint's pickle runs."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_checkpoint_that_would_run_code_is_refused_with_one_line(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, method="srlora", save_every=10, fail_at=25)
    b, marker = folder(tmp_path, "srlora"), tmp_path / "pwned"
    for kind in ("last", "best"):
        ckpt = torch.load(b / "ckpt" / "srlora" / f"{kind}.pt", weights_only=False)
        torch.save({**ckpt, "extra": Payload(marker)}, b / "ckpt" / "srlora" / f"{kind}.pt")
    with pytest.raises(UserError, match="could run code") as e:
        run(tmp_path, method="srlora", save_every=10, resume=str(b))
    assert "\n" not in str(e.value) and not marker.exists()


# --- a resumed checkpoint fits the model and the run (finding 6) ----------------------------------

def edit_missing_tensor(ckpt):
    ckpt["model"].pop(next(iter(ckpt["model"])))


def edit_extra_tensor(ckpt):
    ckpt["model"]["query.extra"] = torch.zeros(1)


def edit_step(ckpt):
    ckpt["step"] += 3


def edit_step_past_the_run(ckpt):
    ckpt["step"], ckpt["data"], ckpt["scheduler"]["last_epoch"] = 400, {"epoch": 25, "pos": 256}, 400


def edit_shape(ckpt):
    ckpt["model"]["query.lora_A"] = torch.zeros(1, 1)


@pytest.mark.parametrize("edit, match", [(edit_missing_tensor, "does not fit this model"),
                                         (edit_extra_tensor, "which this model does not train"),
                                         (edit_step, "does not match its step 23"),
                                         (edit_step_past_the_run, "outside this run's 0..40"),
                                         (edit_shape, "query.lora_A has shape")])
def test_an_edited_checkpoint_is_refused(tmp_path, edit, match):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, method="srlora", save_every=20, fail_at=25)
    path = folder(tmp_path, "srlora") / "ckpt" / "srlora" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    edit(ckpt)
    torch.save(ckpt, path)
    (path.parent / "best.pt").unlink()                     # no fallback: the edited file must be refused
    with pytest.raises(UserError, match=match):
        run(tmp_path, method="srlora", save_every=20, resume=str(folder(tmp_path, "srlora")))


# --- slow: real processes racing for one run folder (finding 3) -----------------------------

TOY = "import sys; from harness.config import cli; import tests.helpers as t; cli(lambda argv: t.toy_main(argv) and 0)"


def toy_process(*flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", TOY, *flags], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_two_runs_started_together_on_one_name_one_runs_and_the_other_is_refused(tmp_path):
    flags = (f"--out_dir={tmp_path}", "--name=same", "--method=srlora", "--max_steps=100", "--save_every=1")
    procs = [toy_process(*flags) for _ in range(2)]
    done = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in done) == [0, 2], done
    err = next(e for code, e in done if code == 2)
    assert err.count("\n") == 1 and ("in use by another process" in err or "already holds" in err), err
    ckpt = torch.load(tmp_path / "same" / "ckpt" / "srlora" / "last.pt", weights_only=False)
    assert ckpt["step"] == 100 and len(json.loads((tmp_path / "same" / "metrics.json").read_text())) == 1


@pytest.mark.slow
def test_a_resume_while_the_run_writes_is_refused_and_a_kill_leaves_a_loadable_checkpoint(tmp_path):
    # The race that corrupted last.pt: a run checkpointing every step, and a --resume of its folder.
    flags = (f"--out_dir={tmp_path}", "--name=busy", "--method=srlora", "--max_steps=3000", "--save_every=1")
    writer, last = toy_process(*flags), tmp_path / "busy" / "ckpt" / "srlora" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:
        time.sleep(0.05)
    second = toy_process(*flags, f"--resume={tmp_path / 'busy'}")
    code, err = second.wait(timeout=120), second.stderr.read()
    assert code == 2 and err.count("\n") == 1 and "in use by another process" in err, err
    writer.send_signal(signal.SIGKILL)                      # mid-write, most likely: it writes every step
    writer.wait(timeout=60)
    step = torch.load(last, weights_only=False)["step"]
    assert 0 < step < 3000 and len(list(last.parent.glob("*.tmp"))) <= 1   # at most the killed write's temporary
