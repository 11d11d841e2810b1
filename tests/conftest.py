"""Fixtures that several test files share.  The root conftest.py pins torch to one thread."""
import json
import struct

import pytest
import torch

from harness.bert import BertClassifier, BertConfig
from tests.helpers import TINY_CONFIG, WORDS


def write_safetensors(state, path):
    """The safetensors layout: 8-byte little-endian header length, JSON header, raw fp32 bytes."""
    header, blobs, offset = {}, [], 0
    for key, t in state.items():
        blob = t.detach().float().contiguous().numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT checkpoint folder: config.json, vocab.txt and model.safetensors."""
    model = tmp_path_factory.mktemp("tiny_bert")
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    (model / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.manual_seed(0)
    bert = BertClassifier(BertConfig.from_json(model / "config.json"), num_labels=2).bert
    with torch.no_grad():                 # unit-variance weights, so that the [CLS] vector depends on the words
        for name, p in bert.named_parameters():
            if name.endswith("weight") and "LayerNorm" not in name:
                p.normal_(0, 1.0)
            elif not name.endswith("weight"):
                p.zero_()
    write_safetensors(bert.state_dict(), model / "model.safetensors")
    return model
