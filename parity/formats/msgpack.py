"""`.msgpack` files of `flax.serialization`: the Flax variables `{"params": ...}`. Streamed leaf by
leaf both ways: read with each array a view of its own bytes, written with each array's buffer straight
into the file, byte for byte what `flax.serialization.msgpack_serialize` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from parity.convert import contiguous, to_numpy
from parity.formats.common import FormatError, _fail, _flat_items, _read_head, _short

SUFFIX = ".msgpack"


def is_msgpack(head: bytes, suffix: str) -> bool:
    """By suffix, or by a leading msgpack map (fixmap, map 16, map 32)."""
    return suffix == SUFFIX or (head[0] in range(0x81, 0x90) or head[0] in (0xDE, 0xDF))


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


def read(path: Path) -> tuple[dict[str, Any], None]:
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


def save(tmp: Path, tree: Mapping[str, Any]) -> None:
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
