"""experiments/llm.py and llm_data.py: the man-page text, the fixed split, the token blocks, the
effective rank of dW, and one end-to-end run on a tiny Llama (the real SmolLM2 and the Debian
packages are not needed)."""
import json
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.helpers import ROOT, ByteTokenizer, tiny_llama, write_man_pages

sys.path.insert(0, str(ROOT / "experiments"))
import llm  # noqa: E402
import llm_data  # noqa: E402


def test_roff_to_text_fills_lines_keeps_text_macros_and_resolves_escapes():
    text = llm_data.roff_to_text(
        '.\\" comment\n.TH X 1\n.SH OPIS\nPierwsza\nlinia \\fBgruba\\fP\\-dalej.\n.PP\n.BR open () "x"\nkoniec\\(em\n')
    assert text.splitlines() == ["OPIS Pierwsza linia gruba-dalej.", "open () x koniec\u2014"]   # a title runs on


def test_a_so_stub_has_no_text():
    assert llm_data.roff_to_text(".so man2/open.2\n") == ""


@given(st.lists(st.text("abcdefgh.123", min_size=1, max_size=8), min_size=1, max_size=40, unique=True))
def test_split_by_page_is_disjoint_complete_and_fixed(names):
    pages = {n: f"text of {n}" for n in names}
    train, held = llm_data.split_pages(pages)
    assert sorted(train + held) == sorted(pages.values())
    assert not set(train) & set(held)
    assert llm_data.split_pages(dict(reversed(list(pages.items())))) == (train[::-1], held[::-1])


@settings(deadline=None)
@given(st.lists(st.lists(st.integers(0, 9), max_size=30), max_size=8), st.integers(2, 16), st.integers(0, 5))
def test_blocks_are_full_length_and_cut_the_stream_in_order(docs, block, limit):
    texts = [" ".join(map(str, d)) for d in docs]
    encode = lambda t: [int(x) for x in t.split()]                                    # noqa: E731
    out = llm_data.blocks(texts, encode, block, eos=99, limit=limit)
    stream = [i for d in docs for i in d + [99]]
    n = len(stream) // block if not limit else min(limit, len(stream) // block)
    assert out == [stream[k * block:(k + 1) * block] for k in range(n)]


def test_english_pages_leave_out_every_stem_of_the_far_corpus():
    english = {"open.2": "a", "close.2": "b", "read.2": "c"}
    assert llm_data.english_pages(english, {"open.2": "x", "read.3.pl": "y"}) == ["b"]


@given(st.integers(1, 6), st.integers(0, 1000))
def test_effective_rank_of_k_equal_singular_values_is_k(k, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(12, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(9, k, generator=g)).Q
    assert llm.effective_rank(3.0 * U @ V.T) == pytest.approx(k, rel=1e-4)
    assert llm.effective_rank(torch.zeros(5, 4)) == 0.0


def test_a_run_logs_both_perplexities_the_switches_and_the_rank_of_dw(tmp_path, monkeypatch):
    far, english = write_man_pages(tmp_path / "man")
    import harness.smollm2
    monkeypatch.setattr(harness.smollm2, "load_smollm2", lambda folder=None: (tiny_llama(), ByteTokenizer()))
    argv = ["--method=srlora", "--r=2", "--alpha=2", "--r_target=4", "--max_steps=4", "--warmup=1", "--eval_every=2",
            "--log_every=1", "--batch_size=2", "--block=16", "--eval_blocks=3", f"--far_dir={far}",
            f"--english_dir={english}", f"--out_dir={tmp_path / 'runs'}", "--name=t", "--plots=false"]
    llm.main(argv)
    records = [json.loads(line) for line in (tmp_path / "runs" / "t" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(set(e["dev"]) >= {"ppl", "ppl_english", "dw_erank"} and e["dev"]["dw_erank"] > 0 for e in evals)
    assert {r["step"] for r in records if r["event"] == "switch"} == {2, 4}          # (4 - 2) // 1 = 2 switches
    metrics = json.loads((tmp_path / "runs" / "t" / "metrics.json").read_text())
    maps = [m for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(maps) == 2 * 7                                                         # all seven maps of both blocks
    assert metrics[0]["params"]["adapter"] == sum(2 * (m.in_features + m.out_features) for m in maps)


def test_missing_man_pages_are_one_line_that_names_the_packages(tmp_path, monkeypatch):
    import harness.smollm2
    from harness.errors import UserError
    monkeypatch.setattr(harness.smollm2, "load_smollm2", lambda folder=None: (tiny_llama(), ByteTokenizer()))
    with pytest.raises(UserError, match="apt-get install manpages manpages-pl"):
        llm.main([f"--far_dir={tmp_path}", f"--english_dir={tmp_path}", f"--out_dir={tmp_path}"])


@given(st.floats(30, 50), st.floats(1, 10), st.floats(-0.5, 1.5))
def test_gap_closed_is_0_at_lora_r_and_1_at_lora_r_target(low, gap, frac):
    from stats import gap_closed
    row = lambda ppl: {"seeds": [0], "ppl": [ppl]}                                     # noqa: E731
    rows = {"lora": row(low), "lora-rt": row(low - gap), "srlora": row(low - frac * gap)}
    assert gap_closed(rows) == [pytest.approx(frac, abs=1e-9)]
    assert gap_closed({"lora": row(low), "srlora": row(low)}) == []                    # no LoRA(r_target): no fraction
