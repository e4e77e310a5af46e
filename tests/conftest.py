"""Shared fixtures. Eight simulated CPU devices so sharding tests can build real meshes.

Tests marked gpu are deselected unless `-m` names gpu; `make test` on a GPU machine runs `-m gpu` with
JAX_PLATFORMS=cuda (which the setdefault below leaves alone)."""

import atexit
import gc
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the run, shared with the subprocesses tests start (servers, multihost
# workers, train.py): after the per-module drop of executables below, and in each new process, the same programs
# (tiny_comb's train and serve steps recur in many modules) are read back instead of compiled again. Programs that
# compile in under a second are not stored (JAX's default threshold).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="comb-jax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from comb_jax.config import load_config  # noqa: E402
from comb_jax.model.layout import init_params, model_layout  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_config("tiny_comb")


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    """Tiny random model with nonzero gates, so the cross blocks really act."""
    params = init_params(model_layout(tiny_cfg.model), jax.random.key(1))
    cross = dict(params["comb"]["cross"])
    cross["gate_attn"] = cross["gate_attn"] + 0.5
    cross["gate_mlp"] = cross["gate_mlp"] + 0.3
    params["comb"]["cross"] = cross
    return params


@pytest.fixture(scope="session")
def smol_cfg():
    return load_config("smollm2_comb")


@pytest.fixture(scope="session")
def smol_backbone(smol_cfg):
    from comb_jax.weights.resolve import load_backbone

    return jax.tree.map(np.asarray, load_backbone(smol_cfg))


@pytest.fixture(scope="session")
def smol_tokenizer(smol_cfg):
    from comb_jax.text.tokenizer import load_tokenizer

    return load_tokenizer(smol_cfg)


@pytest.fixture(scope="session")
def smol_hf_model():
    """transformers' own float32 reading of the same GGUF: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from comb_jax.paths import embedded_gguf_path

    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-text data not found at {SHARED_DATA} (expected ../shared/data beside the checkout)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only when the `-m` expression names gpu (`make test` on a GPU machine: `-m gpu`);
    otherwise they are deselected, not skipped, so the CPU suite neither runs nor reports them."""
    if "gpu" in (config.getoption("markexpr") or ""):
        return
    keep = [item for item in items if item.get_closest_marker("gpu") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("gpu") is not None])
        items[:] = keep


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_executables():
    """After each test module, drop JAX's compiled executables. The whole suite in one process compiles thousands
    of them; late in such a run a compile crashed natively twice (XLA abort, segfault in backend_compile_and_load)
    while every module passes alone. Each executable holds memory mappings, and the process's mapping count is
    bounded (vm.max_map_count), so this keeps a long run far from that bound."""
    yield
    jax.clear_caches()
    gc.collect()
