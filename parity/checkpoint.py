"""Checkpoint directories: `config.json` + `model.safetensors` in canonical names. Never pickle.

Writes are atomic (temporary file in the same directory, fsync, rename), so a crash leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from parity.config import TransformerConfig
from parity.convert import ConversionError, check_canonical, to_numpy

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read: missing, truncated, malformed or mismatched files."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: str | os.PathLike, cfg: TransformerConfig, weights: Mapping[str, Any]) -> Path:
    """Save canonical weights (torch tensors or arrays) and the config into `run_dir`."""
    from safetensors.numpy import save

    check_canonical(weights, cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in weights.items()}
    atomic_write_bytes(run_dir / WEIGHTS_FILE, save(arrays, metadata={"format": "twin-transformer"}))
    atomic_write_bytes(run_dir / CONFIG_FILE, cfg.to_json().encode())
    return run_dir


def read_config(path: str | os.PathLike) -> TransformerConfig:
    """A config.json file -> TransformerConfig; CheckpointError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file (cannot read config)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read config ({e.strerror or e})") from None
    try:
        return TransformerConfig.from_json(text)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid config: {e}") from None


def load_config(run_dir: str | os.PathLike) -> TransformerConfig:
    return read_config(Path(run_dir) / CONFIG_FILE)


def load_checkpoint(run_dir: str | os.PathLike) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """(config, canonical {name: numpy array}) from `run_dir`; every key and shape checked.

    The arrays are copy-on-write views of the memory-mapped weights file (`parity.formats`); NaN and
    Inf are let through (a diverged run can still be inspected and resumed).
    """
    from parity.formats import FormatError, read_checkpoint

    cfg = load_config(run_dir)
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return cfg, read_checkpoint(path, config=cfg, allow_nonfinite=True).weights
    except (FormatError, ConversionError) as e:
        raise CheckpointError(str(e)) from None
