"""Tests of train_glue.py: the six GLUE file formats, the metrics, and the script end to end on
a tiny random BERT checkpoint: bad input, kill-and-resume, and torchrun."""
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_glue
from harness.config import parse_config, print_help
from harness.errors import UserError
from harness.schedule import warmup_warning
from tests.helpers import FILL, NEG, POS, ROOT, TINY_CONFIG, WORDS
from train_glue import accuracy, f1, matthews, pearson, ranks, read_glue, spearman, task_metrics


# -----------------------------------------------------------------------------
# GLUE files: each of the six formats, written as the real downloads are

def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_sst2_keeps_quotes_and_tolerates_trailing_whitespace_and_no_final_newline(tmp_path):
    f = write(tmp_path / "train.tsv",
              'sentence\tlabel\n'
              '"the movie" is good , he said " really \t1   \n'       # quotes a csv reader would eat
              "it 's a charming and often affecting journey . \t1\n"
              '\n'                                                    # a blank line
              'unflinchingly bleak and "desperate\t0')                # no final newline
    assert read_glue(f, "sst2") == [('"the movie" is good , he said " really', None, 1),
                                    ("it 's a charming and often affecting journey .", None, 1),
                                    ('unflinchingly bleak and "desperate', None, 0)]


def test_cola_has_no_header_and_four_columns_with_an_empty_third(tmp_path):
    f = write(tmp_path / "train.tsv",
              "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
              "gj04\t0\t*\tOne more pseudo generalization and I'm giving up.\n")
    assert read_glue(f, "cola") == [
        ("Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
        ("One more pseudo generalization and I'm giving up.", None, 0)]


def test_mrpc_starts_with_a_byte_order_mark_and_may_have_crlf_line_ends(tmp_path):
    f = write(tmp_path / "dev.tsv",
              "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
              '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness " .\t'
              'Referring to him as only " the witness " , Amrozi accused his brother .\r\n'
              "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .")
    assert read_glue(f, "mrpc") == [
        ('Amrozi accused his brother , whom he called " the witness " .',
         'Referring to him as only " the witness " , Amrozi accused his brother .', 1),
        ("Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's in 1995 .", 0)]


def test_qnli_and_rte_map_entailment_to_0_and_not_entailment_to_1(tmp_path):
    q = write(tmp_path / "qnli.tsv",
              "index\tquestion\tsentence\tlabel\n"
              "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it, it was darker.\tnot_entailment\n"
              '1\tWhat is "Yatra"?\tA yatra is a pilgrimage.\tentailment\n')
    r = write(tmp_path / "rte.tsv",
              "index\tsentence1\tsentence2\tlabel\n"
              "0\tDana Reeve, the widow of the actor, died.\tChristopher Reeve had an accident.\tnot_entailment\n"
              "1\tYet, we now are discovering that antibiotics are losing their effectiveness.\t"
              "Bacteria is winning the war against antibiotics.\tentailment  ")
    assert read_glue(q, "qnli") == [
        ("When did the third Digimon series begin?", "Unlike the two seasons before it, it was darker.", 1),
        ('What is "Yatra"?', "A yatra is a pilgrimage.", 0)]
    assert [y for _, _, y in read_glue(r, "rte")] == [1, 0]
    assert read_glue(r, "rte")[1][1] == "Bacteria is winning the war against antibiotics."


def test_stsb_reads_ten_columns_and_a_float_score(tmp_path):
    f = write(tmp_path / "dev.tsv",
              "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
              "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\t"
              "A man wearing a hard hat is dancing.\t5.000\n"
              '1\tmain-news\theadlines\t2013\t0001\tnone\tnone\t"Obama" wins\tObama loses\t0.4\t\n')
    rows = read_glue(f, "stsb")
    assert rows == [("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0),
                    ('"Obama" wins', "Obama loses", 0.4)]
    assert all(isinstance(y, float) for _, _, y in rows)


@pytest.mark.parametrize("task, text, match", [
    ("sst2", "sentence\tlabel\ngood\t1\nbad\t0\tx\nfine\t1\n", r"train\.tsv:3: expected 2 tab-separated fields, found 3"),
    ("cola", "gj04\t1\t\tfine.\ngj04\t1\tno sentence\n", r"train\.tsv:2: expected 4 tab-separated fields, found 3"),
    ("sst2", "sentence\tlabel\ngood\t1\nbad\tnegative\n", r"train\.tsv:3: label 'negative' is not one of 0, 1"),
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n", r"train\.tsv:2: label 'neutral'"),
    ("stsb", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
             "0\tg\tf\ty\to\ts\ts\ta\tb\t7.5\n", r"train\.tsv:2: score '7\.5' is not a number in \[0, 5\]"),
    ("stsb", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
             "0\tg\tf\ty\to\ts\ts\ta\tb\thigh\n", r"train\.tsv:2: score 'high'"),
    ("sst2", "", r"train\.tsv is empty"),
    ("sst2", "sentence\tlabel\n\n", r"train\.tsv holds no examples"),
    ("cola", "\n", r"train\.tsv holds no examples"),
    ("rte", "sentence\tlabel\ngood\t1\n", r"train\.tsv: the header has no column 'sentence1'"),
])
def test_bad_files_raise_one_line_errors_naming_the_file_and_line(tmp_path, task, text, match):
    f = write(tmp_path / "train.tsv", text)
    with pytest.raises(UserError, match=match) as e:
        read_glue(f, task)
    assert "\n" not in str(e.value) and str(f) in str(e.value)


def test_a_missing_file_names_the_expected_folder(tmp_path):
    with pytest.raises(UserError, match=r"does not exist; --data_dir must be one GLUE task folder.*glue_data/STS-B"):
        read_glue(tmp_path / "train.tsv", "stsb")


def test_accuracy_f1_and_matthews_on_a_hand_computed_case():
    pred, y = [1, 1, 0, 1, 0], [1, 0, 0, 1, 1]
    # TP = 2 (items 0, 3), FP = 1 (item 1), TN = 1 (item 2), FN = 1 (item 4)
    assert accuracy(pred, y) == 3 / 5                                 # (TP + TN) / 5
    assert f1(pred, y) == pytest.approx(2 / 3)                        # 2*2 / (2*2 + 1 + 1)
    assert matthews(pred, y) == pytest.approx(1 / 6)                  # (2*1 - 1*1) / sqrt(3*3*2*2)
    assert matthews(y, y) == pytest.approx(1.0) and matthews([1 - v for v in y], y) == pytest.approx(-1.0)
    assert matthews([1] * 5, y) == 0.0                                # TN + FN = 0: a zero factor, defined as 0
    assert f1([0] * 5, [0] * 5) == 0.0                                # no positives anywhere


def test_pearson_and_spearman_with_ties_on_hand_computed_cases():
    # x - mean = (-1.5, -.5, .5, 1.5), y - mean = (-3, -1, 0, 4):  sum of products 11,
    # sums of squares 5 and 26, so r = 11 / sqrt(130)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    # Tied values share the mean of their ranks: 5 -> 1, 10 -> 2, the three 20s -> (3+4+5)/3 = 4.
    assert ranks([10, 20, 20, 20, 5]).tolist() == [2, 4, 4, 4, 1]
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): deviations (-1.5, 0, 0, 1.5) and (-1.5, .5, -.5, 1.5),
    # sum of products 4.5, sums of squares 4.5 and 5, so rho = 4.5 / sqrt(22.5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)    # any increasing map
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0                            # a constant: defined as 0


def test_task_metrics_follow_the_paper_per_task():
    out = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])      # argmax: 0, 1, 0, 1
    y = np.array([0, 1, 1, 1])
    assert task_metrics("sst2", out, y) == {"accuracy": 0.75}
    assert task_metrics("mrpc", out, y) == {"f1": pytest.approx(0.8), "accuracy": 0.75}   # 2*2 / (4 + 0 + 1)
    assert task_metrics("cola", out, y) == {"matthews": pytest.approx(1 / math.sqrt(3))}  # (2*1 - 0) / sqrt(2*3*1*2)
    scores = np.array([[1.0], [2.0], [3.0], [4.0]])
    assert task_metrics("stsb", scores, np.array([2.0, 4.0, 5.0, 9.0])) == {
        "pearson": pytest.approx(11 / math.sqrt(130)), "spearman": pytest.approx(1.0)}


# -----------------------------------------------------------------------------
# train_glue.py end to end on a tiny random BERT checkpoint and a tiny SST-2 folder

def sst2_rows(n, rng):
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILL, 4) + [rng.choice(POS if label else NEG)]
        rng.shuffle(words)
        rows.append((" ".join(words) + (' , "really" .' if i % 3 == 0 else " ."), label))
    return rows


def write_sst2(folder, n_train=48, n_dev=16):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        write(folder / name, "sentence\tlabel\n" + "\n".join(f"{s} \t{y}" for s, y in sst2_rows(n, rng)))
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_bert):
    """The tiny BERT checkpoint of conftest.py, a tiny SST-2 folder, and one finished srlora run on them."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_bert
    data = write_sst2(root / "SST-2")
    run = script(*args(data, model, root / "runs", "prev"))
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(root=root, model=model, data=data, prev=root / "runs" / "prev")


def args(data, model, out_dir, name, **flags):
    """The tiny run's flags: 24 steps of srlora, r 2 -> r_target 8, so it switches at steps 4, 8, ..., 24."""
    flags = {"task": "sst2", "data_dir": data, "model_dir": model, "method": "srlora", "max_steps": 24,
             "eval_every": 8, "save_every": 4, "log_every": 1, "batch_size": 8, "r": 2, "r_target": 8,
             "warmup": 2, "lr": 3e-2, "max_len": 16, "plots": "false", "out_dir": out_dir, "name": name, **flags}
    return [f"--{k}={v}" for k, v in flags.items() if v is not None]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def script(*argv, timeout=120, env=ENV):
    """python train_glue.py *argv, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "train_glue.py"), *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder):
    """{path: sha256 of its bytes, or "dir"} for everything under folder but the lock files, which
    hold the pid of the last process that locked the run (a refused --resume locks it to read it)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(folder).rglob("*")) if p.name != ".lock"}


def test_the_tiny_run_switches_checkpoints_and_writes_its_outputs(tiny):
    prev = tiny["prev"]
    assert {"config.json", "log.jsonl", "metrics.json", "results.md", "ckpt/srlora/last.pt",
            "ckpt/srlora/best.pt"} <= set(snapshot(prev))
    records = [json.loads(line) for line in (prev / "log.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records if r["event"] == "switch"}) == [4, 8, 12, 16, 20, 24]
    [m] = json.loads((prev / "metrics.json").read_text())
    assert m["method"] == "srlora" and m["task"] == "sst2" and set(m["dev"]) == {"accuracy"}
    assert m["best_step"] in (8, 16, 24) and math.isfinite(m["dev_loss"])


def test_hf_model_trains_a_random_transformers_bert_built_from_a_config(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(**{k: v for k, v in TINY_CONFIG.items() if k != "model_type"})
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "model")
    transformers.BertTokenizer(str(tiny["model"] / "vocab.txt")).save_pretrained(tmp_path / "model")
    done = script(*args(tiny["data"], None, tmp_path, "hf", hf_model=tmp_path / "model", max_steps=8, eval_every=4))
    assert done.returncode == 0, done.stderr[-3000:]
    [m] = json.loads((tmp_path / "hf" / "metrics.json").read_text())
    # r=2 on each of 2 blocks' six maps: four 16x16 (q, k, v, attention output), 16->32 and 32->16
    assert m["params"]["adapter"] == 2 * (4 * 2 * (16 + 16) + 2 * 2 * (16 + 32)) == 896
    switches = [json.loads(l) for l in (tmp_path / "hf" / "log.jsonl").read_text().splitlines()]
    assert {r["step"] for r in switches if r["event"] == "switch"} == {1, 2, 3, 4, 5, 6}   # 6 switches, 8 // 6 apart


def test_hf_model_without_transformers_is_a_one_line_error(tiny, tmp_path):
    # A transformers package that fails to import stands in for a missing one, so that this test
    # also runs where transformers is installed (CI installs it).
    blocker = tmp_path / "no_transformers" / "transformers"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('transformers is hidden from this test')\n")
    env = {**ENV, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{ROOT}"}
    done = script(*args(tiny["data"], None, tmp_path, "hf", hf_model="bert-base-uncased"), env=env)
    assert done.returncode == 2 and done.stderr.startswith("error: --hf_model needs transformers, which is not installed")
    assert len(done.stderr.splitlines()) == 1


# Bad input: each case exits with code 2 and one line on stderr that names the problem, with no
# traceback, and leaves a previous finished run in its output folder byte for byte as it was.
# Every case runs with --name=prev --overwrite over a copy of that run (the strongest temptation
# to delete it), except the resume cases and the one that checks a finished run is refused.

def folder_without(tiny, tmp, name):
    d = tmp / f"no-{name}"
    shutil.copytree(tiny["data"], d)
    (d / name).unlink()
    return d


def data_with(tiny, tmp, name, text):
    d = tmp / f"bad-{name}"
    shutil.copytree(tiny["data"], d)
    write(d / name, text)
    return d


def model_with(tiny, tmp, change):
    d = tmp / "model"
    shutil.copytree(tiny["model"], d)
    change(d)
    return d


def _truncate(path):
    path.write_bytes(path.read_bytes()[:200])


def _vocab_longer_than_embeddings(d):
    (d / "vocab.txt").write_text("\n".join(WORDS + ["extra", "words"]) + "\n")


def _no_checkpoint(tiny, tmp):
    d = tmp / "runs" / "fresh"
    shutil.copytree(tiny["prev"], d)
    shutil.rmtree(d / "ckpt")
    (d / "metrics.json").unlink()
    return d


# id -> (flags over the tiny run's, given the fixture and a scratch folder; what the line must say)
BAD_INPUT = {
    "no data_dir": (lambda t, tmp: dict(data_dir=None), "--task=sst2 needs --data_dir"),
    "data_dir missing": (lambda t, tmp: dict(data_dir=tmp / "nowhere"), "train.tsv does not exist"),
    "data_dir the task does not read": (lambda t, tmp: dict(task="tweets", data_dir=tmp / "RTE"),
                                        "RTE is not read by --task=tweets"),
    "no train.tsv": (lambda t, tmp: dict(data_dir=folder_without(t, tmp, "train.tsv")), "train.tsv does not exist"),
    "no dev.tsv": (lambda t, tmp: dict(data_dir=folder_without(t, tmp, "dev.tsv")), "dev.tsv does not exist"),
    "malformed row": (lambda t, tmp: dict(data_dir=data_with(t, tmp, "train.tsv", "sentence\tlabel\ngood\t1\nbad\n")),
                      "train.tsv:3: expected 2 tab-separated fields, found 1"),
    "bad label": (lambda t, tmp: dict(data_dir=data_with(t, tmp, "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t-1\n")),
                  "dev.tsv:3: label '-1' is not one of 0, 1"),
    "empty dataset": (lambda t, tmp: dict(data_dir=data_with(t, tmp, "train.tsv", "sentence\tlabel\n")),
                      "train.tsv holds no examples"),
    "empty file": (lambda t, tmp: dict(data_dir=data_with(t, tmp, "dev.tsv", "")), "dev.tsv is empty"),
    "fewer examples than a batch": (lambda t, tmp: dict(data_dir=data_with(t, tmp, "train.tsv", "sentence\tlabel\n"
                                                                           "good\t1\nbad\t0\n")),
                                    "the training set has 2 examples, fewer than --batch_size=8"),
    "unknown task": (lambda t, tmp: dict(task="sst3"), "--task=sst3 is unknown"),
    "unknown method": (lambda t, tmp: dict(method="dora"), "unknown method 'dora'"),
    "r < 1": (lambda t, tmp: dict(r=0), "--r=0 must be at least 1"),
    "r > min(m, n)": (lambda t, tmp: dict(r=17, r_target=32), "r=17 must be between 1 and min(out, in)=16"),
    "r_target < r": (lambda t, tmp: dict(r_target=1), "--r_target=1 is smaller than r=2"),
    "gamma 0": (lambda t, tmp: dict(gamma=0), "--gamma=0.0 is outside (0, 1]"),
    "gamma > 1": (lambda t, tmp: dict(gamma=1.5), "--gamma=1.5 is outside (0, 1]"),
    "targets match nothing": (lambda t, tmp: dict(targets="qkv"), "targets=['qkv'] match no nn.Linear"),
    "weights missing": (lambda t, tmp: dict(model_dir=model_with(t, tmp, lambda d: (d / "model.safetensors").unlink())),
                        "has neither model.safetensors nor pytorch_model.bin"),
    "weights truncated": (lambda t, tmp: dict(model_dir=model_with(t, tmp, lambda d: _truncate(d / "model.safetensors"))),
                          "corrupt safetensors file"),
    "weights not a checkpoint": (lambda t, tmp: dict(model_dir=model_with(t, tmp, lambda d: (
        (d / "model.safetensors").unlink(), write(d / "pytorch_model.bin", "not a checkpoint")))),
        "cannot read it as a torch checkpoint"),
    "config does not fit the weights": (lambda t, tmp: dict(model_dir=model_with(t, tmp, lambda d: write(
        d / "config.json", json.dumps({**TINY_CONFIG, "intermediate_size": 48})))), "do not belong together"),
    "vocab does not fit the embeddings": (lambda t, tmp: dict(model_dir=model_with(t, tmp, _vocab_longer_than_embeddings)),
                                          f"vocab.txt has {len(WORDS) + 2} tokens but the model embeds only {len(WORDS)}"),
    "resume without checkpoint": (lambda t, tmp: dict(resume=_no_checkpoint(t, tmp), overwrite=None),
                                  "no checkpoint there yet"),
    "resume missing folder": (lambda t, tmp: dict(resume=tmp / "runs" / "gone", overwrite=None), "no run there"),
    "resume other settings": (lambda t, tmp: dict(resume=tmp / "runs" / "prev", lr=0.5, overwrite=None),
                              "the checkpoint was made with lr=0.03, not 0.5"),
    "finished run without --overwrite": (lambda t, tmp: dict(overwrite=None), "already holds a finished run"),
}


# Runs train_glue.py once per line of stdin ({"argv": [...], "out": path}): Python and torch are
# imported once, then each case forks and goes through the script's own entry, cli(main), with
# its stdout and stderr in files; the exit code comes back as one line.  27 cases cost ~3 s, not ~50.
FORK_PER_CASE = """
import json, os, sys, traceback
import train_glue
for line in sys.stdin:
    case = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with open(case["out"] + ".stdout", "w") as out, open(case["out"] + ".stderr", "w") as err:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.argv = ["train_glue.py", *case["argv"]]
                try:
                    train_glue.cli(train_glue.main)
                except SystemExit as e:
                    code = e.code
                except BaseException:
                    traceback.print_exc()      # what python does with an uncaught exception
                sys.stdout.flush()
                sys.stderr.flush()
        finally:
            os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@pytest.fixture(scope="module")
def bad_input_results(tiny):
    """{case: (exit code, stderr, snapshot of its runs folder before, its runs folder)}."""
    cases, lines = {}, []
    for i, (case, (flags, _)) in enumerate(BAD_INPUT.items()):
        tmp = tiny["root"] / f"case{i}"
        shutil.copytree(tiny["prev"], tmp / "runs" / "prev")
        argv = args(tiny["data"], tiny["model"], tmp / "runs", "prev", **{"overwrite": "true", **flags(tiny, tmp)})
        cases[case] = (tmp, snapshot(tmp / "runs"))
        lines.append(json.dumps({"argv": argv, "out": str(tmp / "case")}))
    done = subprocess.run([sys.executable, "-c", FORK_PER_CASE], input="\n".join(lines) + "\n", env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = [int(c) for c in done.stdout.split()]
    return {case: (code, (tmp / "case.stderr").read_text(), before, tmp / "runs")
            for (case, (tmp, before)), code in zip(cases.items(), codes)}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line_and_keeps_the_previous_run(tiny, bad_input_results, case):
    code, stderr, before, runs = bad_input_results[case]
    lines = stderr.splitlines()
    assert code == 2, stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith("error: ") and BAD_INPUT[case][1] in lines[0], lines[0]
    assert snapshot(runs) == before and snapshot(runs / "prev") == snapshot(tiny["prev"])


def test_sst2_cut_to_150_steps_warns_that_the_preset_warmup_keeps_the_lr_at_30_percent(capsys):
    cfg = parse_config(train_glue.GlueConfig, ["--task=sst2", "--max_steps=150"], train_glue.PRESETS, "task")
    assert warmup_warning(cfg).startswith("warning: --warmup=500 is not shorter than the 150 steps of this run, "
                                          "so the learning rate peaks at 30% of --lr=3e-05")
    print_help(train_glue.GlueConfig)                                # --help says the warm-up is not scaled
    assert "not scaled with --max_steps" in next(l for l in capsys.readouterr().out.splitlines() if "--warmup=" in l)


def test_the_script_itself_exits_2_with_one_line(tiny, tmp_path):
    done = script(*args(tiny["data"], tiny["model"], tmp_path, "x", task="sst3"))
    expected = "error: --task=sst3 is unknown; use one of " + ", ".join(train_glue.PRESETS) + "\n"
    assert (done.returncode, done.stderr) == (2, expected)
    assert not list(tmp_path.iterdir())


# -----------------------------------------------------------------------------
# slow: SIGKILL in the middle and --resume; torchrun with two processes

# Runs train_glue.py and SIGKILLs it when it logs training step KILL_AT_STEP: no handler runs,
# no file is closed, as when a machine dies.
KILL_AT = """
import os, runpy, signal, sys
from harness import rundir
log = rundir.Run.log
def log_then_die(self, record):
    log(self, record)
    if record.get("event") == "train" and record["step"] == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
rundir.Run.log = log_then_die
sys.argv = ["train_glue.py", *sys.argv[1:]]
runpy.run_path("train_glue.py", run_name="__main__")
"""


def metrics_without_time(folder):
    return [{k: v for k, v in m.items() if k != "train_seconds"} for m in json.loads((folder / "metrics.json").read_text())]


def assert_same_weights(a, b):
    for kind in ("last", "best"):
        x = torch.load(a / "ckpt" / "srlora" / f"{kind}.pt", weights_only=False)
        y = torch.load(b / "ckpt" / "srlora" / f"{kind}.pt", weights_only=False)
        assert x["step"] == y["step"] and set(x["model"]) == set(y["model"])
        for k, v in x["model"].items():
            assert torch.equal(v, y["model"][k]) if torch.is_tensor(v) else v == y["model"][k], (kind, k)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bitwise_identical_to_an_uninterrupted_run(tiny, tmp_path):
    # Killed at step 14: after the switches at 4, 8 and 12 and the checkpoint at step 12, in the
    # middle of the steps that checkpoint does not hold.
    argv = args(tiny["data"], tiny["model"], tmp_path, "killed")
    killed = subprocess.run([sys.executable, "-c", KILL_AT, *argv], env={**ENV, "KILL_AT_STEP": "14"}, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-3000:]
    folder = tmp_path / "killed"
    assert torch.load(folder / "ckpt" / "srlora" / "last.pt", weights_only=False)["step"] == 12
    assert not (folder / "metrics.json").exists()
    resumed = script(*argv, f"--resume={folder}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 12" in resumed.stdout
    assert metrics_without_time(folder) == metrics_without_time(tiny["prev"])
    assert_same_weights(folder, tiny["prev"])
    # the steps between the checkpoint and the kill are logged once, as in the uninterrupted run
    assert (folder / "log.jsonl").read_text() == (tiny["prev"] / "log.jsonl").read_text()


@pytest.mark.slow
def test_torchrun_with_two_processes_completes_and_only_rank_0_writes(tiny, tmp_path):
    # --standalone: the rendezvous binds a free port itself, so parallel test runs cannot collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           # "--" ends torchrun's own flags: its parser would take --r=2 for an abbreviation of --rdzv-*
           str(ROOT / "train_glue.py"), "--", *args(tiny["data"], tiny["model"], tmp_path, "ddp")]
    done = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("outputs in") == 1 and done.stdout.count("[srlora] step 24/24") == 1, done.stdout
    folder = tmp_path / "ddp"
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    keys = [(r["event"], r["step"], r.get("layer")) for r in records]
    assert len(keys) == len(set(keys)), "a record was written twice: a rank other than 0 wrote the log"
    assert [r["identical"] for r in records if r["event"] == "ranks"] == [True]
    assert sorted({r["step"] for r in records if r["event"] == "switch"}) == [4, 8, 12, 16, 20, 24]
    assert len(json.loads((folder / "metrics.json").read_text())) == 1
    assert not list(folder.rglob("*.tmp"))


def torchrun(n, script, argv, env=ENV):
    """torchrun --nproc_per_node=n script -- argv; "--" ends torchrun's own flags (see above)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(script),
           "--", *argv]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)


def switch_events(folder):
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "layer", "slots", "fused_out", "brought_in")}
            for r in records if r["event"] == "switch"]


def assert_same_run(folder, reference):
    """The same switches (slots, directions) and the same final dev metric; the dev loss within 1e-4."""
    assert switch_events(folder) == switch_events(reference)
    [a], [b] = (json.loads((f / "metrics.json").read_text()) for f in (folder, reference))
    assert (a["best_step"], a["dev"]) == (b["best_step"], b["dev"])
    assert math.isclose(a["dev_loss"], b["dev_loss"], rel_tol=1e-4), (a["dev_loss"], b["dev_loss"])


@pytest.mark.slow
def test_fsdp_on_two_ranks_switches_and_scores_as_one_process_and_resumes_on_one_rank(tiny, tmp_path):
    # No dropout: each rank draws its masks from the same seeded generator for its half of the batch,
    # so with dropout two ranks compute something else than one process (DDP alike).  Evaluations and
    # checkpoints at steps 12 and 24 only: a sharded checkpoint costs every rank a write.  moments=keep:
    # with "reset" the zeroed second moments amplify the two ranks' reduction-order differences until a
    # near-tie of two pair scores falls the other way (tests/test_srlora_fsdp.py runs "reset" on 2 ranks).
    flags = dict(dropout=0, eval_every=12, save_every=12, moments="keep")
    one = script(*args(tiny["data"], tiny["model"], tmp_path, "one", **flags))
    assert one.returncode == 0, one.stderr[-3000:]
    argv = args(tiny["data"], tiny["model"], tmp_path, "fsdp", fsdp="true", **flags)
    done = torchrun(2, ROOT / "train_glue.py", argv)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert_same_run(tmp_path / "fsdp", tmp_path / "one")
    # Killed on 2 ranks at step 14, after the sharded checkpoint of step 12; resumed on 1 rank.
    (tmp_path / "kill_at.py").write_text(KILL_AT)
    argv = args(tiny["data"], tiny["model"], tmp_path, "killed", fsdp="true", **flags)
    killed = torchrun(2, tmp_path / "kill_at.py", argv, env={**ENV, "KILL_AT_STEP": "14"})
    folder = tmp_path / "killed"
    assert killed.returncode != 0 and not (folder / "metrics.json").exists()
    assert (folder / "ckpt" / "srlora" / "last" / "loop.pt").exists()
    resumed = torchrun(1, ROOT / "train_glue.py", [*argv, f"--resume={folder}"])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "at step 12" in resumed.stdout
    assert_same_run(folder, tmp_path / "one")


def test_fsdp_without_torchrun_is_a_one_line_error(tiny, tmp_path):
    done = script(*args(tiny["data"], tiny["model"], tmp_path, "x", fsdp="true"))
    assert done.returncode == 2 and done.stderr.startswith("error: --fsdp shards the model over the processes "
                                                           "torchrun starts; run torchrun --nproc_per_node=2")
    assert done.stderr.count("\n") == 1 and not list(tmp_path.iterdir())


# -----------------------------------------------------------------------------
# every bad flag: exit 2, one line, checked before anything is written

def _latin1_tsv(t, tmp):
    d = data_with(t, tmp, "train.tsv", "")
    write(d / "train.tsv", "sentence\tlabel\ncaf\xe9 good\t1\n", encoding="latin-1")
    return dict(data_dir=d)


def _utf16_tsv(t, tmp):
    d = tmp / "utf16"
    shutil.copytree(t["data"], d)
    write(d / "dev.tsv", (d / "dev.tsv").read_text(), encoding="utf-16")
    return dict(data_dir=d)


def _latin1_vocab(t, tmp):
    return dict(model_dir=model_with(t, tmp, lambda d: (d / "vocab.txt").write_bytes(
        (d / "vocab.txt").read_bytes() + "caf\xe9\n".encode("latin-1"))))


def _nan_weights(t, tmp):
    from harness.weights import read_safetensors
    from tests.conftest import write_safetensors

    def poison(d):
        state = read_safetensors(d / "model.safetensors")
        state["encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")
        write_safetensors(state, d / "model.safetensors")
    return dict(model_dir=model_with(t, tmp, poison))


def _not_a_run(t, tmp):
    (tmp / "runs" / "mydata").mkdir(parents=True)
    (tmp / "runs" / "mydata" / "notes.txt").write_text("keep")
    return dict(name="mydata", overwrite="true")


# id -> (flags over the tiny run's, given the fixture and a scratch folder; what the line says)
BAD_FLAGS = {
    "batch_size -4": (lambda t, tmp: dict(batch_size=-4), "--batch_size=-4 must be at least 1"),
    "batch_size 0": (lambda t, tmp: dict(batch_size=0), "--batch_size=0 must be at least 1"),
    "head_lr -1": (lambda t, tmp: dict(head_lr=-1), "--head_lr=-1.0 must be a finite number >= 0"),
    "epochs -1": (lambda t, tmp: dict(epochs=-1, max_steps=0), "--epochs=-1.0 must be a finite number > 0"),
    "warmup -5": (lambda t, tmp: dict(warmup=-5), "--warmup=-5 must be at least 0"),
    "save_every -1": (lambda t, tmp: dict(save_every=-1), "--save_every=-1 must be at least 0"),
    "max_steps -1": (lambda t, tmp: dict(max_steps=-1), "--max_steps=-1 must be at least 0"),
    "lr nan": (lambda t, tmp: dict(lr="nan"), "--lr=nan must be a finite number > 0"),
    "lr -1": (lambda t, tmp: dict(lr=-1), "--lr=-1.0 must be a finite number > 0"),
    "lr inf": (lambda t, tmp: dict(lr="inf"), "--lr=inf must be a finite number > 0"),
    "weight_decay -1": (lambda t, tmp: dict(weight_decay=-1), "--weight_decay=-1.0 must be a finite number >= 0"),
    "momentum 1": (lambda t, tmp: dict(momentum=1), "--momentum=1.0 must be in [0, 1)"),
    "dropout 2": (lambda t, tmp: dict(dropout=2), "--dropout=2.0 must be in [0, 1)"),
    "grad_accum 0": (lambda t, tmp: dict(grad_accum=0), "--grad_accum=0 must be at least 1"),
    "eval_every 0": (lambda t, tmp: dict(eval_every=0), "--eval_every=0 must be at least 1"),
    "log_every 0": (lambda t, tmp: dict(log_every=0), "--log_every=0 must be at least 1"),
    "seed -1": (lambda t, tmp: dict(seed=-1), "--seed=-1 must be in [0, 2**32)"),
    "max_len 2": (lambda t, tmp: dict(max_len=2), "--max_len=2 must be at least 3"),
    "max_dev -1": (lambda t, tmp: dict(max_dev=-1), "--max_dev=-1 must be at least 0"),
    "eval_batch_size 0": (lambda t, tmp: dict(eval_batch_size=0), "--eval_batch_size=0 must be at least 1"),
    "pooling max": (lambda t, tmp: dict(pooling="max"), "--pooling=max is unknown"),
    "device bogus": (lambda t, tmp: dict(device="bogus"), "--device=bogus is not a device"),
    "device meta": (lambda t, tmp: dict(device="meta"), "--device=meta is not a device"),
    "beta1 1": (lambda t, tmp: dict(beta1=1), "--beta1=1.0 is outside [0, 1)"),
    "alpha 0": (lambda t, tmp: dict(alpha=0), "--alpha=0.0 must be positive and finite"),
    "alpha -8": (lambda t, tmp: dict(alpha=-8), "--alpha=-8.0 must be positive and finite"),
    "optimizer adam": (lambda t, tmp: dict(optimizer="adam"), "--optimizer=adam is unknown"),
    "methods empty": (lambda t, tmp: dict(method="", methods=","), "--method and --methods are both empty"),
    "name .": (lambda t, tmp: dict(name="."), "--name=. must be one folder name inside --out_dir"),
    "name ..": (lambda t, tmp: dict(name=".."), "--name=.. must be one folder name inside --out_dir"),
    "name a/b": (lambda t, tmp: dict(name="a/b"), "--name=a/b must be one folder name inside --out_dir"),
    "name not a run": (_not_a_run, "mydata exists and is not a run folder"),
    "out_dir under a file": (lambda t, tmp: dict(out_dir=write(tmp / "file", "x") / "runs"),
                             "cannot write the run folder"),
    "latin-1 tsv": (_latin1_tsv, "train.tsv: byte 18 is not UTF-8 text"),
    "utf-16 tsv": (_utf16_tsv, "dev.tsv: byte 0 is not UTF-8 text (it looks like UTF-16)"),
    "latin-1 vocab": (_latin1_vocab, "vocab.txt: byte"),
    "nan weights": (_nan_weights, "tensor 'encoder.layer.0.attention.self.query.weight' holds 1 NaN or inf value"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_every_bad_flag_exits_2_with_one_line_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys, case):
    flags, expected = BAD_FLAGS[case]
    flags = {"out_dir": tmp_path / "runs", **flags(tiny, tmp_path)}
    before = snapshot(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_glue.py", *args(tiny["data"], tiny["model"], flags.pop("out_dir"),
                                                             flags.pop("name", "new"), **flags)])
    with pytest.raises(SystemExit) as e:
        train_glue.cli(train_glue.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert snapshot(tmp_path) == before                    # no run folder, nothing else touched
