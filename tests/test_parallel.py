"""Tests of harness/parallel.py: two gloo processes under DDP against one process, and the
choice of FSDP units."""
import json

import pytest
import torch
import torch.nn as nn

from harness.parallel import transformer_blocks
from srlora import apply_srlora
from tests.helpers import ROOT, Block, Net, folder


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["fixed", "adaptive"])   # adaptive: every rank must take the same decisions
def test_two_gloo_processes_agree_and_match_one_process(tmp_path, schedule):
    import os
    import socket
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = "import sys, tests.helpers as t; t.toy_main(sys.argv[1:])"
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


def test_the_fsdp_units_are_the_outermost_list_children_that_hold_srlora_layers():
    class Nested(nn.Module):                      # a block holding a list of its own, and an unadapted list
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict(dict(inner=nn.ModuleList([Block(5)]))) for _ in range(3)])
            self.plain = nn.ModuleList([nn.Linear(5, 5)])

    model = apply_srlora(Nested(), targets=("up",), r=2, r_target=4)
    assert transformer_blocks(model) == list(model.blocks)
    net = apply_srlora(Net(n_blocks=3), targets=("down",), r=2, r_target=4)
    assert transformer_blocks(net) == list(net.blocks)
