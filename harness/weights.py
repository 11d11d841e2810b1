"""Weights files: a state dict from .safetensors (read by its format, with no dependency) or from
a torch .pth / .bin / .pt file, and a one-line UserError for a missing or corrupt one."""
import json
import os
import struct

import torch

from harness.errors import UserError


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    """A .safetensors file: 8 bytes little-endian header length, a JSON header, raw tensor bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise UserError(f"{path}: corrupt safetensors file (header length {n} exceeds the file size)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path}: corrupt safetensors file (its header is not JSON)") from None
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        start, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if dtype is None or end > len(data) or end - start != numel * dtype.itemsize:
            raise UserError(f"{path}: corrupt safetensors file (tensor {name!r} is truncated or of unknown dtype)")
        raw = bytearray(data[start:end])
        tensors[name] = (torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)).reshape(info["shape"])
    return tensors


def read_weights(path) -> dict:
    """A state dict from .safetensors, or from a torch .pth / .bin / .pt file."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist; pass an existing .safetensors, .pth or .bin file")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read it as a torch checkpoint ({type(e).__name__}); the file is corrupt or not a state dict") from None
    for key in ("state_dict", "model"):                    # common wrappers around the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state
