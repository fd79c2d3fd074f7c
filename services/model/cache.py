"""Model directories made on first use in a cache, so every service loads the same files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from services.model.config import preset
from services.model.weights import WEIGHTS_FILE, init_tensors, save_model


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDS_CACHE_DIR") or Path.home() / ".cache" / "xdeepserve")


def ensure_model(model_dir: str | None, preset_name: str, seed: int, cache_dir: str = "") -> Path:
    """``model_dir`` if given (must exist); else ``<cache>/models/<preset>-seed<seed>``, created
    atomically (written to a temp dir, then renamed) so concurrent starters never see half a model."""
    if model_dir:
        d = Path(model_dir)
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"model directory {d} has no config.json")
        return d
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    d = root / "models" / f"{preset_name}-seed{seed}"
    if (d / WEIGHTS_FILE).exists() and (d / "config.json").exists():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    cfg = preset(preset_name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
    try:
        save_model(tmp, cfg, init_tensors(cfg, seed))
        try:
            os.rename(tmp, d)
        except OSError:  # another starter won the race: its copy is identical
            if not (d / WEIGHTS_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d
