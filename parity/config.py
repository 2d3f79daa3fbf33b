"""TransformerConfig: the one description of a model, shared by both twins and stored as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("relu", "gelu", "silu")
POSITIONS = ("paper", "marian", "fairseq")
ARCHS = ("seq2seq", "encoder", "decoder")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool (JSON's true, NaN and Infinity are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class DictFields:
    """`replace`, `to_dict` and a strict `from_dict` (unknown and missing keys named) for frozen dataclasses."""

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"missing config keys: {', '.join(missing)}")
        return cls(**data)


@dataclass(frozen=True)
class TransformerConfig(DictFields):
    """Hyper-parameters of the encoder-decoder Transformer. Variants by `.replace(...)`.

    `final_norm`: a LayerNorm after the last encoder and decoder layer (torch.nn.Transformer has one).
    `tie_output`: the output layer `generator` reuses `tgt_embed.weight`.
    `share_embeddings`: `src_embed` is `tgt_embed` (needs equal vocab sizes).
    `output_bias`: the output layer has a bias `generator.bias`.
    `arch`: which family the weights belong to: "seq2seq" (`Transformer`), "encoder" (`EncoderOnly`:
    src_vocab_size, num_encoder_layers) or "decoder" (`DecoderOnly`: tgt_vocab_size, num_decoder_layers).
    `num_classes`: the size of EncoderOnly's classification head (None: no head).
    `attention_dropout` (on the attention weights) and `activation_dropout` (after the feed-forward
    activation): None means `dropout`, so one rate drives all three unless they are set.
    `positions`: the fixed sinusoidal table (`parity.numerics.position_table`): "paper" (interleaved sin/cos,
    float64), "marian" (transformers' Marian: [sin | cos] halves, rounded to float32) or "fairseq" (FSMT:
    tensor2tensor frequencies, [sin | cos], row t is fairseq's position pad_id + 1 + t, float32).
    `scale_embedding`: token embeddings are multiplied by sqrt(d_model) (the paper; Marian's `scale_embedding`).
    `freeze_pad_embedding`: the pad_id row of the token embeddings gets no gradient from lookups (torch's
    nn.Embedding(padding_idx), which transformers' Marian and FSMT use); the forward pass is unchanged.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    norm_first: bool = False
    layer_norm_eps: float = 1e-5
    max_len: int = 512
    pad_id: int = 0
    final_norm: bool = True
    tie_output: bool = False
    share_embeddings: bool = False
    output_bias: bool = True
    arch: str = "seq2seq"
    num_classes: int | None = None
    attention_dropout: float | None = None
    activation_dropout: float | None = None
    positions: str = "paper"
    scale_embedding: bool = True
    freeze_pad_embedding: bool = False

    def __post_init__(self) -> None:
        ints = ("src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "num_encoder_layers",
                "num_decoder_layers", "d_ff", "max_len", "pad_id")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.d_model % 2:
            raise ValueError(f"d_model must be even for the sinusoidal table, got {self.d_model}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("attention_dropout", "activation_dropout"):
            value = getattr(self, name)
            if value is not None and (not is_number(value) or not 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be None (= dropout) or in [0, 1), got {value!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if not is_number(self.layer_norm_eps) or not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive and finite, got {self.layer_norm_eps!r}")
        if not 0 <= self.pad_id < min(self.src_vocab_size, self.tgt_vocab_size):
            raise ValueError(f"pad_id ({self.pad_id}) must be a valid id in both vocabularies "
                             f"(sizes {self.src_vocab_size}, {self.tgt_vocab_size})")
        for name in ("norm_first", "final_norm", "tie_output", "share_embeddings", "output_bias", "scale_embedding",
                     "freeze_pad_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.num_classes is not None:
            if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
                raise ValueError(f"num_classes must be a positive int or None, got {self.num_classes!r}")
            if self.arch != "encoder":
                raise ValueError(f"num_classes is the encoder's classification head; arch is {self.arch!r}")
        if self.arch != "seq2seq" and self.share_embeddings:
            raise ValueError(f"share_embeddings needs both embeddings (arch 'seq2seq'); arch is {self.arch!r}")
        if self.arch == "encoder" and self.tie_output:
            raise ValueError("tie_output ties the output layer to tgt_embed; arch 'encoder' has neither")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError("share_embeddings needs src_vocab_size == tgt_vocab_size, got "
                             f"{self.src_vocab_size} and {self.tgt_vocab_size}")

    def for_arch(self, arch: str, num_classes: int | None = None) -> "TransformerConfig":
        """This config for `arch`, as EncoderOnly / DecoderOnly / Transformer store it; share_embeddings
        (seq2seq only) and tie_output (not for the encoder) are dropped where the arch has no such weights.

        `num_classes` (EncoderOnly's argument) must agree with a num_classes already in the config.
        """
        if num_classes is not None and self.num_classes is not None and num_classes != self.num_classes:
            raise ValueError(f"num_classes={num_classes} disagrees with the config's num_classes={self.num_classes}")
        num_classes = self.num_classes if num_classes is None else num_classes
        if arch != "encoder" and num_classes is not None:
            raise ValueError(f"num_classes is the encoder's classification head; arch is {arch!r}")
        changes = dict(arch=arch, num_classes=num_classes,
                       share_embeddings=self.share_embeddings and arch == "seq2seq",
                       tie_output=self.tie_output and arch != "encoder")
        if all(getattr(self, k) == v for k, v in changes.items()):
            return self
        return self.replace(**changes)

    @property
    def attention_dropout_rate(self) -> float:
        """The dropout rate on attention weights: attention_dropout, or dropout where it is None."""
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @property
    def activation_dropout_rate(self) -> float:
        """The dropout rate after the feed-forward activation: activation_dropout, or dropout where it is None."""
        return self.dropout if self.activation_dropout is None else self.activation_dropout

    def without_dropout(self) -> "TransformerConfig":
        """This config with all three dropout rates 0 (parity, evaluation, decoding)."""
        return self.replace(dropout=0.0, attention_dropout=None, activation_dropout=None)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "TransformerConfig":
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("config is not usable JSON (nested too deeply)") from None
        except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
            raise ValueError(f"config is not valid JSON: {str(e).split(';')[0]}") from None
        return cls.from_dict(data)
