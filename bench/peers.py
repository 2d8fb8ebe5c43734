"""The peer library the benchmarks compare against, installed for them only: lightly (the transforms, heads, loss
and LARS that lightly's Barlow Twins example uses), pinned, into a folder of its own from the package registry,
never into .venv (lightly's declared dependencies would pull pytorch-lightning and hydra; the modules used here
need only lightning-utilities)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LIGHTLY = ["lightly==1.6.0", "lightning-utilities==0.15.2"]


def tools_dir() -> Path:
    return Path(os.environ.get("BARLOW_TOOLS_DIR", Path.home() / ".cache" / "barlow-tools"))


def import_lightly():
    """lightly's modules, installing the pinned version on first use."""
    target = tools_dir() / "lightly-1.6.0"
    if not (target / "lightly").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                        "--target", str(target), *LIGHTLY], check=True)
    if str(target) not in sys.path:
        sys.path.append(str(target))  # after .venv: lightly runs on the project's torch and torchvision
    import lightly

    return lightly
