"""Weights files: a state dict from .safetensors (read by its format, with no dependency, and
checked as the safetensors library checks it) or from a torch .pth / .bin / .pt file, the loop's
own checkpoints read without running code, and a one-line UserError for a missing, corrupt or
non-finite one."""
import json
import os
import pickle
import re
import struct

import numpy as np
import torch

from harness.errors import UserError


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
HEADER_MAX = 100_000_000          # the safetensors library's limit on the JSON header, in bytes


def _header_entries(header, path):
    """[(name, dtype, shape, start, end)] from a parsed header, each field checked for its type."""
    def corrupt(why):
        return UserError(f"{path}: corrupt safetensors file ({why})")
    if not isinstance(header, dict):
        raise corrupt(f"its header is a JSON {type(header).__name__}, not an object")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise corrupt("__metadata__ is not an object of strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise corrupt(f"tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise corrupt(f"tensor {name!r} has dtype {dtype!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise corrupt(f"tensor {name!r} has shape {shape!r}, not a list of sizes >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
            raise corrupt(f"tensor {name!r} has data_offsets {offsets!r}, not two byte offsets >= 0")
        entries.append((name, SAFETENSORS_DTYPES[dtype], shape, *offsets))
    return entries


def read_safetensors(path) -> dict:
    """A .safetensors file: 8 bytes little-endian header length, a JSON header, raw tensor bytes.

    Checked as the safetensors library checks it: the header is a JSON object whose every tensor
    has a known dtype, a shape of sizes and two offsets; sorted by offset, the tensors tile the
    data section exactly, from byte 0 to its end, with no gap and no overlap, and each spans
    shape x dtype size bytes.  So no tensor reads another's bytes, or bytes that are not there."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > HEADER_MAX:
            raise UserError(f"{path}: corrupt safetensors file (header length {n} exceeds the file size)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except ValueError:                                  # UnicodeDecodeError is a ValueError too
            raise UserError(f"{path}: corrupt safetensors file (its header is not JSON)") from None
        data = f.read()
    tensors, end_of_last = {}, 0
    for name, dtype, shape, start, end in sorted(_header_entries(header, path), key=lambda e: (e[3], e[4])):
        numel = 1
        for d in shape:
            numel *= d
        if start != end_of_last:
            raise UserError(f"{path}: corrupt safetensors file (tensor {name!r} starts at byte {start}, not at "
                            f"{end_of_last} where the previous one ends: the offsets overlap or leave a gap)")
        if end < start or end - start != numel * dtype.itemsize:
            raise UserError(f"{path}: corrupt safetensors file (tensor {name!r} spans {end - start} bytes, but "
                            f"shape {shape} of {dtype} needs {numel * dtype.itemsize})")
        if end > len(data):
            raise UserError(f"{path}: corrupt safetensors file (tensor {name!r} is truncated: it ends at byte "
                            f"{end} of a {len(data)}-byte data section)")
        end_of_last = end
        raw = bytearray(data[start:end])
        tensors[name] = (torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)).reshape(shape)
    if end_of_last != len(data):
        raise UserError(f"{path}: corrupt safetensors file (its tensors cover {end_of_last} of the {len(data)} "
                        f"bytes of its data section)")
    return tensors


def check_finite(state: dict, source):
    """Refuse weights holding NaN or inf, naming the first such tensor: the SVD of PiSSA / SRLoRA
    would fail on them (LinAlgError), and plain LoRA would train on garbage."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{source}: tensor {name!r} holds {bad} NaN or inf value{'s' * (bad > 1)}; "
                            f"the weights are damaged, use an intact copy")


def read_weights(path) -> dict:
    """A state dict from .safetensors, or from a torch .pth / .bin / .pt file; every float finite."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist; pass an existing .safetensors, .pth or .bin file")
    if path.endswith(".safetensors"):
        state = read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path}: cannot read it as a torch checkpoint ({type(e).__name__}); the file is corrupt "
                            f"or not a state dict") from None
        for key in ("state_dict", "model"):                # common wrappers around the state dict
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict")
    check_finite(state, path)
    return state


# The only objects in the loop's checkpoints besides tensors, numbers, strings and containers:
# numpy's RNG state, a uint32 array (np.random.get_state).  Allowed by name, under numpy 2's
# module and numpy 1's, so that torch.load(weights_only=True) reads them and nothing else.
_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
CHECKPOINT_GLOBALS = [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
                      type(np.dtype(np.uint32))]


def read_checkpoint(path, map_location=None) -> dict:
    """A checkpoint that the loop wrote (last.pt, best.pt, loop.pt), read with weights_only=True: a
    pickle that would call anything else (run code) is refused.  A UserError says why it fails."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if not found:
            raise UserError(f"{path}: unreadable (not a torch checkpoint); the file is damaged") from None
        raise UserError(f"{path}: holds objects other than tensors and the RNG state ({found.group(1)}); "
                        f"refusing to load it, since unpickling it could run code") from None
    except Exception as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"the file is damaged") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a checkpoint")
    return state
