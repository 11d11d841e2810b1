"""What several test files share: the repo root, a toy run of the harness, the tiny BERT
vocabulary and config, a tiny ViT in timm names, a small residual net for FSDP, and the SRLoRA
training and comparison helpers of the export tests."""
import dataclasses
import json
import math
import struct
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import vit
from harness.config import TrainConfig, parse_config
from harness.loop import run_methods
from srlora import ImportanceTracker, recompose, switch_steps

ROOT = Path(__file__).resolve().parents[1]              # the repo root: the scripts run from there


# --- a toy run of the harness: a model that trains in seconds ------------------------------

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


def toy_main(argv):
    """The toy run as a script, for the multi-process test: python -c 'import tests.helpers as t; t.toy_main(...)'."""
    cfg = parse_config(ToyConfig, argv)
    return run_methods(cfg, task="toy", build=lambda method: Toy(), n_train=len(X),
                       make_batch=lambda idx: (X[idx], Y[idx]),
                       loss_fn=lambda model, b: F.cross_entropy(model(b[0]), b[1]),
                       evaluate=lambda model, device: (F.cross_entropy(model(X[:64]), Y[:64]).item(), {}))


# --- the tiny BERT of the train_glue.py and harness/bert.py tests ---------------------------

POS, NEG = ["good", "great", "fun", "lovely"], ["bad", "dull", "awful", "boring"]
FILL = ["the", "movie", "was", "a", "plot", "and", "very", "it", "'", "s"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", '"', *POS, *NEG, *FILL]


TINY_CONFIG = dict(model_type="bert", vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=32, max_position_embeddings=32, type_vocab_size=2)


# --- a tiny ViT in timm names, and its weights under Hugging Face names ----------------------

TINY = vit.ViTConfig(patch_size=4, dim=32, depth=2, heads=2, mlp_dim=64, grid=3, layer_scale=True, num_classes=5)


def random_state(cfg, seed=0):
    """A timm-named state dict with every entry random (no zero biases, no unit norms)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in vit.ViT(cfg).state_dict().items()}


def to_hf(state, prefix="vit."):
    """The same weights under Hugging Face names: ViT (layernorm_before, intermediate.dense, ...)
    or, when the blocks have layer scale, DINOv2 (norm1, mlp.fc1, layer_scale1.lambda1, ...)."""
    dinov2 = "blocks.0.ls1.gamma" in state
    e = prefix + "embeddings."
    out = {e + "cls_token": state["cls_token"], e + "position_embeddings": state["pos_embed"],
           prefix + "layernorm.weight": state["norm.weight"], prefix + "layernorm.bias": state["norm.bias"],
           "classifier.weight": state["head.weight"], "classifier.bias": state["head.bias"]}
    if dinov2:
        out[e + "mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    else:
        out[prefix + "pooler.dense.weight"] = torch.eye(state["cls_token"].shape[-1])
    for p in ("weight", "bias"):
        out[e + f"patch_embeddings.projection.{p}"] = state[f"patch_embed.proj.{p}"]
    n = 0
    while f"blocks.{n}.attn.qkv.weight" in state:
        src, dst = f"blocks.{n}.", f"{prefix}encoder.layer.{n}."
        names = ({"norm1": "norm1", "attn.proj": "attention.output.dense", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
                  "mlp.fc2": "mlp.fc2"} if dinov2 else
                 {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
                  "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"})
        for p in ("weight", "bias"):
            for t, part in zip(("query", "key", "value"), state[src + f"attn.qkv.{p}"].chunk(3)):
                out[dst + f"attention.attention.{t}.{p}"] = part
            for ours, theirs in names.items():
                out[dst + f"{theirs}.{p}"] = state[src + f"{ours}.{p}"]
        if dinov2:
            out[dst + "layer_scale1.lambda1"] = state[src + "ls1.gamma"]
            out[dst + "layer_scale2.lambda1"] = state[src + "ls2.gamma"]
        n += 1
    return out


def write_safetensors(state, path, dtype_name="F32"):
    """A .safetensors file by its format: 8-byte little-endian header length, JSON header, raw bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, v in state.items():
        raw = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": dtype_name, "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


# --- a small residual net, whose blocks are the FSDP units -----------------------------------

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d + 1), nn.Linear(2 * d + 1, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    def __init__(self, d=11, n_blocks=2):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(n_blocks)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# --- SRLoRA training and output comparison (the export and model-family tests) ---------------

def load_tensors(path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, weights_only=True)


def adapter_file(folder):
    found = [p for p in folder.iterdir() if p.name in ("adapter_model.safetensors", "adapter_model.bin")]
    assert len(found) == 1
    return found[0]


def train(model, inputs, labels, forward, steps=4, r=4, r_target=8, gamma=0.5):
    """AdamW steps with importance tracking and the switch schedule; returns the recompose events and,
    for each switch, the eval-mode outputs (before, after) it."""
    tracker = ImportanceTracker(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
    switches = set(switch_steps(steps, r=r, r_target=r_target, gamma=gamma))
    events, around_switch = [], []
    for step in range(1, steps + 1):
        model.train()
        loss = F.cross_entropy(forward(model, inputs), labels)
        loss.backward()
        assert torch.isfinite(loss)
        tracker.update()
        opt.step()
        opt.zero_grad()
        if step in switches:
            model.eval()
            with torch.no_grad():
                before = forward(model, inputs)
                events += recompose(model, tracker, opt)
                around_switch.append((before, forward(model, inputs)))
    model.eval()
    return events, around_switch


def assert_same_outputs(a, b, tol=1e-5):
    """Equal to fp32 rounding: `tol` of the largest output (1e-5 is ~100 fp32 eps).  An absolute
    tolerance would be too loose here: the small random BERT and DeBERTa heads give logits of ~0.02."""
    torch.testing.assert_close(a, b, rtol=0, atol=tol * b.abs().max().item())


# --- a tiny man-page corpus, in the layout of Debian's manpages and manpages-pl -----------

FAR_PAGE = """.\\" a comment line
.TH CKSUM 1 "2022" "GNU coreutils"
.SH NAZWA
cksum \\- oblicza i sprawdza sumy kontrolne plik\\(oqw
.SH OPIS
Wypisanie lub zweryfikowanie sum kontrolnych.
Domy\\[sl]lnie u\\(.zywany jest \\fB32-bitowy\\fP algorytm CRC.
.TP
\\fB\\-a\\fR, \\fB\\-\\-algorithm\\fR=\\fITYP\\fR
wybranie funkcji skr\\('otu zdanie numer {i}.
"""
ENGLISH_PAGE = """.TH OPEN 2 2023-03-30 "Linux man-pages 6.03"
.SH NAME
open{i} \\- open and possibly create a file
.SH DESCRIPTION
The
.BR open ()
system call opens the file specified by
.IR pathname .
If the specified file does not exist, it may optionally be created.
"""


def write_man_pages(root: Path, n_far: int = 24, n_english: int = 6) -> tuple:
    """(far_dir, english_dir): gzipped roff pages in man1/ (Polish) and man2/ (English), plus a .so stub each."""
    import gzip
    far, english = root / "pl", root / "en"
    for d in (far / "man1", english / "man2"):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(n_far):
        (far / "man1" / f"cksum{i}.1.gz").write_bytes(gzip.compress(FAR_PAGE.format(i=i).encode()))
    for i in range(n_english):
        (english / "man2" / f"open{i}.2.gz").write_bytes(gzip.compress(ENGLISH_PAGE.format(i=i).encode()))
    (far / "man1" / "stub.1.gz").write_bytes(gzip.compress(b".so man1/cksum0.1\n"))
    (english / "man2" / "stub.2.gz").write_bytes(gzip.compress(b".so man2/open0.2\n"))
    return far, english


class ByteTokenizer:
    """A tokenizer with SmolLM2's interface as experiments/llm.py uses it: UTF-8 bytes as ids, eos 256."""
    eos_token_id = 256

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


def tiny_llama():
    """A 2-layer LlamaForCausalLM with random weights, vocab 257 (bytes and eos)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()
