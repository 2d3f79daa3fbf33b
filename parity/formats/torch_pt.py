"""PyTorch `.pt`/`.pth`/`.bin`/`.ckpt` state dicts: read with `torch.load(weights_only=True)` only
(memory-mapped for zip files), canonical or nn.Transformer names; `module.` / `_orig_mod.` prefixes and
a `{"state_dict": ...}` wrapper are accepted. Written with `torch.save` from the arrays' own memory.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from parity.convert import contiguous, to_numpy
from parity.formats.common import WEIGHT_DTYPES, _fail, _read_head, _short, _unconvertible

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
ZIP_MAGIC = b"PK\x03\x04"
_WRAPPERS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


def is_zip(head: bytes, suffix: str) -> bool:
    """A zip archive: what `torch.save` writes (whatever the suffix)."""
    return head.startswith(ZIP_MAGIC)


def is_legacy_pickle(head: bytes, suffix: str) -> bool:
    """A legacy (non-zip) `torch.save` pickle: protocol 2 to 5."""
    return head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5


def read(path: Path) -> tuple[dict[str, np.ndarray], None]:
    """`torch.load(weights_only=True)`, memory-mapped for zip files; a pickle that would run code is refused."""
    import pickle

    import torch

    head, _ = _read_head(path, 4)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=head == ZIP_MAGIC)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand[^.\n]*|"
                          r"unsupported[^.\n]*", str(e), flags=re.IGNORECASE)
        what = f" ({found.group(0)})" if found else ""
        raise _fail(path, f"refused: the pickle asks for more than tensors and plain containers{what}; "
                    "only torch.load(weights_only=True) is used, nothing in it ran") from None
    except Exception as e:  # noqa: BLE001
        raise _fail(path, f"not a readable PyTorch file ({_short(e)})") from None
    if isinstance(obj, Mapping):
        for wrapper in _WRAPPERS:
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise _fail(path, f"expected a state dict {{name: tensor}}, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise _fail(path, f"{key!r} holds a {type(value).__name__}, not a tensor")
        out[key] = value
    for prefix in _PREFIXES:
        if out and all(isinstance(k, str) and k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    for key, value in out.items():
        if str(value.dtype).removeprefix("torch.") not in WEIGHT_DTYPES:
            raise _unconvertible(path, key, str(value.dtype).removeprefix("torch."))
    return {k: to_numpy(v) for k, v in out.items()}, None


class _Recorded:
    """A binary file whose failed writes are remembered: torch.save reports them as a RuntimeError
    ("unexpected pos ...") that no longer says why."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save(tmp: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """torch.save of {name: tensor}; tensors share the arrays' memory, tied names share one tensor."""
    import torch

    tensors: dict[int, Any] = {}
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        for key, value in arrays.items():
            if id(value) not in tensors:
                a = contiguous(value)
                tensors[id(value)] = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
                                      if a.dtype.name == "bfloat16" else torch.from_numpy(a))
            out[key] = tensors[id(value)]
    with open(tmp, "wb") as f:
        recorded = _Recorded(f)
        try:
            torch.save(out, recorded)
        except RuntimeError as e:
            if recorded.error is None:
                raise
            raise OSError(recorded.error.errno, recorded.error.strerror, str(tmp)) from e
