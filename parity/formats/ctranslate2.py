"""CTranslate2 models (`twin convert --to ctranslate2`): the spec is built with CTranslate2's own Python API.

`TwinConverter` is a `ctranslate2.converters.Converter` whose `_load` returns the spec; CTranslate2 validates it,
quantizes it and writes model.bin, config.json and the vocabulary files. Beside them go twin_config.json (the
TransformerConfig, which says how to run the model), the tokenizer files of SRC and, for an encoder with a
classification head, classifier_head.safetensors: CTranslate2's encoder pooler reads the first token through
a Dense + tanh, the twins pool the mean of the real tokens, so the head (pooler and classifier) is applied by
`parity.ct2` on CTranslate2's hidden states.

Families: seq2seq -> `TransformerSpec` (`ctranslate2.Translator`); decoder -> `TransformerDecoderModelSpec`
(`ctranslate2.Generator`); encoder -> `TransformerEncoderModelSpec` (`ctranslate2.Encoder`).

What the spec must say, checked in ctranslate2 4.8's specs/ and src/:
- `pre_norm` is the twins' norm_first; its default is True. The twins' final norms (`final_norm`) exist in a
  spec only where `from_config` made them: a pre-norm spec without `no_final_norm`. The C++ applies
  `{encoder,decoder}/layer_norm` wherever it exists (`_output_norm`, src/layers/transformer.cc), so a post-LN
  model with final norms (torch.nn.Transformer's layout, this project's default) is a pre-norm spec whose
  `pre_norm` is then set to False.
- Weights are [out, in], as canonical. `self_attention.linear[0]` is q, k and v fused (rows q | k | v),
  `linear[1]` the output; cross-attention `linear[0]` is q, `linear[1]` k and v fused, `linear[2]` the output.
- Positions are given as a table (`position_encodings.encodings`), row t added at step t, the decoder start
  at step 0: `parity.numerics.position_table` of the config. Left unset, CTranslate2 makes its own [sin | cos]
  table from position 1, which is none of the twins' tables.
- `scale_embeddings` (True: times sqrt(d_model)) is `scale_embedding`; `layer_norm_epsilon` goes in config.json.
- Activations: relu -> RELU, gelu (erf) -> GELU, silu -> SWISH.
- An `unk_token` missing from the vocabulary is appended at load time (a vocabulary one longer than the
  weights: garbage), so the vocabulary is the tokenizer's tokens in id order with its own unk token named.

Every TransformerConfig is expressible this way but one whose num_heads exceeds the spec's int16 (`check_config`);
what else is refused (one line, nothing written) is a tokenizer CTranslate2 cannot hold: no unknown token,
duplicate token strings, or a size other than the model's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from parity.config import TransformerConfig
from parity.names import aliases, canonical_shapes
from parity.numerics import position_table

TARGET = "ctranslate2"
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")
MODEL_FILE = "model.bin"  # CTranslate2's
TWIN_CONFIG = "twin_config.json"
HEAD_FILE = "classifier_head.safetensors"
HEAD_KEYS = ("pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias")
ACTIVATIONS = {"relu": "RELU", "gelu": "GELU", "silu": "SWISH"}

# One layer: spec attribute path (inside `layer[i]`) <- canonical sub-keys (inside `{stack}.layers.{i}`).
# Linear rows are concatenated in the order given (fused projections); a string is a LayerNorm.
LAYER_RULES: tuple[tuple[str, tuple[str, ...] | str], ...] = (
    ("self_attention.linear.0", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attention.linear.1", ("self_attn.out_proj",)),
    ("self_attention.layer_norm", "self_attn_norm"),
    ("attention.linear.0", ("cross_attn.q_proj",)),
    ("attention.linear.1", ("cross_attn.k_proj", "cross_attn.v_proj")),
    ("attention.linear.2", ("cross_attn.out_proj",)),
    ("attention.layer_norm", "cross_attn_norm"),
    ("ffn.linear_0", ("ff.linear1",)),
    ("ffn.linear_1", ("ff.linear2",)),
    ("ffn.layer_norm", "ff_norm"),
)
CROSS_PREFIX = "attention."
# Outside the layers, per family: spec path <- canonical key prefix ("embedding:" an Embedding weight).
TOP_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "seq2seq": (("encoder.embeddings.0", "embedding:src_embed"), ("decoder.embeddings", "embedding:tgt_embed"),
                ("decoder.projection", "generator"), ("encoder.layer_norm", "norm:encoder.norm"),
                ("decoder.layer_norm", "norm:decoder.norm")),
    "encoder": (("encoder.embeddings.0", "embedding:src_embed"), ("encoder.layer_norm", "norm:encoder.norm")),
    "decoder": (("decoder.embeddings", "embedding:tgt_embed"), ("decoder.projection", "generator"),
                ("decoder.layer_norm", "norm:decoder.norm")),
}
STACKS = {"seq2seq": ("encoder", "decoder"), "encoder": ("encoder",), "decoder": ("decoder",)}


class CT2Error(ValueError):
    """What CTranslate2 cannot hold, or a CTranslate2 directory that cannot be used; one line."""


def check_config(cfg: TransformerConfig) -> None:
    """CT2Error naming the field that a CTranslate2 spec cannot hold."""
    if cfg.num_heads > np.iinfo(np.int16).max:
        raise CT2Error(f"num_heads {cfg.num_heads}: a CTranslate2 spec stores num_heads as int16 (at most "
                       f"{np.iinfo(np.int16).max})")
    if cfg.activation not in ACTIVATIONS:
        raise CT2Error(f"activation {cfg.activation!r}: CTranslate2 has {', '.join(ACTIVATIONS)} here")


def is_ct2_dir(path: str | os.PathLike) -> bool:
    """A directory written by `twin convert --to ctranslate2` (model.bin and twin_config.json)."""
    path = Path(path)
    return path.is_dir() and (path / MODEL_FILE).is_file() and (path / TWIN_CONFIG).is_file()


def looks_like_ct2(path: str | os.PathLike) -> bool:
    """Any CTranslate2 model directory (model.bin beside a config.json), ours or not."""
    path = Path(path)
    return path.is_dir() and (path / MODEL_FILE).is_file()


# ------------------------------------------------------------------------------------------ vocabulary

class IdVocabulary:
    """A tokenizer stand-in for models without one (benchmarks, tests): <pad> <bos> <eos> <unk> at ids 0-3, then
    "t4", "t5", ...; each side as long as the config's vocabulary."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, cfg: TransformerConfig) -> None:
        self.sizes = {False: cfg.src_vocab_size, True: cfg.tgt_vocab_size}

    def tokens(self, *, target: bool = False) -> list[str]:
        names = ["<pad>", "<bos>", "<eos>", "<unk>"]
        return [names[i] if i < len(names) else f"t{i}" for i in range(self.sizes[target])]


def vocabularies(cfg: TransformerConfig, tokenizer, where: str) -> dict[str, list[str]]:
    """{"source": tokens, "target": tokens} (the sides the arch has), each in id order; CT2Error naming the
    tokenizer where CTranslate2 could not map them back to the same ids."""
    if getattr(tokenizer, "unk_id", -1) < 0:
        raise CT2Error(f"{where}: the tokenizer has no unknown token; CTranslate2 needs one in the vocabulary "
                       f"(it appends a missing unk_token at load time, shifting the vocabulary off the weights)")
    sides = {"source": (False, cfg.src_vocab_size), "target": (True, cfg.tgt_vocab_size)}
    wanted = {"seq2seq": ("source", "target"), "encoder": ("source",), "decoder": ("target",)}[cfg.arch]
    out = {}
    for side in wanted:
        target, size = sides[side]
        tokens = list(tokenizer.tokens(target=target))
        if len(tokens) != size:
            raise CT2Error(f"{where}: the tokenizer's {side} vocabulary has {len(tokens)} tokens, the model's "
                           f"{size}")
        seen: dict[str, int] = {}
        for i, token in enumerate(tokens):
            if token in seen:
                raise CT2Error(f"{where}: token {token!r} has ids {seen[token]} and {i}; CTranslate2 maps token "
                               f"strings to ids, so they must be unique")
            seen[token] = i
        out[side] = tokens
    return out


# ------------------------------------------------------------------------------------------ the spec

def _f32(a: np.ndarray) -> np.ndarray:
    """float32, or float16 kept (CTranslate2 stores either); C-contiguous."""
    a = np.asarray(a)
    return np.ascontiguousarray(a if a.dtype == np.float16 else a.astype(np.float32))


def _node(spec, path: str):
    for part in path.split("."):
        spec = spec[int(part)] if part.isdigit() else getattr(spec, part)
    return spec


class _Rules:
    """Takes canonical weights by key, remembering which were used (a tied or shared name counts as its owner),
    and sets spec variables (CTranslate2 aliases equal variables when it saves)."""

    def __init__(self, weights: Mapping[str, np.ndarray], cfg: TransformerConfig) -> None:
        self.weights, self.used, self.owners = weights, set(), aliases(cfg)

    def take(self, key: str) -> np.ndarray:
        self.used.add(self.owners.get(key, key))
        return self.weights[key]

    def linear(self, node, prefixes: Sequence[str]) -> None:
        node.weight = _f32(np.concatenate([self.take(f"{p}.weight") for p in prefixes]))  # [sum out, in]
        if all(f"{p}.bias" in self.weights for p in prefixes):
            node.bias = _f32(np.concatenate([self.take(f"{p}.bias") for p in prefixes]))  # [sum out]

    def norm(self, node, prefix: str) -> None:
        node.gamma, node.beta = _f32(self.take(f"{prefix}.weight")), _f32(self.take(f"{prefix}.bias"))

    def embedding(self, node, prefix: str) -> None:
        node.weight = _f32(self.take(f"{prefix}.weight"))  # [V, D]


def build_spec(cfg: TransformerConfig, weights: Mapping[str, np.ndarray], vocab: Mapping[str, list[str]],
               special: Mapping[str, int]):
    """The CTranslate2 spec of canonical `weights` (every key used exactly once, aliases aside) with its
    vocabularies and config (unk/bos/eos tokens, the decoder start, layer_norm_epsilon). `special`: the
    tokenizer's unk_id, bos_id (the decoder start) and eos_id."""
    from ctranslate2.specs import common_spec, transformer_spec

    check_config(cfg)
    activation = getattr(common_spec.Activation, ACTIVATIONS[cfg.activation])
    pre_norm = cfg.norm_first or cfg.final_norm  # a final norm exists only in a pre-norm spec ...
    common = dict(pre_norm=pre_norm, no_final_norm=not cfg.final_norm, activation=activation)
    if cfg.arch == "seq2seq":
        spec = transformer_spec.TransformerSpec.from_config((cfg.num_encoder_layers, cfg.num_decoder_layers),
                                                            cfg.num_heads, **common)
    elif cfg.arch == "decoder":
        spec = transformer_spec.TransformerDecoderModelSpec.from_config(cfg.num_decoder_layers, cfg.num_heads,
                                                                        **common)
    else:
        spec = transformer_spec.TransformerEncoderModelSpec(transformer_spec.TransformerEncoderSpec(
            cfg.num_encoder_layers, cfg.num_heads, **common))
    rules = _Rules(weights, cfg)
    table = position_table(cfg.positions, cfg.max_len, cfg.d_model, cfg.pad_id).astype(np.float32)  # [max_len, D]
    for name in STACKS[cfg.arch]:
        stack = getattr(spec, name)
        stack.pre_norm = cfg.norm_first  # ... which is then made post-norm where the layers are
        stack.scale_embeddings = cfg.scale_embedding
        stack.position_encodings.encodings = table
        cross = name == "decoder" and cfg.arch == "seq2seq"
        for i, layer in enumerate(stack.layer):
            for path, source in LAYER_RULES:
                if path.startswith(CROSS_PREFIX) and not cross:
                    continue
                prefix = f"{name}.layers.{i}"
                if isinstance(source, str):
                    rules.norm(_node(layer, path), f"{prefix}.{source}")
                else:
                    rules.linear(_node(layer, path), [f"{prefix}.{s}" for s in source])
    for path, source in TOP_RULES[cfg.arch]:
        kind, _, key = source.rpartition(":")
        if kind == "norm" and not cfg.final_norm:
            continue
        node = _node(spec, path)
        {"embedding": rules.embedding, "norm": rules.norm, "": lambda n, k: rules.linear(n, [k])}[kind](node, key)
    expected = set(canonical_shapes(cfg)) - set(aliases(cfg)) - set(HEAD_KEYS)
    if rules.used != expected:
        missing, extra = sorted(expected - rules.used), sorted(rules.used - expected)
        raise CT2Error(f"the CTranslate2 rule table does not cover the config: unused {missing}, unexpected {extra}")
    names = vocab.get("target") or vocab["source"]
    spec.config.unk_token = names[special["unk_id"]]
    spec.config.bos_token = names[special["bos_id"]]
    spec.config.eos_token = names[special["eos_id"]]
    spec.config.layer_norm_epsilon = float(cfg.layer_norm_eps)
    if cfg.arch == "seq2seq":
        spec.config.decoder_start_token = names[special["bos_id"]]
        spec.register_source_vocabulary(vocab["source"])
        spec.register_target_vocabulary(vocab["target"])
    else:
        spec.register_vocabulary(names)
    return spec


def make_converter(spec):
    """A `ctranslate2.converters.Converter` whose `_load` returns `spec` (CTranslate2's own validate, optimize
    (quantize) and save run in `convert`)."""
    from ctranslate2.converters import Converter

    class TwinConverter(Converter):
        def _load(self):
            return spec

    return TwinConverter()


def write_ct2(tmp: Path, cfg: TransformerConfig, weights: Mapping[str, np.ndarray], tokenizer, tokenizer_where: str,
              quantization: str | None = None) -> None:
    """Write the CTranslate2 model directory `tmp` (which must not exist): CTranslate2's files, twin_config.json,
    classifier_head.safetensors for an encoder with a head. The tokenizer files are the caller's to copy."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise CT2Error(f"--quantization {quantization!r}: choose from {', '.join(QUANTIZATIONS)}")
    vocab = vocabularies(cfg, tokenizer, tokenizer_where)
    special = {"unk_id": tokenizer.unk_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    spec = build_spec(cfg, weights, vocab, special)
    try:
        make_converter(spec).convert(str(tmp), quantization=quantization)
    except ValueError as e:  # CTranslate2's validate: a required variable unset, a vocabulary of the wrong size
        raise CT2Error(f"CTranslate2 refused the spec: {' '.join(str(e).split())}") from None
    (tmp / TWIN_CONFIG).write_text(cfg.to_json())
    if cfg.arch == "encoder" and cfg.num_classes is not None:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(np.asarray(weights[k], np.float32)) for k in HEAD_KEYS},
                  str(tmp / HEAD_FILE), metadata={"format": "twin-transformer"})


def read_twin_config(path: str | os.PathLike) -> TransformerConfig:
    """The TransformerConfig of a CTranslate2 directory written here; CT2Error naming the file."""
    from parity.checkpoint import CheckpointError, read_config

    try:
        return read_config(Path(path) / TWIN_CONFIG)
    except CheckpointError as e:
        raise CT2Error(str(e)) from None


def ct2_config(path: str | os.PathLike) -> dict[str, Any]:
    """CTranslate2's config.json of a model directory."""
    from parity.checkpoint import CheckpointError, read_json

    try:
        return read_json(Path(path) / "config.json", "CTranslate2 config")
    except CheckpointError as e:
        raise CT2Error(str(e)) from None


MODEL_BIN_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # CTranslate2's DataType ids


def stored_weight_type(path: str | os.PathLike) -> str:
    """The type model.bin stores the feed-forward weights in (what --quantization chose), read from its variable
    headers (`ModelSpec._serialize`'s layout: version, name, revision, then name, rank, dims, dtype id, size, data)."""
    import struct

    file = Path(path) / MODEL_FILE
    try:
        with open(file, "rb") as f:
            def string() -> str:
                (n,) = struct.unpack("H", f.read(2))
                return f.read(n)[:-1].decode("utf-8")

            f.read(4)
            string()
            f.read(4)
            (count,) = struct.unpack("I", f.read(4))
            for _ in range(count):
                name = string()
                (rank,) = struct.unpack("B", f.read(1))
                f.read(4 * rank)
                dtype, size = struct.unpack("B", f.read(1))[0], struct.unpack("I", f.read(4))[0]
                if name.endswith("ffn/linear_0/weight"):
                    return MODEL_BIN_DTYPES[dtype]
                f.seek(size, os.SEEK_CUR)
    except (OSError, struct.error, UnicodeDecodeError, IndexError) as e:
        raise CT2Error(f"{file}: cannot read the variable headers ({e})") from None
    raise CT2Error(f"{file}: no feed-forward weight found")


def read_vocabularies(path: str | os.PathLike, arch: str) -> dict[str, list[str]]:
    """{"source", "target"} token lists (id order) of a CTranslate2 directory (shared_vocabulary.json,
    source_/target_vocabulary.json, or vocabulary.json for one-stack models)."""
    path = Path(path)
    names = {"source": ("source_vocabulary.json", "shared_vocabulary.json", "vocabulary.json"),
             "target": ("target_vocabulary.json", "shared_vocabulary.json", "vocabulary.json")}
    out = {}
    for side, files in names.items():
        file = next((path / f for f in files if (path / f).is_file()), None)
        if file is None:
            continue
        try:
            tokens = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CT2Error(f"{file}: cannot read the vocabulary ({e})") from None
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise CT2Error(f"{file}: not a JSON list of token strings")
        out[side] = tokens
    needed = {"seq2seq": ("source", "target"), "encoder": ("source",), "decoder": ("target",)}[arch]
    for side in needed:
        if side not in out:
            raise CT2Error(f"{path}: no {side} vocabulary file ({', '.join(names[side])})")
    return out
