"""A BERT encoder, sequence classifier and WordPiece tokenizer in plain torch.

They load any Hugging Face BERT checkpoint folder (config.json, vocab.txt, and model.safetensors
or pytorch_model.bin), e.g. all-MiniLM-L6-v2 or bert-base-uncased, with no dependency beyond torch.

References:
  J. Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers" (2019): the model.
  Y. Wu et al., "Google's Neural Machine Translation System" (2016): WordPiece; the tokenizer
  follows the original BERT release (BasicTokenizer, then greedy longest-match WordPiece).

Module names mirror the Hugging Face checkpoints (`encoder.layer.0.attention.self.query`, ...),
so their keys load as they are and SRLoRA's targets ("query", "attention.output.dense",
"intermediate.dense", "output.dense", ...) name the same layers here as in transformers.
"""
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.errors import UserError, read_json, read_text
from harness.weights import read_weights


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"            # "gelu" is the exact erf form, as in transformers
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1                # hidden, attention and head dropout while training

    @classmethod
    def from_json(cls, path, dropout: float = 0.1):
        cfg = read_json(path)
        if cfg.get("model_type", "bert") != "bert":
            raise UserError(f"{path}: model_type={cfg['model_type']!r} is not BERT; this loader reads BERT "
                            f"checkpoints only, use --hf_model for other architectures")
        if cfg.get("position_embedding_type", "absolute") != "absolute" or \
                cfg.get("embedding_size", cfg.get("hidden_size")) != cfg.get("hidden_size"):
            raise UserError(f"{path}: relative positions or a factorised embedding are not plain BERT; "
                            f"use --hf_model for this checkpoint")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names and k != "dropout"}, dropout=dropout)


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu,
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


# -----------------------------------------------------------------------------
# model

class BertLayer(nn.Module):
    """One post-LayerNorm transformer block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        C = cfg.hidden_size
        if C % cfg.num_attention_heads:
            raise UserError(f"hidden_size={C} is not divisible by num_attention_heads={cfg.num_attention_heads}")
        self.n_head, self.dropout = cfg.num_attention_heads, cfg.dropout
        if cfg.hidden_act not in ACTIVATIONS:
            raise UserError(f"hidden_act={cfg.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[cfg.hidden_act]
        LN = lambda: nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        # Nested exactly like the checkpoint keys: attention.self.query, attention.output.dense, ...
        self.attention = nn.ModuleDict(dict(
            self=nn.ModuleDict(dict(query=nn.Linear(C, C), key=nn.Linear(C, C), value=nn.Linear(C, C))),
            output=nn.ModuleDict(dict(dense=nn.Linear(C, C), LayerNorm=LN()))))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(C, cfg.intermediate_size)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(cfg.intermediate_size, C), LayerNorm=LN()))

    def attend(self, x, mask):
        B, T, C = x.shape
        s = self.attention.self
        q, k, v = (f(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for f in (s.query, s.key, s.value))                             # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, C)                                  # (B, T, C)

    def forward(self, x, mask):
        drop = lambda t: F.dropout(t, self.dropout, self.training)
        out = self.attention.output
        x = out.LayerNorm(x + drop(out.dense(self.attend(x, mask))))
        h = self.act(self.intermediate.dense(x))                                   # (B, T, 4C)
        x = self.output.LayerNorm(x + drop(self.output.dense(h)))
        return x


class BertModel(nn.Module):
    """Token, position and segment embeddings, then the blocks; returns the last hidden states."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        C = cfg.hidden_size
        self.config = cfg
        self.embeddings = nn.ModuleDict(dict(
            word_embeddings=nn.Embedding(cfg.vocab_size, C),
            position_embeddings=nn.Embedding(cfg.max_position_embeddings, C),
            token_type_embeddings=nn.Embedding(cfg.type_vocab_size, C),
            LayerNorm=nn.LayerNorm(C, eps=cfg.layer_norm_eps)))
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))))

    def forward(self, input_ids, token_type_ids, attention_mask):
        B, T = input_ids.shape
        e = self.embeddings
        pos = torch.arange(T, device=input_ids.device)
        x = e.word_embeddings(input_ids) + e.position_embeddings(pos) + e.token_type_embeddings(token_type_ids)
        x = F.dropout(e.LayerNorm(x), self.config.dropout, self.training)          # (B, T, C)
        mask = attention_mask.bool()[:, None, None, :]                             # (B, 1, 1, T): keys that may be attended
        for block in self.encoder.layer:
            x = block(x, mask)
        return x


def mean_pool(hidden, attention_mask):
    """The average of the hidden states of the real (non-padding) tokens: (B, T, C) -> (B, C)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)                              # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class BertClassifier(nn.Module):
    """BERT, a pooled sentence vector ([CLS] or the mean of the tokens), dropout, a linear head.

    num_labels=1 gives one regression output (STS-B).  Unlike transformers' BertForSequenceClassification
    there is no tanh "pooler" layer: the head reads the [CLS] hidden state directly, because
    sentence-embedding checkpoints such as all-MiniLM-L6-v2 ship no trained pooler.
    """

    def __init__(self, cfg: BertConfig, num_labels: int, pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise UserError(f"pooling={pooling!r} is unknown; use cls or mean")
        self.pooling, self.dropout = pooling, cfg.dropout
        self.bert = BertModel(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)                          # BERT's initializer_range
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, token_type_ids, attention_mask):
        h = self.bert(input_ids, token_type_ids, attention_mask)                   # (B, T, C)
        pooled = h[:, 0] if self.pooling == "cls" else mean_pool(h, attention_mask)  # (B, C)
        return self.classifier(F.dropout(pooled, self.dropout, self.training))     # (B, num_labels)


# -----------------------------------------------------------------------------
# loading a checkpoint folder

IGNORED = ("pooler.", "cls.", "classifier.", "embeddings.position_ids")   # heads we replace, buffers we rebuild


def weights_file(model_dir) -> Path:
    model_dir = Path(model_dir)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return model_dir / name
    raise UserError(f"{model_dir} has neither model.safetensors nor pytorch_model.bin; point --model_dir "
                    f"at a Hugging Face BERT checkpoint folder")


def encoder_state(state: dict) -> dict:
    """Checkpoint keys -> BertModel keys: drop the `bert.` prefix, rename the old gamma/beta
    LayerNorm names, and leave out the pooler, pre-training heads and any old classifier."""
    out = {}
    for key, value in state.items():
        key = key[len("bert."):] if key.startswith("bert.") else key
        if key.startswith(IGNORED):
            continue
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = value
    return out


def load_classifier(model_dir, num_labels: int, pooling: str = "cls", dropout: float = 0.1,
                    state: dict = None) -> BertClassifier:
    """A BertClassifier with the pretrained encoder of `model_dir` and a fresh head (fp32, CPU).

    `state`, the checkpoint's weights as read by read_weights, saves re-reading the file when
    several models are built from one checkpoint."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} has no config.json; point --model_dir at a Hugging Face BERT checkpoint folder")
    cfg = BertConfig.from_json(model_dir / "config.json", dropout=dropout)
    model = BertClassifier(cfg, num_labels, pooling)
    weights = encoder_state(state if state is not None else read_weights(weights_file(model_dir)))
    expected = model.bert.state_dict()
    missing = [k for k in expected if k not in weights]
    if missing:
        raise UserError(f"{model_dir}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more BERT "
                        f"weights); it is not a BERT checkpoint, use --hf_model for it")
    for k, v in expected.items():
        if weights[k].shape != v.shape:
            raise UserError(f"{model_dir}: {k} has shape {tuple(weights[k].shape)} but config.json implies "
                            f"{tuple(v.shape)}; the config and the weights do not belong together")
        if v.is_floating_point() and not weights[k].is_floating_point():
            raise UserError(f"{model_dir}: {k} is stored as {weights[k].dtype}, not as floating point; "
                            f"the weights file is mislabelled")
    model.bert.load_state_dict({k: weights[k].float() for k in expected})
    return model


# -----------------------------------------------------------------------------
# tokenizer

# BERT counts every non-alphanumeric printable ASCII character as punctuation, although
# "$", "+", "<", "^", "`", "|", "~" are not in Unicode's P* categories.
_ASCII_PUNCT = frozenset(chr(c) for c in (*range(33, 48), *range(58, 65), *range(91, 97), *range(123, 127)))


def _is_punctuation(ch):
    return ch in _ASCII_PUNCT or (ch > "\x7f" and unicodedata.category(ch).startswith("P"))


def _is_cjk(cp):
    # The CJK Unified Ideographs blocks; Japanese kana and Korean hangul are written with spaces
    # or split by WordPiece, as in the original BERT.
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


# ASCII control characters: tab, newline and return become spaces, the rest are dropped.
_ASCII_CLEAN = {i: (" " if chr(i) in "\t\n\r" else None) for i in (*range(32), 127)}


def _clean(text):
    """Drop NUL, U+FFFD and control characters; turn every whitespace character into a space;
    put spaces around CJK characters so that each one becomes a word."""
    if text.isascii():                                                         # the common case, 20x faster
        return text.translate(_ASCII_CLEAN)
    out = []
    for ch in text:
        cp = ord(ch)
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return "".join(out)


class Tokenizer:
    """BERT's tokenizer: basic tokenization (clean, lower-case and strip accents, split on
    punctuation and around CJK characters), then greedy longest-match WordPiece."""

    def __init__(self, vocab: list, do_lower_case: bool = True, strip_accents: bool = None,
                 max_word_chars: int = 100):
        self.vocab = {tok: i for i, tok in reversed(list(enumerate(vocab)))}   # the first of duplicates wins
        self.inv_vocab = list(vocab)
        self.do_lower_case = do_lower_case
        self.strip_accents = do_lower_case if strip_accents is None else strip_accents   # transformers' rule
        self.max_word_chars = max_word_chars
        for tok in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"):
            if tok not in self.vocab:
                raise UserError(f"the vocabulary has no {tok} token; it is not a BERT vocab.txt")
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self._cache = {}                                                       # word -> ids; tweets repeat words a lot

    @classmethod
    def from_dir(cls, model_dir):
        model_dir = Path(model_dir)
        if not (model_dir / "vocab.txt").is_file():
            raise UserError(f"{model_dir} has no vocab.txt; point --model_dir at a Hugging Face BERT checkpoint folder")
        vocab = read_text(model_dir / "vocab.txt").split("\n")
        if vocab and vocab[-1] == "":
            vocab.pop()                                                        # the final newline
        options = {}
        if (model_dir / "tokenizer_config.json").is_file():
            options = read_json(model_dir / "tokenizer_config.json")
        return cls(vocab, do_lower_case=options.get("do_lower_case", True),
                   strip_accents=options.get("strip_accents"))

    def split_word(self, word: str) -> list:
        """One whitespace-separated word of cleaned text -> basic tokens: lower-cased, accents
        stripped (NFD, then drop the combining marks), every punctuation mark a token of its own."""
        if self.do_lower_case:
            word = word.lower()
        if self.strip_accents:
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        else:
            word = unicodedata.normalize("NFC", word)
        tokens, piece = [], ""
        for ch in word:
            if _is_punctuation(ch):
                tokens += [piece, ch] if piece else [ch]
                piece = ""
            else:
                piece += ch
        return tokens + [piece] if piece else tokens

    def wordpiece(self, word: str) -> list:
        """Greedy longest-match-first split into vocabulary pieces, continuations prefixed ##;
        a word with no such split, or longer than max_word_chars, is a single [UNK]."""
        if len(word) > self.max_word_chars:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return [self.unk_id]
            ids.append(self.vocab[piece])
            start = end
        return ids

    def ids(self, text: str) -> list:
        out = []
        for word in _clean(text).split():
            if word not in self._cache:                                        # basic tokens, then WordPiece
                self._cache[word] = [i for t in self.split_word(word) for i in self.wordpiece(t)]
            out += self._cache[word]
        return out

    def tokenize(self, text: str) -> list:
        return [self.inv_vocab[i] for i in self.ids(text)]

    def encode(self, a: str, b: str = None, max_len: int = 128):
        """(input_ids, token_type_ids) of [CLS] a [SEP] or [CLS] a [SEP] b [SEP], at most max_len long.

        A pair is truncated longest-first, as transformers' tokenizers do: if the shorter text fits
        in half the budget it stays whole and the longer one is cut to the rest; otherwise both are
        cut to half, the odd token going to the longer one (to b when they tie).
        """
        ta, tb = self.ids(a), self.ids(b) if b is not None else None
        if tb is None:
            ta = ta[:max(0, max_len - 2)]
            return [self.cls_id] + ta + [self.sep_id], [0] * (len(ta) + 2)
        budget = max(0, max_len - 3)                                           # room left by [CLS] and two [SEP]
        if len(ta) + len(tb) > budget:
            half = budget // 2
            if min(len(ta), len(tb)) <= half:
                na = len(ta) if len(ta) <= len(tb) else budget - len(tb)
            else:
                na = half + budget % 2 if len(ta) > len(tb) else half
            ta, tb = ta[:na], tb[:budget - na]
        ids = [self.cls_id] + ta + [self.sep_id] + tb + [self.sep_id]
        return ids, [0] * (len(ta) + 2) + [1] * (len(tb) + 1)


def pad_batch(encoded: list, pad_id: int = 0) -> dict:
    """[(input_ids, token_type_ids), ...] -> a dict of (B, T) tensors padded to the longest, with attention_mask."""
    T = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(encoded), T), dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for i, (ids, types) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        token_type_ids[i, :len(ids)] = torch.tensor(types)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
