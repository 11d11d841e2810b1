"""Tests of harness/weights.py: the safetensors reader against the safetensors library on files
that lie, finite weights, and the loop's checkpoints read without running code."""
import json
import struct

import pytest
import torch

from harness.errors import UserError
from harness.weights import read_checkpoint, read_safetensors, read_weights
from tests.helpers import write_safetensors

safetensors_torch = pytest.importorskip("safetensors.torch")

A, B = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor([1.5, -2.0], dtype=torch.float32)


def layout(header, data):
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text)) + text + data


def valid():
    """(header, data) of a file holding A (24 bytes at 0) and B (8 bytes at 24)."""
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}
    return header, A.numpy().tobytes() + B.numpy().tobytes()


def crafted(change):
    header, data = valid()
    out = change(header, data)
    return layout(*out) if isinstance(out, tuple) else layout(header, data) if out is None else out


def set_entry(name, key, value):
    def change(header, data):
        header[name][key] = value
    return change


LIES = {
    "negative offset": set_entry("a", "data_offsets", [-8, 16]),
    "a tensor aliasing another": set_entry("b", "data_offsets", [0, 8]),
    "offsets shifted by 4 bytes": lambda h, d: (h["a"].update(data_offsets=[4, 28]), h["b"].update(data_offsets=[28, 36]),
                                                (h, d + b"\0" * 4))[-1],
    "a gap between tensors": lambda h, d: (h["b"].update(data_offsets=[28, 36]), (h, d + b"\0" * 4))[-1],
    "bytes after the last tensor": lambda h, d: (h, d + b"\0" * 8),
    "truncated data": lambda h, d: (h, d[:28]),
    "shape larger than its bytes": set_entry("a", "shape", [3, 3]),
    "F32 relabelled F64": set_entry("a", "dtype", "F64"),
    "unknown dtype": set_entry("a", "dtype", "F33"),
    "negative shape": set_entry("b", "shape", [-2]),
    "string offsets": set_entry("a", "data_offsets", ["0", "24"]),
    "three offsets": set_entry("a", "data_offsets", [0, 12, 24]),
    "missing data_offsets": lambda h, d: h["a"].pop("data_offsets") and None,
    "a float shape": set_entry("b", "shape", [2.0]),
    "an entry that is a list": lambda h, d: h.update(a=[0, 24]),
    "a JSON list header": lambda h, d: (["a"], d),
    "a header that is not UTF-8": lambda h, d: layout(b'{"a\xff": 1}', d),
    "a header longer than the file": lambda h, d: struct.pack("<Q", 10 ** 6) + b"{}",
    "metadata that is not strings": lambda h, d: h.update(__metadata__={"format": 1}),
}


@pytest.mark.parametrize("case", list(LIES))
def test_what_the_safetensors_library_rejects_we_reject_with_one_line(tmp_path, case):
    path = tmp_path / "w.safetensors"
    path.write_bytes(crafted(LIES[case]))
    with pytest.raises(Exception):                        # each of these files lies: the library refuses it
        safetensors_torch.load_file(str(path))
    with pytest.raises(UserError, match="corrupt safetensors file") as e:
        read_safetensors(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_an_honest_file_reads_as_the_library_reads_it_in_any_order(tmp_path):
    path = tmp_path / "w.safetensors"
    header, data = valid()
    header = {"b": header["b"], "a": header["a"], "empty": {"dtype": "I64", "shape": [0, 4], "data_offsets": [32, 32]}}
    path.write_bytes(layout(header, data))
    ours, theirs = read_safetensors(path), safetensors_torch.load_file(str(path))
    assert set(ours) == set(theirs) == {"a", "b", "empty"}
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_weights_with_nan_or_inf_are_refused_naming_the_tensor(tmp_path):
    for value in (float("nan"), float("inf")):
        write_safetensors({"ok": torch.ones(2), "w": torch.tensor([1.0, value])}, tmp_path / "w.safetensors")
        torch.save({"w": torch.tensor([value])}, tmp_path / "w.pth")
        for name in ("w.safetensors", "w.pth"):
            with pytest.raises(UserError, match=r"tensor 'w' holds 1 NaN or inf value;"):
                read_weights(tmp_path / name)


def test_a_checkpoint_of_tensors_and_the_rng_state_reads_and_anything_else_is_refused(tmp_path):
    from harness.schedule import rng_state
    torch.save({"step": 3, "rng": rng_state(), "w": torch.ones(2)}, tmp_path / "ok.pt")
    assert read_checkpoint(tmp_path / "ok.pt")["step"] == 3
    torch.save({"f": print}, tmp_path / "code.pt")
    with pytest.raises(UserError, match=r"\(\S*print\); refusing to load it"):
        read_checkpoint(tmp_path / "code.pt")
