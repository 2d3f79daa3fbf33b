"""What every format module shares: the error and its one-line messages, safe reads of a file's head,
the OS errors that libraries hide in their messages, the atomic install of a finished temporary file or
directory, the free-space check and the dtype cast.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from parity.checkpoint import temp_prefix

WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class FormatError(ValueError):
    """A checkpoint that cannot be read, converted or written; the message is one line naming the file."""


def return_large_frees_to_os() -> None:
    """glibc only, process-wide (the CLI calls it): blocks of 1 MiB and more get their own mappings,
    so an array freed after conversion (often allocated in a tensorstore thread's arena) goes back to
    the OS instead of staying in the heap; the default threshold grows to 32 MiB as arrays are freed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


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


def _flat_items(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(`a/b/c`, leaf) of a nested mapping, in its order."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flat_items(v, f"{prefix}/{k}" if prefix else str(k))
    else:
        yield prefix, tree


# ---------------------------------------------------------------------------------------------- writing

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


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*")] + [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def _free_bytes(directory: Path) -> int | None:
    """Bytes this process may still write under `directory` (root may use the blocks reserved for it);
    None where the file system reports no sizes (some FUSE and network file systems)."""
    st = os.statvfs(directory)
    if st.f_blocks == 0:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _check_space(dst: Path, weights: Mapping[str, np.ndarray],
                 free_bytes: Callable[[Path], int | None] = _free_bytes) -> None:
    """Refuse a write that cannot fit before starting it: the tensors' bytes (tied names once: a lower
    bound on every container's size) against `free_bytes` of DST's directory. Only a lower bound:
    quotas, other writers and the containers' own overhead are left to the write itself."""
    needed = sum(np.asarray(a).nbytes for a in {id(a): a for a in weights.values()}.values())
    try:
        free = free_bytes(dst.parent)
    except OSError:
        return
    if free is not None and needed > free:
        raise FormatError(f"cannot write {dst}: {os.strerror(errno.ENOSPC)} ({needed / 1e6:,.1f} MB of tensors, "
                          f"{free / 1e6:,.1f} MB free)")


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
