"""`train.py --dry-run [--devices N]` compiles on a simulated N-device CPU mesh: XLA reads that from XLA_FLAGS when
jax starts, so the entry script calls `simulate_devices(argv)` before anything imports jax (this module does not)."""

from __future__ import annotations

import argparse
import os


def simulate_devices(argv) -> None:
    """With --dry-run in `argv`: run on the CPU with --devices (default 8) simulated devices."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--devices", type=int, default=8)
    try:
        flags = parser.parse_known_args(argv)[0]
    except SystemExit:  # a malformed --devices: train.py's own parser reports it
        return
    if flags.dry_run:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={flags.devices}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
