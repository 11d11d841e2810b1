"""The floors of the house: the models never import the training loop, and the method and its
add-ons import none of transformers, peft, timm, bitsandbytes or the harness until a feature that
needs one is used (srlora_export takes safetensors when it is there)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_after(statement: str) -> set:
    code = f"import sys; before = set(sys.modules); {statement}; print('\\n'.join(sorted(set(sys.modules) - before)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("model", ["harness.bert", "harness.vit"])
def test_a_model_does_not_import_the_loop(model):
    loaded = {m for m in imported_after(f"import {model}") if m.startswith("harness")}
    assert loaded <= {"harness", model, "harness.errors", "harness.weights"}, loaded


def test_srlora_and_its_add_ons_import_no_third_party_package_but_torch():
    loaded = imported_after("import srlora, srlora_switch, srlora_precision, srlora_hf, srlora_export")
    third_party = {m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names) - {"torch"}
    assert not third_party & {"transformers", "peft", "harness", "timm", "bitsandbytes", "trl", "datasets"}, third_party
