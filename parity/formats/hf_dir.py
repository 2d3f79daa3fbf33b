"""Hugging Face `save_pretrained` directories: config.json with a `model_type` (marian, fsmt), weights in
model.safetensors (or shards with model.safetensors.index.json, or pytorch_model.bin, read with
weights_only=True), and the tokenizer files beside them. One reader for every model type; each type's
config and key mapping live in its own module (hf_marian, fsmt).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import numpy as np

from parity.config import TransformerConfig

MODEL_TYPES = {"marian": "parity.formats.hf_marian", "fsmt": "parity.formats.fsmt"}
CONTAINERS = {"marian": "hf-marian", "fsmt": "fsmt"}
HF_CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json", "target_vocab.json", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.json", "vocab-src.json", "vocab-tgt.json", "merges.txt")
GENERATION_CONFIG = "generation_config.json"


def _error(message: str):
    from parity.formats import FormatError

    return FormatError(message)


def module_for(model_type: str) -> ModuleType:
    """The module (hf_marian, fsmt) that maps this transformers model type."""
    return importlib.import_module(MODEL_TYPES[model_type])


def hf_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The config.json of a Hugging Face directory as a dict, or None where `path` is not one (no config.json
    with a "model_type"). An unsupported model_type is an error naming what is supported."""
    path = Path(path)
    file = path / HF_CONFIG
    if not path.is_dir() or not file.is_file():
        return None
    from parity.checkpoint import read_json

    try:
        data = read_json(file, "config")
    except ValueError as e:
        raise _error(str(e)) from None
    if not isinstance(data, dict) or "model_type" not in data:
        return None
    if data["model_type"] not in MODEL_TYPES:
        raise _error(f"{file}: model_type {data['model_type']!r} is not supported: twin reads Hugging Face "
                     f"{', '.join(MODEL_TYPES)} directories")
    return data


def _read_weight_file(path: Path) -> dict[str, np.ndarray]:
    from parity.formats import read_weight_file

    return read_weight_file(path)


def read_hf_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], Path]:
    """({transformers key: array}, the file read) from a directory's weights, in the stored dtype."""
    path = Path(path)
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            from parity.checkpoint import read_json

            index = read_json(file, "safetensors index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise _error(f"{file}: has no weight_map of key -> shard file")
            out: dict[str, np.ndarray] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = path / shard
                if Path(shard).name != shard or not shard_path.is_file():
                    raise _error(f"{file}: shard {shard!r} is not a file in {path}")
                out.update(_read_weight_file(shard_path))
            missing = sorted(set(weight_map) - set(out))
            if missing:
                raise _error(f"{file}: key {missing[0]} is not in its shard")
            return out, file
        return _read_weight_file(file), file
    raise _error(f"{path}: no weights: expected one of {', '.join(WEIGHT_FILES)}")


def read_hf_dir(path: str | os.PathLike, model_type: str | None = None):
    """A Hugging Face directory -> parity.formats.Loaded (canonical weights in the stored dtype)."""
    from parity.formats import Loaded

    path = Path(path)
    hf = hf_config(path)
    if hf is None:
        raise _error(f"{path}: not a Hugging Face model directory (no {HF_CONFIG} with a model_type)")
    if model_type is not None and hf["model_type"] != model_type:
        raise _error(f"{path / HF_CONFIG}: model_type is {hf['model_type']!r}, expected {model_type!r}")
    module = module_for(hf["model_type"])
    try:
        module.config_from_hf(hf, str(path / HF_CONFIG))
    except ValueError as e:
        raise _error(str(e)) from None
    weights, file = read_hf_weights(path)
    try:
        cfg, canonical = module.from_state_dict(weights, hf, str(file))
    except ValueError as e:
        raise _error(str(e)) from None
    companions = [path / n for n in TOKENIZER_FILES + (GENERATION_CONFIG,) if (path / n).is_file()]
    return Loaded(cfg, canonical, CONTAINERS[hf["model_type"]], CONTAINERS[hf["model_type"]], file,
                  str(path / HF_CONFIG), companions)


def special_ids(path: str | os.PathLike) -> dict[str, int]:
    """{"pad_id", "eos_id", "decoder_start_id"} of a Hugging Face directory's config.json."""
    hf = hf_config(path)
    if hf is None:
        raise _error(f"{path}: not a Hugging Face model directory")
    return module_for(hf["model_type"]).special_ids(hf, str(Path(path) / HF_CONFIG))


def companion_special_ids(companions: list[Path]) -> dict[str, int] | None:
    """The special ids a generation_config.json among `companions` records (a run converted from a Hugging Face
    directory), or None."""
    file = next((p for p in companions if p.name == GENERATION_CONFIG), None)
    if file is None:
        return None
    from parity.checkpoint import read_json

    data = read_json(file, "generation config")
    try:
        return {"pad_id": int(data["pad_token_id"]), "eos_id": int(data["eos_token_id"]),
                "decoder_start_id": int(data["decoder_start_token_id"])}
    except (KeyError, TypeError, ValueError):
        raise _error(f"{file}: needs integer pad_token_id, eos_token_id and decoder_start_token_id") from None


def generation_config(cfg: TransformerConfig, ids: Mapping[str, int], forbidden: list[int]) -> dict[str, Any]:
    """generation_config.json for an exported model: the twins' decoding rules in transformers' terms
    (bad_words_ids: the ids the twins never emit)."""
    return {"decoder_start_token_id": ids["decoder_start_id"], "eos_token_id": ids["eos_id"],
            "forced_eos_token_id": ids["eos_id"], "pad_token_id": cfg.pad_id, "bad_words_ids": [[i] for i in forbidden],
            "max_length": cfg.max_len, "num_beams": 4, "bos_token_id": None}


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


TWIN_SPECIAL_IDS = {"pad_id": 0, "decoder_start_id": 1, "eos_id": 2}  # parity.tokenizer's fixed <pad> <bos> <eos>


def write_marian(tmp: Path, cfg: TransformerConfig, weights: Mapping[str, np.ndarray], companions: list[Path],
                 ids: Mapping[str, int] | None = None) -> None:
    """Write a directory that transformers loads offline (`AutoModelForSeq2SeqLM` / `AutoTokenizer
    .from_pretrained`): config.json (MarianConfig), model.safetensors (transformers' keys), generation_config.json
    (the twins' decoding rules: bad_words_ids = the ids they never emit) and the tokenizer: a Hugging Face one
    among `companions` is copied as it is, the project's tokenizer.json is written as a PreTrainedTokenizerFast.
    `ids` (pad_id, eos_id, decoder_start_id) default to the project tokenizer's."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    from parity.decoding import forbidden_ids
    from parity.formats.common import _os_errors
    from parity.formats.safetensors import _contiguous
    from parity.formats.hf_marian import marian_config_fields, to_marian_state_dict

    ids = dict(TWIN_SPECIAL_IDS if ids is None else ids)
    fields = marian_config_fields(cfg, eos_id=ids["eos_id"], decoder_start_id=ids["decoder_start_id"])
    arrays = to_marian_state_dict(weights, cfg)
    with _os_errors(tmp / "model.safetensors", SafetensorError):
        save_file(_contiguous(arrays), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    dtype = str(next(iter(arrays.values())).dtype)
    write_json(tmp / HF_CONFIG, {**fields, "dtype": dtype})
    forbidden = list(forbidden_ids(cfg, ids["decoder_start_id"], ids["eos_id"]))
    write_json(tmp / GENERATION_CONFIG, generation_config(cfg, ids, forbidden))
    names = {p.name: p for p in companions}
    hf_files = [n for n in TOKENIZER_FILES if n in names and n != "tokenizer.json"]
    if hf_files:
        import shutil

        for name in hf_files + (["tokenizer.json"] if "tokenizer.json" in names else []):
            shutil.copyfile(names[name], tmp / name)
    elif "tokenizer.json" in names:
        from parity.hf_tokenizer import save_fast_tokenizer
        from parity.tokenizer import Tokenizer

        save_fast_tokenizer(Tokenizer.load(names["tokenizer.json"]), tmp)
