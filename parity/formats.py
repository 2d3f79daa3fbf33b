"""Checkpoint files in the formats users have: detected, read without pickle, written atomically.

Containers and the names inside them:

    safetensors    a `.safetensors` file: canonical or torch.nn.Transformer names; the config rides in
                   the header's metadata (`"config"`)
    torch          a `.pt`/`.pth`/`.bin` state dict read with `torch.load(weights_only=True)` only:
                   canonical or nn.Transformer names (`module.` / `_orig_mod.` prefixes and a
                   `{"state_dict": ...}` wrapper are accepted)
    msgpack        a `.msgpack` file of `flax.serialization`: the Flax variables `{"params": ...}`
    orbax          an orbax checkpoint directory (Flax's standard): `{"params": ...}` (or a train state
                   holding `params`); the config rides in its custom metadata

A directory with `config.json` and one weights file reads as that file with that config. Targets
(`twin convert --to`): `safetensors`, `torch`, `nn-transformer` (nn.Transformer names, with the
embeddings and output layer beside them under their canonical names; for an encoder checkpoint
nn.TransformerEncoder names, with `src_embed` and the classification head beside them; a decoder-only
checkpoint has no torch.nn counterpart) and `flax` (orbax, or msgpack when DST ends in `.msgpack`).
The config, with its `arch` and `num_classes`, travels in the safetensors metadata, the orbax metadata
and config.json. A DST without a weights suffix is a directory: config.json plus the
weights (`DIR_FILES`; for flax the directory is the orbax checkpoint).

Every failure is a FormatError whose one-line message names the file, and the key with expected and
actual shape or dtype where there is one. Writes go to a temporary name, are fsynced and renamed;
nothing is left behind on failure. A checkpoint is never held twice: safetensors and zip `.pt` files
are memory-mapped and used in place, orbax params are restored in groups of about 64 MiB and written
from the arrays themselves, msgpack is streamed leaf by leaf both ways, and Flax kernels are
transposed one at a time (`benchmarks/bench_convert.py` measures peak RSS on a 1.1 GB checkpoint).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import math
import os
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from parity.checkpoint import (CONFIG_FILE, CheckpointError, WriteError, _umask, atomic_write_bytes, parse_json,
                               read_config, renamed, temp_prefix)
from parity.config import TransformerConfig
from parity.convert import (OUTSIDE_STACKS, ConversionError, aliases, canonical_to_flax, check_canonical,
                            check_ties, contiguous, flax_key_map, flax_to_canonical, from_nn_state_dict,
                            to_nn_state_dict, to_numpy)
from parity.names import canonical_shapes

WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")
TARGETS = ("torch", "flax", "safetensors", "nn-transformer")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
FILE_SUFFIXES = {".safetensors": "safetensors", ".msgpack": "msgpack", **{s: "torch" for s in TORCH_SUFFIXES}}
# target -> file containers it may write, by DST suffix
TARGET_CONTAINERS = {"safetensors": ("safetensors",), "torch": ("torch",), "nn-transformer": ("torch", "safetensors"),
                     "flax": ("msgpack",)}
DIR_FILES = {"safetensors": "model.safetensors", "torch": "pytorch_model.bin", "nn-transformer": "nn_transformer.pt"}
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")
ORBAX_CONFIG_KEY = "twin_transformer_config"
COMPANIONS = ("tokenizer.json",)  # copied from a SRC directory into a DST directory
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes: the safetensors library's own limit


def return_large_frees_to_os() -> None:
    """glibc only, process-wide (the CLI calls it): blocks of 1 MiB and more get their own mappings,
    so an array freed after conversion (often allocated in a tensorstore thread's arena) goes back to
    the OS instead of staying in the heap; the default threshold grows to 32 MiB as arrays are freed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class FormatError(ValueError):
    """A checkpoint that cannot be read, converted or written; the message is one line naming the file."""


@dataclass
class Loaded:
    """A checkpoint read into canonical weights (numpy, possibly memory-mapped; tied names included)."""

    cfg: TransformerConfig
    weights: dict[str, np.ndarray]
    container: str
    names: str
    path: Path
    config_source: str
    companions: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        dtypes = sorted({str(a.dtype) for a in self.weights.values()})
        size = sum(a.nbytes for k, a in self.weights.items() if k not in aliases(self.cfg))
        head = f" ({self.cfg.num_classes} classes)" if self.cfg.num_classes is not None else ""
        return (f"{self.path}: {self.container} ({self.names} names), {self.cfg.arch}{head}, "
                f"{len(self.weights)} tensors, {'/'.join(dtypes)}, {size / 1e6:,.1f} MB, "
                f"config from {self.config_source}")


# ---------------------------------------------------------------------------------------------- reading

def _fail(path: Path, message: str) -> FormatError:
    return FormatError(f"{path}: {message}")


def _unconvertible(path: Path, key: str, dtype: str) -> FormatError:
    return _fail(path, f"{key!r} has dtype {dtype}, which does not convert: expected one of {', '.join(WEIGHT_DTYPES)}")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _read_head(path: Path, n: int) -> tuple[bytes, int]:
    """The first `n` bytes and the size of a regular file; clear errors for anything else."""
    if path.is_dir():
        raise _fail(path, "is a directory where a file was expected")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return f.read(n), size
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None


def detect(path: str | os.PathLike) -> tuple[str, Path]:
    """(container, weights path) of a file or directory; config.json directories resolve to their file."""
    path = Path(path)
    try:
        exists = path.exists()
    except OSError as e:  # e.g. a name too long
        raise _fail(path, f"cannot read ({e.strerror or e})") from None
    if not exists:
        raise _fail(path, "a symbolic link that leads nowhere (broken, or a loop)" if path.is_symlink() else
                    "no such file or directory")
    if path.is_dir():
        if any((path / m).is_file() for m in ORBAX_MARKERS):
            return "orbax", path
        if path.suffix in FILE_SUFFIXES:
            raise _fail(path, "is a directory where a file was expected")
        candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES)
        standard = [p for p in candidates if p.name in (*DIR_FILES.values(), "flax_model.msgpack")]
        if len(standard) == 1 or len(candidates) == 1:
            return detect((standard or candidates)[0])
        if not candidates:
            raise _fail(path, "is a directory where a file was expected: it holds no weights file "
                        f"({', '.join(FILE_SUFFIXES)}) and is not an orbax checkpoint")
        raise _fail(path, f"holds several weights files ({', '.join(p.name for p in candidates)}): name one")
    head, size = _read_head(path, 16)
    if size == 0:
        raise _fail(path, "empty file")
    by_suffix = FILE_SUFFIXES.get(path.suffix)
    if head.startswith(b"PK\x03\x04"):
        return "torch", path
    if by_suffix == "safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        return "safetensors", path
    if by_suffix == "msgpack" or (head[0] in range(0x81, 0x90) or head[0] in (0xDE, 0xDF)):
        return "msgpack", path
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch", path  # a legacy (non-zip) torch.save pickle
    raise _fail(path, "unrecognised format (not safetensors, a PyTorch state dict, flax msgpack or orbax)")


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(the validated JSON header, where the data starts): every tensor inside the file, its byte count
    matching its shape and dtype, its dtype convertible."""
    from parity.suite import np_dtype

    head, size = _read_head(path, 8)
    if size == 0:
        raise _fail(path, "empty file")
    if size < 8:
        raise _fail(path, f"truncated: {size} bytes, too short for a safetensors file")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise _fail(path, f"safetensors header length {n} bytes is longer than the file ({size} bytes): "
                    "truncated or not safetensors")
    if n > SAFETENSORS_MAX_HEADER:
        raise _fail(path, f"safetensors header length {n} bytes is more than the format allows "
                    f"({SAFETENSORS_MAX_HEADER} bytes)")
    try:
        with open(path, "rb") as f:
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None
    header = parse_json(raw, f"{path}: safetensors header", error=FormatError)
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise _fail(path, "malformed safetensors header: __metadata__ must map names to strings")
            continue
        offsets, dtype, shape = (info.get(k) if isinstance(info, dict) else None
                                 for k in ("data_offsets", "dtype", "shape"))
        if not (isinstance(offsets, list) and len(offsets) == 2 and _counts(offsets) and isinstance(dtype, str)
                and isinstance(shape, list) and _counts(shape)):
            raise _fail(path, f"malformed safetensors header entry for {key!r} (expected dtype, shape and "
                        "data_offsets [begin, end], non-negative ints)")
        (begin, end), shape = offsets, tuple(shape)
        if end > data_len or not begin <= end:
            raise _fail(path, f"truncated: tensor {key!r} needs bytes {begin}..{end} of the data, "
                        f"which has {data_len} bytes")
        if dtype not in _SAFETENSORS_DTYPES:
            raise _unconvertible(path, key, dtype)
        needs = math.prod(shape) * np_dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
        if needs != end - begin:
            raise _fail(path, f"{key!r}: shape {shape} of {dtype} needs {needs} bytes, the header gives {end - begin}")
    return header, 8 + n


def _counts(values: list[Any]) -> bool:
    """Every value a non-negative int (not a bool, not a float)."""
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Arrays that are views of the memory-mapped file (the format is laid out for this: a validated
    header, then each tensor's little-endian bytes), so nothing is copied and no framework is needed."""
    from parity.suite import np_dtype

    header, start = _safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    config = None
    if "config" in metadata:
        config = parse_json(metadata["config"], f"{path}: the config in the safetensors metadata", error=FormatError)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable arrays, the file never changes
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None
    arrays = {}
    for key, info in header.items():
        begin, end = info["data_offsets"]
        dtype = np_dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        arrays[key] = data[start + begin:start + end].view(dtype).reshape(info["shape"])
    return arrays, config


_WRAPPERS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


def _read_torch(path: Path) -> tuple[dict[str, np.ndarray], None]:
    """`torch.load(weights_only=True)`, memory-mapped for zip files; a pickle that would run code is refused."""
    import pickle

    import torch

    head, _ = _read_head(path, 4)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=head == b"PK\x03\x04")
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


def _ndarray_ext_view(code: int, data: bytes) -> Any:
    """flax.serialization's ext hook, except that an array is a view over the ext's bytes (flax's
    `_ndarray_from_bytes` unpacks them into one more copy): (shape, dtype name, bin) parsed in place."""
    import msgpack
    from flax import serialization

    if code != serialization._MsgpackExtType.ndarray:
        return serialization._msgpack_ext_unpack(code, data)
    head = msgpack.Unpacker(raw=True)
    head.feed(data[:4096])
    if head.read_array_header() != 3:
        raise ValueError("an ndarray entry is not (shape, dtype, data)")
    shape, name = head.unpack(), head.unpack()
    pos = head.tell()
    width = {0xC4: 1, 0xC5: 2, 0xC6: 4}[data[pos]]
    n = int.from_bytes(data[pos + 1:pos + 1 + width], "big")
    dtype = np.dtype(serialization._dtype_from_name(name))
    return np.frombuffer(data, dtype, count=n // dtype.itemsize, offset=pos + 1 + width).reshape(shape)


def _read_msgpack(path: Path) -> tuple[dict[str, Any], None]:
    """`flax.serialization.msgpack_restore`, streamed from the file: one array's bytes buffered at a time."""
    import msgpack
    from flax import serialization

    _, size = _read_head(path, 0)
    try:
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(f, ext_hook=_ndarray_ext_view, raw=False,
                                        read_size=min(16 << 20, max(size, 1)), max_buffer_size=max(size, 1 << 20))
            tree = unpacker.unpack()
            if f.read(1) or unpacker.tell() != size:
                raise ValueError(f"trailing data after byte {unpacker.tell()}")
        tree = serialization._unchunk_array_leaves_in_place(tree)
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001
        raise _fail(path, f"not a readable flax msgpack file ({_short(e)})") from None
    return tree, None


class _DropClosedLoopErrors:
    """sys.unraisablehook that drops the 'Event loop is closed' RuntimeErrors which tensorstore's threads
    report after orbax has given up on a damaged checkpoint (even after it returned); others pass on."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, info):
        if not (isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value)):
            self.hook(info)


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Orbax's absl warnings and errors (about handler choices when saving, about a damaged checkpoint
    when restoring, the tracebacks its threads log when a write fails before the error is raised) off
    for the block, and `_DropClosedLoopErrors` installed: `twin convert` reports in its own words instead."""
    import logging
    import sys

    absl = logging.getLogger("absl")
    level = absl.level
    if not isinstance(sys.unraisablehook, _DropClosedLoopErrors):
        sys.unraisablehook = _DropClosedLoopErrors(sys.unraisablehook)
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


def _nest(paths: list[tuple[str, ...]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = 0
    return tree


def _merge(into: dict[str, Any], tree: Mapping[str, Any]) -> None:
    for name, value in tree.items():
        if isinstance(value, Mapping):
            _merge(into.setdefault(name, {}), value)
        else:
            into[name] = value


ORBAX_GROUP_BYTES = 64 << 20


def _column_major_kernels(tree: Any) -> Any:
    """Dense kernels (in, out) re-laid column-major (the same values, a transposed copy made while the
    restored group is fresh) so that the canonical (out, in) transpose later is a free view; copying
    them all at the end would leave the freed originals as holes in the heap."""
    if isinstance(tree, Mapping):
        return {k: (contiguous(v.T).T if k == "kernel" and np.ndim(v) == 2 else _column_major_kernels(v))
                for k, v in tree.items()}
    return tree


def _read_orbax(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The params of an orbax checkpoint as numpy arrays, restored in groups of about 64 MiB (a whole
    restore holds tensorstore's buffers for every array at once); a train state's other entries
    (optimizer moments, step) are not read."""
    import jax
    import orbax.checkpoint as ocp

    try:
        with quiet_orbax(), ocp.PyTreeCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path.resolve())
            custom = metadata.custom_metadata or {}
            tree = metadata.item_metadata.tree
            prefix: tuple[str, ...] = ()
            while isinstance(tree, Mapping) and "params" in tree:
                tree, prefix = tree["params"], prefix + ("params",)
            leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
            if not all(isinstance(k, jax.tree_util.DictKey) for p, _ in leaves for k in p):
                return checkpointer.restore(path.resolve()), custom.get(ORBAX_CONFIG_KEY)
            restored: dict[str, Any] = {}
            group: list[tuple[str, ...]] = []
            size = 0
            for i, (keys, meta) in enumerate(leaves):
                group.append(prefix + tuple(str(k.key) for k in keys))
                size += int(np.prod(meta.shape)) * np.dtype(meta.dtype).itemsize
                if size >= ORBAX_GROUP_BYTES or i == len(leaves) - 1:
                    item = _nest(group)
                    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
                    part = checkpointer.restore(path.resolve(), args=ocp.args.PyTreeRestore(
                        item=item, restore_args=args, partial_restore=True))
                    _merge(restored, _column_major_kernels(part))
                    group, size = [], 0
    except Exception as e:  # noqa: BLE001
        raise _fail(path, f"not a readable orbax checkpoint ({_short(e)})") from None
    return restored, custom.get(ORBAX_CONFIG_KEY)


READERS = {"safetensors": _read_safetensors, "torch": _read_torch, "msgpack": _read_msgpack,
           "orbax": _read_orbax}


def _flat_items(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flat_items(v, f"{prefix}/{k}" if prefix else str(k))
    else:
        yield prefix, tree


def _flax_params(tree: Any, path: Path) -> dict[str, Any]:
    while isinstance(tree, Mapping) and "params" in tree:
        tree = tree["params"]
    if not isinstance(tree, dict):
        raise _fail(path, f"expected a Flax params tree (nested dicts of arrays), got {type(tree).__name__}")
    for key, leaf in _flat_items(tree):
        if not isinstance(leaf, np.ndarray) and not hasattr(leaf, "__array__"):
            raise _fail(path, f"{key!r} holds a {type(leaf).__name__}, not an array")
    return tree


def load_config_file(path: str | os.PathLike) -> TransformerConfig:
    """A config.json (or a directory holding one) -> TransformerConfig; FormatError naming the file."""
    path = Path(path)
    try:
        return read_config(path / CONFIG_FILE if path.is_dir() else path)
    except CheckpointError as e:
        raise FormatError(str(e)) from None


def _check_dtypes(items: Iterator[tuple[str, Any]], path: Path, allow_nonfinite: bool) -> None:
    for key, value in items:
        dtype = str(np.asarray(value).dtype)
        if dtype not in WEIGHT_DTYPES:
            raise _unconvertible(path, key, dtype)
        if not allow_nonfinite:
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            if bad:
                raise _fail(path, f"{key!r} has {bad} NaN/Inf value(s) (pass --allow-nonfinite to convert anyway)")


# (key in the file's own names, axis holding the vocabulary or classes, config field)
_VOCAB_KEYS = (("src_embed.weight", 0, "src_vocab_size"), ("tgt_embed.weight", 0, "tgt_vocab_size"),
               ("generator.weight", 0, "tgt_vocab_size"), ("generator.bias", 0, "tgt_vocab_size"),
               ("classifier.weight", 0, "num_classes"), ("classifier.bias", 0, "num_classes"),
               ("src_embed/embedding", 0, "src_vocab_size"), ("tgt_embed/embedding", 0, "tgt_vocab_size"),
               ("generator/kernel", 1, "tgt_vocab_size"), ("generator/bias", 0, "tgt_vocab_size"),
               ("classifier/kernel", 1, "num_classes"), ("classifier/bias", 0, "num_classes"))


def _check_vocab(flat_shapes: Mapping[str, tuple[int, ...]], cfg: TransformerConfig, path: Path) -> None:
    """The config's vocabulary sizes and num_classes against the weights that hold them (the arch's own keys)."""
    own = set(canonical_shapes(cfg)) | {"/".join(p) for p in flax_key_map(cfg)}
    for key, axis, name in _VOCAB_KEYS:
        shape = flat_shapes.get(key)
        if key in own and shape is not None and len(shape) > axis and shape[axis] != getattr(cfg, name):
            raise _fail(path, f"the config's {name} is {getattr(cfg, name)} but {key!r} has shape "
                        f"{tuple(shape)} ({shape[axis]} entries)")


def guess_arch(keys: Iterable[str]) -> str | None:
    """The arch that weights with these keys (canonical, Flax or torch.nn names) belong to, by their stacks."""
    tops = {re.split(r"[./]", k, maxsplit=1)[0] for k in keys}
    encoder, decoder = bool(tops & {"encoder", "layers"}), "decoder" in tops
    return "seq2seq" if encoder and decoder else "encoder" if encoder else "decoder" if decoder else None


def _arch_hint(keys: Iterable[str], cfg: TransformerConfig) -> str:
    """Why weights may not match the config's arch, or ''."""
    keys = list(keys)
    guess = guess_arch(keys)
    if guess is not None and guess != cfg.arch:
        return f" (the config's arch is {cfg.arch!r}; the weights look like arch {guess!r})"
    if cfg.arch == "decoder" and any("cross_attn" in k for k in keys):
        return " (arch 'decoder' has no cross-attention: the weights look like the decoder of a seq2seq model)"
    if cfg.arch == "encoder" and cfg.num_classes is None and any(k.startswith("classifier") for k in keys):
        return " (the weights have a classification head: the config needs num_classes)"
    return ""


def read_checkpoint(src: str | os.PathLike, config: str | os.PathLike | TransformerConfig | None = None,
                    allow_nonfinite: bool = False) -> Loaded:
    """Read any supported checkpoint into canonical weights, checked against its config.

    The config comes from `config` (a TransformerConfig, a config.json or a directory holding one),
    else the file's own metadata (safetensors, orbax), else a config.json in SRC's directory.
    """
    src = Path(src)
    container, path = detect(src)
    given = config if isinstance(config, TransformerConfig) or config is None else load_config_file(config)
    raw, embedded = READERS[container](path)
    if given is not None:
        cfg, config_source = given, "the caller" if config is given else str(config)
    else:
        beside = (path if path.is_dir() else path.parent) / CONFIG_FILE
        if embedded is not None:
            try:
                cfg, config_source = TransformerConfig.from_dict(embedded), f"{container} metadata"
            except (ValueError, TypeError) as e:
                raise _fail(path, f"the config in its metadata is not valid: {e}") from None
        elif beside.is_file():
            cfg, config_source = load_config_file(beside), str(beside)
        else:
            raise _fail(path, f"carries no config and there is no {CONFIG_FILE} beside it: pass --config "
                        "CONFIG.json")
    if container in ("msgpack", "orbax"):
        tree = _flax_params(raw, path)
        _check_dtypes(_flat_items(tree), path, allow_nonfinite)
        _check_vocab({k: np.shape(v) for k, v in _flat_items(tree)}, cfg, path)
        names = "flax"
        keys = [k for k, _ in _flat_items(tree)]
        try:
            weights = flax_to_canonical(tree, cfg, consume=True)
        except ConversionError as e:
            raise _fail(path, f"{e}{_arch_hint(keys, cfg)}") from None
    else:
        _check_dtypes(iter(raw.items()), path, allow_nonfinite)
        nn_names = any(k.endswith("in_proj_weight") for k in raw)
        names = "nn-transformer" if nn_names else "canonical"
        _check_vocab({k: v.shape for k, v in raw.items()}, cfg, path)
        try:
            weights = from_nn_state_dict(raw, cfg) if nn_names else raw
            check_canonical(weights, cfg)
            check_ties(weights, cfg)
        except ConversionError as e:
            hint = _arch_hint(raw, cfg)
            if not hint and nn_names and "missing key" in str(e):
                hint = (" (nn.TransformerEncoder has no embedding or classification head" if cfg.arch == "encoder"
                        else " (nn.Transformer has no embeddings or output layer") + \
                    ": save them beside its state dict under these canonical names)"
            raise _fail(path, f"{e}{hint}") from None
        weights = {k: weights[k] for k in canonical_shapes(cfg)}
    parent = path if path.is_dir() else path.parent
    companions = [parent / n for n in COMPANIONS if src.is_dir() and (parent / n).is_file()]
    return Loaded(cfg, weights, container, names, path, config_source, companions)


# ---------------------------------------------------------------------------------------------- writing

def output_layout(dst: str | os.PathLike, target: str) -> tuple[str, bool]:
    """(container, is_file) that `target` writes at `dst`: a file by its suffix, else a directory."""
    if target not in TARGETS:
        raise FormatError(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
    suffix = Path(dst).suffix
    if suffix in FILE_SUFFIXES:
        container = FILE_SUFFIXES[suffix]
        if container not in TARGET_CONTAINERS[target]:
            allowed = [s for s, c in FILE_SUFFIXES.items() if c in TARGET_CONTAINERS[target]]
            raise FormatError(f"{dst}: --to {target} writes {', '.join(allowed)} files or a directory, "
                              f"not {suffix}")
        return container, True
    return ("orbax" if target == "flax" else FILE_SUFFIXES[Path(DIR_FILES[target]).suffix]), False


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*")] + [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _contiguous(weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: contiguous(to_numpy(v)) for k, v in weights.items()}


_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)|os_error_code='(\d+)'")


def _os_error(e: BaseException, path: Path) -> OSError | None:
    """The OS error (a full disk, ...) that a library reports inside its own exception's message, as an
    OSError naming `path`; None when the message carries none."""
    found = _OS_ERROR_CODE.search(str(e))
    if found is None:
        return None
    code = int(found.group(1) or found.group(2))
    return OSError(code, os.strerror(code), str(path))


@contextlib.contextmanager
def _os_errors(path: Path, *types: type[BaseException]) -> Iterator[None]:
    """A library exception of `types` whose message carries an OS error re-raised as that OSError (`_os_error`)."""
    try:
        yield
    except types as e:
        error = _os_error(e, path)
        if error is None:
            raise
        raise error from e


def _save_safetensors(tmp: Path, arrays: Mapping[str, np.ndarray], cfg: TransformerConfig, names: str) -> None:
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    with _os_errors(tmp, SafetensorError):
        save_file(_contiguous(arrays), str(tmp), metadata={"format": "twin-transformer", "names": names,
                                                           "config": cfg.to_json()})


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


def _save_torch(tmp: Path, arrays: Mapping[str, np.ndarray]) -> None:
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


def _msgpack_length(n: int, codes: tuple[int, int, int]) -> bytes:
    """msgpack's 8/16/32-bit length prefix: bin (c4, c5, c6) or ext (c7, c8, c9)."""
    for code, width in zip(codes, (1, 2, 4)):
        if n < 1 << (8 * width):
            return bytes([code]) + n.to_bytes(width, "big")
    raise FormatError(f"an array of {n} bytes is too large for msgpack")


_FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def _ndarray_head(packer, a: np.ndarray, code: int) -> bytes:
    """What flax.serialization writes before an array's raw bytes: ExtType(ndarray, packb((shape, dtype
    name, bytes))) up to the bytes themselves (tests compare with `msgpack_serialize`, byte for byte)."""
    inner = (packer.pack_array_header(3) + packer.pack(list(a.shape)) + packer.pack(a.dtype.name)
             + _msgpack_length(a.nbytes, (0xC4, 0xC5, 0xC6)))
    n = len(inner) + a.nbytes
    return (bytes([_FIXEXT[n]]) if n in _FIXEXT else _msgpack_length(n, (0xC7, 0xC8, 0xC9))) + bytes([code]) + inner


def _save_msgpack(tmp: Path, tree: Mapping[str, Any]) -> None:
    """flax.serialization msgpack written leaf by leaf, each array's buffer straight into the file."""
    import msgpack
    from flax import serialization

    if any(np.asarray(v).nbytes > serialization.MAX_CHUNK_SIZE for _, v in _flat_items(tree)):
        tmp.write_bytes(serialization.msgpack_serialize(tree))  # flax splits such arrays into chunks
        return
    packer = msgpack.Packer(use_bin_type=True, strict_types=True)
    code = int(serialization._MsgpackExtType.ndarray)

    def pack(f, node):
        if isinstance(node, Mapping):
            f.write(packer.pack_map_header(len(node)))
            for k in sorted(node):  # flax's tree_map sorts dict keys
                f.write(packer.pack(k))
                pack(f, node[k])
        else:
            a = contiguous(to_numpy(node))
            f.write(_ndarray_head(packer, a, code))
            f.write(a.reshape(-1).view(np.uint8))

    with open(tmp, "wb") as f:
        pack(f, tree)


def _settled_numpy_handler():
    """orbax's NumpyHandler, except that a failed save is reported only once every array's write has
    finished. orbax gathers the tensorstore writes and raises at the first failure (a full disk); the
    others stay in flight and recreate files under the temporary directory after it has been removed.
    (`_background_serialize` and `_open_and_write` are orbax's own hooks; where a version has other
    ones, this is plain NumpyHandler.)"""
    from orbax.checkpoint import type_handlers

    class SettledNumpyHandler(type_handlers.NumpyHandler):
        _failures: list[BaseException] | None = None

        async def _open_and_write(self, *args, **kwargs):
            if self._failures is None:  # not called from _background_serialize: orbax's own behaviour
                return await super()._open_and_write(*args, **kwargs)
            try:
                await super()._open_and_write(*args, **kwargs)
            except Exception as e:
                self._failures.append(e)

        async def _background_serialize(self, *args, **kwargs):
            self._failures = []
            try:
                await super()._background_serialize(*args, **kwargs)
                if self._failures:
                    raise self._failures[0]
            finally:
                self._failures = None

    return SettledNumpyHandler(deepcopy_host_arrays=False)


def _save_orbax(tmp: Path, tree: Mapping[str, Any], cfg: TransformerConfig) -> None:
    """Orbax PyTree checkpoint of numpy arrays, written from the arrays themselves (no host copies),
    one zarr array per param in 16 MiB chunks (OCDBT would hold the encoded data until commit),
    uncompressed (float weights shrink by under 10% and restore 4x slower). A save that fails or is
    interrupted returns only when orbax's writer threads have stopped, so nothing writes under `tmp` after."""
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=16 << 20), tree)
    before = set(threading.enumerate())
    with quiet_orbax():
        registry = type_handlers.create_type_handler_registry((np.ndarray, _settled_numpy_handler()))
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False, type_handler_registry=registry)
        try:
            with ocp.Checkpointer(handler) as checkpointer, _os_errors(tmp, ValueError, RuntimeError):
                # tensorstore's RESOURCE_EXHAUSTED etc.
                checkpointer.save(tmp.resolve(), args=ocp.args.PyTreeSave(tree, save_args=save_args),
                                  custom_metadata={ORBAX_CONFIG_KEY: cfg.to_dict()})
        except BaseException:  # e.g. Ctrl-C while orbax's commit threads still write
            for thread in set(threading.enumerate()) - before:
                if type(thread).__module__.startswith("orbax."):
                    thread.join()
            raise


def _write_container(tmp: Path, container: str, target: str, cfg: TransformerConfig,
                     weights: Mapping[str, np.ndarray]) -> None:
    if target == "flax":
        tree = {"params": canonical_to_flax(weights, cfg)}
        (_save_orbax(tmp, tree, cfg) if container == "orbax" else _save_msgpack(tmp, tree))
        return
    arrays: Mapping[str, Any] = weights
    names = "canonical"
    if target == "nn-transformer":
        outside = {k: v for k, v in weights.items() if k.startswith(OUTSIDE_STACKS)}
        arrays, names = {**to_nn_state_dict(weights, cfg), **outside}, "nn-transformer"
    (_save_safetensors(tmp, arrays, cfg, names) if container == "safetensors" else _save_torch(tmp, arrays))


def _temp_name(dst: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=temp_prefix(dst), suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.unlink(name)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _install(tmp: Path, dst: Path, force: bool) -> None:
    """Rename the finished `tmp` to `dst`; an existing `dst` is replaced only with `force`."""
    if dst.exists() or dst.is_symlink():
        if not force:
            raise FormatError(f"{dst}: exists (pass --force to replace it)")
        old = _temp_name(dst)
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        _remove(old)
    else:
        os.rename(tmp, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_destination(dst: str | os.PathLike, target: str, force: bool,
                      src: str | os.PathLike | None = None) -> tuple[str, bool]:
    """Refuse early what `write_checkpoint` would refuse at the end: returns `output_layout`."""
    dst = Path(dst)
    layout = output_layout(dst, target)
    try:
        if not dst.parent.is_dir():
            raise FormatError(f"{dst}: {dst.parent} is a file, not a directory" if dst.parent.exists() else
                              f"{dst}: the directory {dst.parent} does not exist")
        if not os.access(dst.parent, os.W_OK):
            raise FormatError(f"{dst}: the directory {dst.parent} is not writable")
        exists = dst.exists() or dst.is_symlink()
        if src is not None and exists and (Path(src).resolve() == dst.resolve()
                                           or dst.resolve() in Path(src).resolve().parents):
            raise FormatError(f"{dst}: is the source (or holds it); write the result somewhere else")
    except OSError as e:  # e.g. a name too long, a symlink loop
        raise FormatError(str(WriteError(e.errno, e.strerror or str(e), str(dst)))) from None
    if exists and not force:
        raise FormatError(f"{dst}: exists (pass --force to replace it)")
    return layout


def _free_bytes(directory: Path) -> int | None:
    """Bytes this process may still write under `directory` (root may use the blocks reserved for it);
    None where the file system reports no sizes (some FUSE and network file systems)."""
    st = os.statvfs(directory)
    if st.f_blocks == 0:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _check_space(dst: Path, weights: Mapping[str, np.ndarray]) -> None:
    """Refuse a write that cannot fit before starting it: the tensors' bytes (tied names once: a lower
    bound on every container's size) against the free space of DST's file system. Only a lower bound:
    quotas, other writers and the containers' own overhead are left to the write itself."""
    needed = sum(np.asarray(a).nbytes for a in {id(a): a for a in weights.values()}.values())
    try:
        free = _free_bytes(dst.parent)
    except OSError:
        return
    if free is not None and needed > free:
        raise FormatError(f"cannot write {dst}: {os.strerror(errno.ENOSPC)} ({needed / 1e6:,.1f} MB of tensors, "
                          f"{free / 1e6:,.1f} MB free)")


def write_checkpoint(dst: str | os.PathLike, target: str, cfg: TransformerConfig,
                     weights: Mapping[str, np.ndarray], force: bool = False,
                     companions: list[Path] | None = None) -> Path:
    """Write canonical weights as `target` at `dst` (a file by suffix, else a directory), atomically. A write
    that fails (a full disk, ...) is a FormatError "cannot write DST[/FILE]: REASON"; nothing is left behind
    and an existing `dst` is untouched. A disk without room for the tensors is refused before writing."""
    dst = Path(dst)
    container, is_file = check_destination(dst, target, force)
    if target == "nn-transformer" and cfg.arch == "decoder":
        raise FormatError(f"{dst}: --to nn-transformer needs arch 'seq2seq' (nn.Transformer) or 'encoder' "
                          "(nn.TransformerEncoder); a decoder-only model has no torch.nn counterpart "
                          "(nn.TransformerDecoder layers always have cross-attention)")
    check_canonical(weights, cfg)
    _check_space(dst, weights)
    try:
        tmp = _temp_name(dst)
    except OSError as e:
        raise FormatError(str(WriteError(e.errno, e.strerror or str(e), str(dst)))) from None
    try:
        if is_file:
            _write_container(tmp, container, target, cfg, weights)
            os.chmod(tmp, 0o666 & ~_umask())
        elif container == "orbax":
            _write_container(tmp, container, target, cfg, weights)
        else:
            tmp.mkdir()
            _write_container(tmp / DIR_FILES[target], container, target, cfg, weights)
        if not is_file:
            atomic_write_bytes(tmp / CONFIG_FILE, cfg.to_json().encode())
            for companion in companions or ():
                shutil.copyfile(companion, tmp / companion.name)
            os.chmod(tmp, 0o777 & ~_umask())
        _fsync_tree(tmp)
        _install(tmp, dst, force)
    except BaseException as e:
        _remove(tmp)
        for leftover in dst.parent.glob(glob.escape(tmp.name) + "*"):  # orbax's own temporary directory
            _remove(leftover)
        if not isinstance(e, OSError):
            raise
        failed = WriteError(e.errno, e.strerror or str(e), e.filename if e.filename is not None else str(tmp))
        raise FormatError(str(renamed(failed, tmp, dst))) from e
    return dst


def cast(weights: Mapping[str, np.ndarray], dtype: str | None) -> dict[str, np.ndarray]:
    """Weights in `dtype` (None: unchanged); tied names stay one array."""
    if dtype is None:
        return dict(weights)
    if dtype not in WEIGHT_DTYPES:
        raise FormatError(f"unknown dtype {dtype!r}: choose from {', '.join(WEIGHT_DTYPES)}")
    from parity.suite import np_dtype

    target = np_dtype(dtype)
    done: dict[int, np.ndarray] = {}
    out = {}
    for key, value in weights.items():
        if id(value) not in done:
            done[id(value)] = value if value.dtype == target else value.astype(target)
        out[key] = done[id(value)]
    return out
