"""Checkpoint files in the formats users have: detected, read without pickle, written atomically.

Containers and the names inside them (one module each; `DETECTION` is how a path is recognised):

    safetensors    a `.safetensors` file: canonical or torch.nn.Transformer names; the config rides in
                   the header's metadata (`"config"`)
    torch          a `.pt`/`.pth`/`.bin` state dict read with `torch.load(weights_only=True)` only
                   (`torch_pt`): canonical or nn.Transformer names (`module.` / `_orig_mod.` prefixes and a
                   `{"state_dict": ...}` wrapper are accepted)
    msgpack        a `.msgpack` file of `flax.serialization`: the Flax variables `{"params": ...}`
    orbax          an orbax checkpoint directory (Flax's standard): `{"params": ...}` (or a train state
                   holding `params`); the config rides in its custom metadata

A directory with `config.json` and one weights file reads as that file with that config. Targets
(`twin convert --to`): `safetensors`, `torch`, `nn-transformer` (nn.Transformer names, with the
embeddings and output layer beside them under their canonical names; for an encoder checkpoint
nn.TransformerEncoder names, with `src_embed` and the classification head beside them; a decoder-only
checkpoint has no torch.nn counterpart: `nn_transformer`) and `flax` (orbax, or msgpack when DST ends in
`.msgpack`). The config, with its `arch` and `num_classes`, travels in the safetensors metadata, the orbax
metadata and config.json. A DST without a weights suffix is a directory: config.json plus the
weights (`DIR_FILES`; for flax the directory is the orbax checkpoint).

Every failure is a FormatError whose one-line message names the file, and the key with expected and
actual shape or dtype where there is one. Writes go to a temporary name, are fsynced and renamed;
nothing is left behind on failure. A checkpoint is never held twice: safetensors and zip `.pt` files
are memory-mapped and used in place, orbax params are restored in groups of about 64 MiB and written
from the arrays themselves, msgpack is streamed leaf by leaf both ways, and Flax kernels are
transposed one at a time (`benchmarks/bench_convert.py` measures peak RSS on a 1.1 GB checkpoint).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from parity.checkpoint import CONFIG_FILE, CheckpointError, WriteError, _umask, atomic_write_bytes, read_config, renamed
from parity.config import TransformerConfig
from parity.convert import ConversionError, aliases, canonical_to_flax, check_canonical, check_ties, flax_key_map, \
    flax_to_canonical
from parity.formats import ctranslate2, msgpack, nn_transformer, orbax, safetensors, torch_pt
from parity.formats.common import (WEIGHT_DTYPES, FormatError, _check_space, _fail, _flat_items, _free_bytes,
                                   _fsync_tree, _install, _read_head, _remove, _temp_name, _unconvertible, cast,
                                   return_large_frees_to_os)
from parity.formats.msgpack import save as _save_msgpack  # noqa: F401 (the name tests write msgpack with)
from parity.formats.orbax import ORBAX_CONFIG_KEY, ORBAX_GROUP_BYTES, ORBAX_MARKERS, quiet_orbax
from parity.formats.safetensors import SAFETENSORS_MAX_HEADER
from parity.formats.torch_pt import SUFFIXES as TORCH_SUFFIXES
from parity.names import canonical_shapes

__all__ = ["COMPANIONS", "DETECTION", "DIR_FILES", "FILE_SUFFIXES", "Format", "FormatError", "Loaded",
           "ORBAX_CONFIG_KEY", "ORBAX_GROUP_BYTES", "ORBAX_MARKERS", "READERS", "SAFETENSORS_MAX_HEADER",
           "TARGETS", "TARGET_CONTAINERS", "TORCH_SUFFIXES", "WEIGHT_DTYPES", "cast", "check_destination", "detect",
           "guess_arch", "load_config_file", "output_layout", "quiet_orbax", "read_checkpoint", "read_weight_file",
           "return_large_frees_to_os", "write_checkpoint"]

TARGETS = ("torch", "flax", "safetensors", nn_transformer.TARGET, "hf-marian", "ctranslate2")
FILE_SUFFIXES = {safetensors.SUFFIX: "safetensors", msgpack.SUFFIX: "msgpack", **{s: "torch" for s in TORCH_SUFFIXES}}
# target -> file containers it may write, by DST suffix
TARGET_CONTAINERS = {"safetensors": ("safetensors",), "torch": ("torch",), "nn-transformer": ("torch", "safetensors"),
                     "flax": ("msgpack",), "hf-marian": (), "ctranslate2": ()}
DIR_FILES = {"safetensors": "model.safetensors", "torch": "pytorch_model.bin", "nn-transformer": "nn_transformer.pt"}
# copied from a SRC directory into a DST directory: the project's tokenizer, a Hugging Face tokenizer's files and
# generation_config.json (the decoder start and eos ids of an imported model)
COMPANIONS = ("tokenizer.json", "source.spm", "target.spm", "vocab.json", "target_vocab.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json")


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


# ---------------------------------------------------------------------------------------------- detection

@dataclass(frozen=True)
class Format:
    """One row of `DETECTION`: a container, how a path is recognised as it, and how it is read.

    kind "directory": `test(path)`, tried before a directory is read as the one weights file in it;
    kind "file": `test(first 16 bytes, suffix)` of a non-empty file. `read(path)` -> (the arrays, or a
    Flax params tree when `flax`; the config the checkpoint carries as a dict, or None). A format that reads
    into canonical weights and a config by itself (a foreign config.json) gives `load(path, config,
    allow_nonfinite) -> Loaded` instead, and `read_checkpoint` returns what it gives.
    """

    container: str
    kind: str
    test: Callable[..., bool]
    read: Callable[[Path], tuple[Any, dict[str, Any] | None]] | None = None
    flax: bool = False
    load: Callable[[Path, Any, bool], Loaded] | None = None


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """`safetensors.read` under this package's SAFETENSORS_MAX_HEADER (the one setting of it; tests lower it)."""
    return safetensors.read(path, SAFETENSORS_MAX_HEADER)


def _hf_type(path: Path) -> str | None:
    from parity.formats.hf_dir import hf_config

    return (hf_config(path) or {}).get("model_type")


def _load_hf(path: Path, config: Any, allow_nonfinite: bool) -> Loaded:
    """A Hugging Face directory (hf_dir): its own config.json says what the model is; --config cannot."""
    from parity.formats.hf_dir import read_hf_dir

    if config is not None:
        raise _fail(path, "is a Hugging Face model directory, whose config.json describes the model: "
                    "drop --config")
    loaded = read_hf_dir(path)
    _check_dtypes(iter(loaded.weights.items()), loaded.path, allow_nonfinite)
    return loaded


def _refuse_ct2(path: Path, config: Any, allow_nonfinite: bool) -> Loaded:
    raise _fail(path, "is a CTranslate2 model, which twin convert writes but does not read (its weights may be "
                "quantized): convert the checkpoint it was made from")


# First match wins, directories and files each in this order. Adding a format: one row, one module.
DETECTION: tuple[Format, ...] = (
    Format("ctranslate2", "directory", ctranslate2.looks_like_ct2, load=_refuse_ct2),
    Format("hf-marian", "directory", lambda p: _hf_type(p) == "marian", load=_load_hf),
    Format("fsmt", "directory", lambda p: _hf_type(p) == "fsmt", load=_load_hf),
    Format("orbax", "directory", orbax.is_checkpoint, orbax.read, flax=True),
    Format("torch", "file", torch_pt.is_zip, torch_pt.read),
    Format("safetensors", "file", safetensors.is_safetensors, _read_safetensors),
    Format("msgpack", "file", msgpack.is_msgpack, msgpack.read, flax=True),
    Format("torch", "file", torch_pt.is_legacy_pickle, torch_pt.read),
)
FORMATS = {f.container: f for f in DETECTION}
READERS = {f.container: f.read for f in DETECTION}


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
        for f in DETECTION:
            if f.kind == "directory" and f.test(path):
                return f.container, path
        if path.suffix in FILE_SUFFIXES:
            raise _fail(path, "is a directory where a file was expected")
        candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES)
        standard = [p for p in candidates if p.name in (*DIR_FILES.values(), "flax_model.msgpack")]
        if len(standard) == 1 or len(candidates) == 1:
            return detect((standard or candidates)[0])
        if not candidates:
            raise _fail(path, "is a directory where a file was expected: it holds no weights file "
                        f"({', '.join(FILE_SUFFIXES)}) and is not an orbax checkpoint or a Hugging Face Marian/FSMT "
                        "directory (config.json with a model_type)")
        raise _fail(path, f"holds several weights files ({', '.join(p.name for p in candidates)}): name one")
    head, size = _read_head(path, 16)
    if size == 0:
        raise _fail(path, "empty file")
    for f in DETECTION:
        if f.kind == "file" and f.test(head, path.suffix):
            return f.container, path
    raise _fail(path, "unrecognised format (not safetensors, a PyTorch state dict or flax msgpack; orbax "
                "checkpoints and Hugging Face Marian/FSMT models are directories)")


# ---------------------------------------------------------------------------------------------- reading

def read_weight_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{key: array} of one safetensors or PyTorch weights file, in its own names and stored dtypes."""
    container, path = detect(path)
    if FORMATS[container].kind != "file" or FORMATS[container].flax:
        raise _fail(path, f"is {container}, not a safetensors or PyTorch weights file")
    return READERS[container](path)[0]


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
    fmt = FORMATS[container]
    if fmt.load is not None:
        return fmt.load(path, config, allow_nonfinite)
    given = config if isinstance(config, TransformerConfig) or config is None else load_config_file(config)
    raw, embedded = fmt.read(path)
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
    if fmt.flax:
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
        nn_names = nn_transformer.has_nn_names(raw)
        names = nn_transformer.TARGET if nn_names else "canonical"
        _check_vocab({k: v.shape for k, v in raw.items()}, cfg, path)
        try:
            weights = nn_transformer.from_nn_state_dict(raw, cfg) if nn_names else raw
            check_canonical(weights, cfg)
            check_ties(weights, cfg)
        except ConversionError as e:
            hint = _arch_hint(raw, cfg)
            if not hint and nn_names and "missing key" in str(e):
                hint = nn_transformer.missing_hint(cfg)
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
    if target in ("hf-marian", "ctranslate2"):
        return target, False
    return ("orbax" if target == "flax" else FILE_SUFFIXES[Path(DIR_FILES[target]).suffix]), False


def _write_container(tmp: Path, container: str, target: str, cfg: TransformerConfig,
                     weights: Mapping[str, np.ndarray]) -> None:
    if target == "flax":
        tree = {"params": canonical_to_flax(weights, cfg)}
        (orbax.save(tmp, tree, cfg) if container == "orbax" else msgpack.save(tmp, tree))
        return
    arrays: Mapping[str, Any] = weights
    names = "canonical"
    if target == nn_transformer.TARGET:
        arrays, names = nn_transformer.file_arrays(weights, cfg), nn_transformer.TARGET
    (safetensors.save(tmp, arrays, cfg, names) if container == "safetensors" else torch_pt.save(tmp, arrays))


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


def _ct2_tokenizer(dst: Path, cfg: TransformerConfig, companions: list[Path] | None) -> tuple[Any, str]:
    """(tokenizer, where) for --to ctranslate2, its vocabulary checked; FormatError where there is none."""
    from parity.tokenizer import TokenizerError, load_any

    names = [p.name for p in companions or ()]
    if not names:
        raise FormatError(f"{dst}: --to ctranslate2 needs the model's tokenizer (a CTranslate2 model holds its "
                          f"vocabulary): SRC must be a directory with tokenizer.json or a Hugging Face tokenizer")
    directory = companions[0].parent
    try:
        tokenizer = load_any(directory)
        ctranslate2.vocabularies(cfg, tokenizer, str(directory))
    except (TokenizerError, ctranslate2.CT2Error) as e:
        raise FormatError(f"{dst}: {e}") from None
    return tokenizer, str(directory)


def write_checkpoint(dst: str | os.PathLike, target: str, cfg: TransformerConfig,
                     weights: Mapping[str, np.ndarray], force: bool = False,
                     companions: list[Path] | None = None, special_ids: Mapping[str, int] | None = None,
                     quantization: str | None = None) -> Path:
    """Write canonical weights as `target` at `dst` (a file by suffix, else a directory), atomically. A write
    that fails (a full disk, ...) is a FormatError "cannot write DST[/FILE]: REASON"; nothing is left behind
    and an existing `dst` is untouched. A disk without room for the tensors is refused before writing.
    `special_ids` (pad_id, eos_id, decoder_start_id): the tokenizer's, for --to hf-marian's config.
    `quantization`: --to ctranslate2's weight type (None: the weights' own, float32 or float16); that target
    needs the tokenizer among `companions` (its vocabulary goes into the model)."""
    dst = Path(dst)
    container, is_file = check_destination(dst, target, force)
    if target == nn_transformer.TARGET:
        nn_transformer.check_target(dst, cfg)
    if target == ctranslate2.TARGET:
        try:
            ctranslate2.check_config(cfg)
        except ctranslate2.CT2Error as e:
            raise FormatError(f"{dst}: {e}") from None
    check_canonical(weights, cfg)
    if target == "hf-marian":
        from parity.formats.hf_marian import MarianError, marian_config_fields

        try:
            marian_config_fields(cfg, eos_id=0)
        except MarianError as e:
            raise FormatError(f"{dst}: {e}") from None
    if quantization is not None and target != ctranslate2.TARGET:
        raise FormatError(f"{dst}: --quantization is for --to ctranslate2 (--to {target} keeps or --dtype casts "
                          f"the weights)")
    ct2_tokenizer = _ct2_tokenizer(dst, cfg, companions) if target == ctranslate2.TARGET else None
    _check_space(dst, weights, _free_bytes)  # this package's _free_bytes, which tests replace
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
        elif target == "hf-marian":
            from parity.formats.hf_dir import write_marian

            tmp.mkdir()
            write_marian(tmp, cfg, weights, list(companions or ()), special_ids)
            os.chmod(tmp, 0o777 & ~_umask())
        elif target == ctranslate2.TARGET:
            try:
                ctranslate2.write_ct2(tmp, cfg, weights, *ct2_tokenizer, quantization=quantization)
            except ctranslate2.CT2Error as e:
                raise FormatError(f"{dst}: {e}") from None
            for companion in companions or ():
                shutil.copyfile(companion, tmp / companion.name)
            os.chmod(tmp, 0o777 & ~_umask())
        else:
            tmp.mkdir()
            _write_container(tmp / DIR_FILES[target], container, target, cfg, weights)
        if not is_file and target not in ("hf-marian", ctranslate2.TARGET):
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
