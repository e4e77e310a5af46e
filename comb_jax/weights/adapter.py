"""KV Packet adapter files: the trained trailer as `RUN_DIR/adapter.safetensors` (written at every checkpoint)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ADAPTER_FILE = "adapter.safetensors"


def write_adapter(run_dir: Path, adapter, step: int):
    """The trailer as safetensors (atomically: a kill mid-write keeps the previous file), its step as metadata."""
    tmp = Path(run_dir) / (ADAPTER_FILE + ".tmp")
    save_file({"trailer": np.asarray(adapter["trailer"], np.float32)}, str(tmp), metadata={"step": str(step)})
    tmp.replace(Path(run_dir) / ADAPTER_FILE)


def load_adapter(path: str | Path) -> dict:
    """{"trailer": [P, embed]} from a run dir (its adapter.safetensors) or the file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"KV Packet adapter {path} does not exist (a kvpacket run dir or its {ADAPTER_FILE})")
    return {"trailer": np.asarray(load_file(str(path))["trailer"], np.float32)}
