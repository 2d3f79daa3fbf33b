"""safetensors files: canonical or torch.nn.Transformer names, the config in the header's metadata
(`"config"`). Read as views of the memory-mapped file after the header is validated, without the
safetensors library or a framework; written with `safetensors.numpy`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from parity.checkpoint import parse_json
from parity.config import TransformerConfig
from parity.convert import contiguous, to_numpy
from parity.formats.common import FormatError, _fail, _os_errors, _read_head, _unconvertible

SUFFIX = ".safetensors"
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes: the safetensors library's own limit


def is_safetensors(head: bytes, suffix: str) -> bool:
    """By suffix, or by the header's opening brace after the 8-byte length."""
    return suffix == SUFFIX or (len(head) > 8 and head[8:9] == b"{")


def _counts(values: list[Any]) -> bool:
    """Every value a non-negative int (not a bool, not a float)."""
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def _safetensors_header(path: Path, max_header: int = SAFETENSORS_MAX_HEADER) -> tuple[dict[str, Any], int]:
    """(the validated JSON header, where the data starts): every tensor inside the file, its byte count
    matching its shape and dtype, its dtype convertible; a header over `max_header` bytes is refused unread."""
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
    if n > max_header:
        raise _fail(path, f"safetensors header length {n} bytes is more than the format allows "
                    f"({max_header} bytes)")
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


def read(path: Path, max_header: int = SAFETENSORS_MAX_HEADER) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """({key: array}, the config in the metadata or None). The arrays are views of the memory-mapped file
    (the format is laid out for this: a validated header, then each tensor's little-endian bytes), so
    nothing is copied and no framework is needed."""
    from parity.suite import np_dtype

    header, start = _safetensors_header(path, max_header)
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


def _contiguous(weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: contiguous(to_numpy(v)) for k, v in weights.items()}


def save(tmp: Path, arrays: Mapping[str, np.ndarray], cfg: TransformerConfig, names: str) -> None:
    """`arrays` under their own names at `tmp`, with the config and which names they are in the metadata."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    with _os_errors(tmp, SafetensorError):
        save_file(_contiguous(arrays), str(tmp), metadata={"format": "twin-transformer", "names": names,
                                                           "config": cfg.to_json()})
