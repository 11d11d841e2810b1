"""Tests of harness/rundir.py: atomic writes, and a run folder that is neither replaced nor
resumed by mistake, on the toy run of tests/helpers.py."""
import json

import pytest
import torch

from harness.errors import UserError
from harness.rundir import save_atomic
from tests.helpers import folder, run


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
