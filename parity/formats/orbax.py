"""Orbax checkpoint directories (Flax's standard): `{"params": ...}` (or a train state holding `params`),
the config in the custom metadata. Params are restored in groups of about 64 MiB and written from the
arrays themselves, one uncompressed zarr array per param.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from parity.config import TransformerConfig
from parity.convert import contiguous
from parity.formats.common import _fail, _os_errors, _short

ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")
ORBAX_CONFIG_KEY = "twin_transformer_config"
ORBAX_GROUP_BYTES = 64 << 20


def is_checkpoint(path: Path) -> bool:
    """A directory holding orbax's metadata files."""
    return any((path / m).is_file() for m in ORBAX_MARKERS)


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


def _column_major_kernels(tree: Any) -> Any:
    """Dense kernels (in, out) re-laid column-major (the same values, a transposed copy made while the
    restored group is fresh) so that the canonical (out, in) transpose later is a free view; copying
    them all at the end would leave the freed originals as holes in the heap."""
    if isinstance(tree, Mapping):
        return {k: (contiguous(v.T).T if k == "kernel" and np.ndim(v) == 2 else _column_major_kernels(v))
                for k, v in tree.items()}
    return tree


def read(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
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


def save(tmp: Path, tree: Mapping[str, Any], cfg: TransformerConfig) -> None:
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
