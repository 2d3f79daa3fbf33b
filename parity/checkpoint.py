"""Checkpoint directories: `config.json` + `model.safetensors` in canonical names. Never pickle.

Also the file helpers every part of `parity` uses. Writes are atomic (temporary file in the same
directory, fsync, rename), so a crash or a full disk leaves either the old file or the new one, never
half of one, and no temporary file; a failed write is a `WriteError` naming the file. The JSON files
parity reads go through `read_json` / `parse_json`, which turn every way a file can be unreadable or
malformed (missing, a directory, not UTF-8, invalid or too deeply nested JSON, the wrong top-level
type) into one line naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

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


class WriteError(OSError):
    """A file or directory that could not be written (disk full, read-only, too long a name, a parent that
    is a file, ...). An OSError with its errno; `str()` is one line: "cannot write PATH: REASON"."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """An OSError raised inside becomes a WriteError naming `path` (a WriteError passes unchanged)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from e


def renamed(error: WriteError, old: str | os.PathLike, new: str | os.PathLike) -> WriteError:
    """`error` naming the path under `new` where it named one under `old` (a temporary directory's
    files by the names they were to have)."""
    try:
        path = Path(new) / Path(error.filename).relative_to(old)
    except (TypeError, ValueError):
        return error
    return WriteError(error.errno, error.strerror, str(path))


def temp_prefix(path: Path) -> str:
    """The prefix of `path`'s temporary sibling: a dot, as much of the name as leaves room in 255
    bytes for mkstemp's random part and suffix, a dot."""
    name = path.name
    while len(os.fsencode(name)) > 200:
        name = name[:-1]
    return f".{name}."


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename; WriteError naming `path`
    (the temporary file removed, an old `path` untouched) when that fails."""
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
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


def append_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Append `data` to `path` (created if missing) whole or not at all: a failed write (a full disk)
    is cut back off, so the file never ends in half a record; WriteError naming `path`."""
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
               type(None): "null"}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: object, array, string, number, boolean or null."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def parse_json(data: str | bytes, where: str, *, error: type[Exception] = CheckpointError,
               expect: type | None = dict) -> Any:
    """`data` parsed as JSON (of type `expect` unless None); else `error("WHERE: ...")`, one line: not
    UTF-8, not valid JSON (with line and column), nested too deeply, or not of the expected type."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise error(f"{where}: not usable JSON (nested too deeply)") from None
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise error(f"{where}: not usable JSON ({str(e).split(';')[0]})") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{where}: expected a JSON {_JSON_TYPES.get(expect, expect.__name__)}, got {json_type(value)}")
    return value


def read_bytes(path: str | os.PathLike, what: str, *, error: type[Exception] = CheckpointError) -> bytes:
    """The bytes of the file `path`; else `error("PATH: ...")` naming `what` and why (no such file, a
    directory, a symlink loop, any other OS error)."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file (cannot read {what})") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what} file") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None


def read_json(path: str | os.PathLike, what: str, *, error: type[Exception] = CheckpointError,
              expect: type | None = dict) -> Any:
    """The JSON file `path` (of type `expect`, default an object), every failure one line naming it:
    `read_bytes`' and `parse_json`'s."""
    return parse_json(read_bytes(path, what, error=error), str(path), error=error, expect=expect)


def save_checkpoint(run_dir: str | os.PathLike, cfg: TransformerConfig, weights: Mapping[str, Any]) -> Path:
    """Save canonical weights (torch tensors or arrays) and the config into `run_dir`."""
    from safetensors.numpy import save

    check_canonical(weights, cfg)
    run_dir = Path(run_dir)
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in weights.items()}
    atomic_write_bytes(run_dir / WEIGHTS_FILE, save(arrays, metadata={"format": "twin-transformer"}))
    atomic_write_bytes(run_dir / CONFIG_FILE, cfg.to_json().encode())
    return run_dir


def read_config(path: str | os.PathLike) -> TransformerConfig:
    """A config.json file -> TransformerConfig; CheckpointError naming the file."""
    data = read_json(path, "config")
    try:
        return TransformerConfig.from_dict(data)
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


def load_model_dir(path: str | os.PathLike, *, tokenizer: bool = True):
    """(config, canonical weights, tokenizer or None) of a run directory (`twin train` / `twin convert`) or of a
    Hugging Face model directory (opus-mt's `save_pretrained`: config.json with a model_type).

    The tokenizer is the project's tokenizer.json, else the directory's Hugging Face tokenizer files
    (`parity.tokenizer.load_any`: MarianTokenizer, its decoder start from config.json or generation_config.json);
    None where there is none. CheckpointError for unusable weights, TokenizerError for an unusable tokenizer.
    """
    from parity.formats import FormatError
    from parity.formats.hf_dir import hf_config
    from parity.tokenizer import HF_TOKENIZER_FILES, TOKENIZER_FILE, load_any

    path = Path(path)
    try:
        hf = hf_config(path) if path.is_dir() else None
    except FormatError as e:
        raise CheckpointError(str(e)) from None
    if hf is not None:
        from parity.formats.hf_dir import read_hf_dir

        try:
            loaded = read_hf_dir(path)
        except FormatError as e:
            raise CheckpointError(str(e)) from None
        cfg, weights = loaded.cfg, loaded.weights
    else:
        cfg, weights = load_checkpoint(path)
    if not tokenizer or not any((path / name).is_file() for name in (TOKENIZER_FILE, *HF_TOKENIZER_FILES)):
        return cfg, weights, None
    found = load_any(path)
    target = getattr(found, "tgt_vocab_size", found.vocab_size)
    if (found.vocab_size, target) != (cfg.src_vocab_size, cfg.tgt_vocab_size):
        raise CheckpointError(f"{path}: the tokenizer has {found.vocab_size}/{target} tokens, the model's "
                              f"vocabularies are {cfg.src_vocab_size}/{cfg.tgt_vocab_size}")
    if found.pad_id != cfg.pad_id:
        raise CheckpointError(f"{path}: the tokenizer's pad id is {found.pad_id}, the model's pad_id {cfg.pad_id}")
    return cfg, weights, found
