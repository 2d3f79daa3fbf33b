"""Encoder, Decoder and the three model families (Flax twin): the encoder-decoder Transformer,
EncoderOnly and DecoderOnly, built from the same layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_tx.embeddings import PositionalEncoding, TokenEmbedding
from jax_tx.layers import DecoderLayer, EncoderLayer, layer_norm
from jax_tx.initializers import linear
from jax_tx.masks import (causal_mask, check_padding_mask, check_segments, first_position_real, key_mask, padding_mask,
                          segment_mask, self_attention_masks)
from jax_tx.tracing import tracing
from parity.config import TransformerConfig


class Encoder(nn.Module):
    """Embedded source x (B, S, D), mask (B, 1, 1, S) -> memory (B, S, D)."""

    cfg: TransformerConfig

    def setup(self):
        self.layers = [EncoderLayer(self.cfg) for _ in range(self.cfg.num_encoder_layers)]
        self.norm = layer_norm(self.cfg) if self.cfg.final_norm else None

    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None, deterministic: bool = True) -> jnp.ndarray:
        for layer in self.layers:
            x = layer(x, mask, deterministic)  # [B, S, D]
        return self.norm(x) if self.norm is not None else x


class Decoder(nn.Module):
    """Embedded target x (B, T, D), memory (B, S, D), masks -> hidden states (B, T, D).

    With `cache` (the list of layer caches of `init_cache`) -> (hidden states, cache). Without
    `cross_attention` (DecoderOnly) memory and cross_mask are None.
    """

    cfg: TransformerConfig
    cross_attention: bool = True

    def setup(self):
        self.layers = [DecoderLayer(self.cfg, self.cross_attention) for _ in range(self.cfg.num_decoder_layers)]
        self.norm = layer_norm(self.cfg) if self.cfg.final_norm else None

    def init_cache(self, memory: jnp.ndarray, length: int) -> list[dict[str, jnp.ndarray]]:
        return [layer.init_cache(memory, length) for layer in self.layers]

    def __call__(self, x: jnp.ndarray, memory: jnp.ndarray | None, self_mask: jnp.ndarray | None,
                 cross_mask: jnp.ndarray | None, cache: list[dict[str, jnp.ndarray]] | None = None,
                 index: int | jnp.ndarray = 0, deterministic: bool = True):
        new_cache = []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = layer(x, memory, self_mask, cross_mask, deterministic=deterministic)  # [B, T, D]
            else:
                x, layer_cache = layer(x, memory, self_mask, cross_mask, cache[i], index, deterministic)  # [B, T, D]
                new_cache.append(layer_cache)
        x = self.norm(x) if self.norm is not None else x
        return x if cache is None else (x, new_cache)


class Generator(nn.Module):
    """The output layer, torch's `generator` nn.Linear: x (B, T, D) -> logits (B, T, V).

    With `tied`, the kernel is the target embedding's transpose (passed in), and only the bias is a param.
    """

    vocab_size: int
    use_bias: bool
    tied: bool

    @nn.compact
    def __call__(self, x: jnp.ndarray, embed: TokenEmbedding) -> jnp.ndarray:
        if self.tied:
            logits = embed.attend(x)  # [B, T, V]
        else:
            kernel = self.param("kernel", nn.initializers.xavier_uniform(), (x.shape[-1], self.vocab_size),
                                jnp.float32)
            logits = x @ kernel.astype(x.dtype)  # [B, T, V]
        if self.use_bias:
            logits = logits + self.param("bias", nn.initializers.zeros, (self.vocab_size,), jnp.float32).astype(x.dtype)
        return logits


class Transformer(nn.Module):
    """The encoder-decoder Transformer. src (B, S), tgt (B, T) int ids -> logits (B, T, V).

    src_mask (B, S) / tgt_mask (B, T): bool padding masks, True = real token; derived from
    cfg.pad_id when None. The decoder's self-attention is causal. Packed rows: src_segments (B, S) and
    tgt_segments (B, T) int, 0 = padding, example i of a row has segment id i + 1 on both sides;
    attention stays inside the example and positions restart at each (or come from *_positions).
    Dropout draws from the "dropout" rng stream when `deterministic` is False.
    """

    cfg: TransformerConfig

    def __post_init__(self):
        object.__setattr__(self, "cfg", _arch_config(self.cfg, "seq2seq"))
        super().__post_init__()

    def setup(self):
        cfg = self.cfg
        self.src_embed = token_embedding(cfg, cfg.src_vocab_size)
        self.tgt_embed = (self.src_embed if cfg.share_embeddings
                          else token_embedding(cfg, cfg.tgt_vocab_size))
        self.pos_encoding = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.dropout, cfg.positions, cfg.pad_id)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.generator = Generator(cfg.tgt_vocab_size, cfg.output_bias, cfg.tie_output)

    def encode(self, src: jnp.ndarray, src_mask: jnp.ndarray | None = None, deterministic: bool = True, *,
               src_segments: jnp.ndarray | None = None, src_positions: jnp.ndarray | None = None) -> jnp.ndarray:
        """src (B, S) -> memory (B, S, D)."""
        return run_encoder(self, src, src_mask, src_segments, src_positions, deterministic)  # [B, S, D]

    def init_cache(self, memory: jnp.ndarray, src_mask: jnp.ndarray | None = None,
                   length: int | None = None) -> dict:
        """The KV cache for decoding up to `length` (default max_len) target positions against memory (B, S, D).

        {"index": 0 (positions filled, int32), "tgt_mask": (B, L) bool, "src_mask": (B, S) bool, "layers": one
        {"self_k", "self_v": (B, H, L, K) slots; "cross_k", "cross_v": (B, H, S, K) of memory} per decoder layer}.
        A pytree: `decode(tgt, None, cache=cache)` returns a new one with the index advanced.
        """
        length = _cache_length(self.cfg, length)
        if memory.ndim != 3 or memory.shape[2] != self.cfg.d_model:
            raise ValueError(f"memory must have shape (B, S, D) with D = {self.cfg.d_model}, got {tuple(memory.shape)}")
        b, s, _ = memory.shape
        src_pad = (jnp.ones((b, s), dtype=jnp.bool_) if src_mask is None
                   else check_padding_mask(src_mask, (b, s), "src_mask"))  # [B, S]
        return {"index": jnp.zeros((), jnp.int32), "tgt_mask": jnp.zeros((b, length), dtype=jnp.bool_),
                "src_mask": src_pad, "layers": self.decoder.init_cache(memory, length)}

    def decode(self, tgt: jnp.ndarray, memory: jnp.ndarray | None, src_mask: jnp.ndarray | None = None,
               tgt_mask: jnp.ndarray | None = None, cache: dict | None = None, deterministic: bool = True, *,
               src_segments: jnp.ndarray | None = None, tgt_segments: jnp.ndarray | None = None,
               tgt_positions: jnp.ndarray | None = None):
        """tgt (B, T), memory (B, S, D) -> logits (B, T, V). src_mask None: every memory row is attended.

        With `cache` (from `init_cache`; memory and src_mask are in it, pass None): tgt holds the T tokens at
        positions cache["index"]..; returns (logits (B, T, V), new cache with the index advanced by T).
        """
        _check_ids(tgt, "tgt")
        if cache is not None:
            if memory is not None or src_mask is not None:
                raise ValueError("with a cache, pass memory=None and src_mask=None: init_cache already holds them")
            return decode_cached(self, tgt, tgt_mask, cache, tgt_segments, tgt_positions, deterministic)
        if memory is None or memory.ndim != 3 or memory.shape[0] != tgt.shape[0] or memory.shape[2] != self.cfg.d_model:
            raise ValueError(f"memory must have shape (B, S, D) = ({tgt.shape[0]}, S, {self.cfg.d_model}), "
                             f"got {None if memory is None else tuple(memory.shape)}")
        cross_mask = None
        if src_mask is not None:
            src_pad = check_padding_mask(src_mask, tuple(memory.shape[:2]), "src_mask")  # [B, S]
            cross_mask = key_mask(src_pad)  # [B, 1, 1, S]
        if (src_segments is None) != (tgt_segments is None):
            raise ValueError("packed rows need both src_segments and tgt_segments")
        if src_segments is not None:
            src_segments = check_segments(src_segments, tuple(memory.shape[:2]), "src_segments")
            tgt_segments = check_segments(tgt_segments, tuple(tgt.shape), "tgt_segments")
            pairs = segment_mask(tgt_segments, src_segments)  # [B, 1, T, S]
            cross_mask = pairs if cross_mask is None else cross_mask & pairs
        return run_decoder(self, tgt, memory, cross_mask, tgt_mask, tgt_segments, tgt_positions,
                           deterministic)  # [B, T, V]

    def __call__(self, src: jnp.ndarray, tgt: jnp.ndarray, src_mask: jnp.ndarray | None = None,
                 tgt_mask: jnp.ndarray | None = None, deterministic: bool = True, *,
                 src_segments: jnp.ndarray | None = None, tgt_segments: jnp.ndarray | None = None,
                 src_positions: jnp.ndarray | None = None, tgt_positions: jnp.ndarray | None = None) -> jnp.ndarray:
        """src (B, S), tgt (B, T) -> logits (B, T, V)."""
        _check_ids(src, "src")
        src_mask = padding_mask(src, self.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        memory = self.encode(src, src_mask, deterministic, src_segments=src_segments,
                             src_positions=src_positions)  # [B, S, D]
        return self.decode(tgt, memory, src_mask, tgt_mask, deterministic=deterministic, src_segments=src_segments,
                           tgt_segments=tgt_segments, tgt_positions=tgt_positions)  # [B, T, V]


class EncoderOnly(nn.Module):
    """The encoder alone (BERT-style): src (B, S) int ids -> hidden states (B, S, D).

    With `num_classes` (or cfg.num_classes), also a classification head on the mean of the real tokens'
    hidden states: logits = classifier(tanh(pooler(mean))), and the result is (hidden, logits (B, C)).
    Packed rows (src_segments, 0 = padding): each token gets its segment's logits, (B, S, C).
    """

    cfg: TransformerConfig
    num_classes: int | None = None

    def __post_init__(self):
        cfg = _arch_config(self.cfg, "encoder", self.num_classes)
        object.__setattr__(self, "cfg", cfg)
        object.__setattr__(self, "num_classes", cfg.num_classes)
        super().__post_init__()

    def setup(self):
        cfg = self.cfg
        self.src_embed = token_embedding(cfg, cfg.src_vocab_size)
        self.pos_encoding = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.dropout, cfg.positions, cfg.pad_id)
        self.encoder = Encoder(cfg)
        if cfg.num_classes is not None:
            self.pooler = linear(cfg.d_model)
            self.classifier = linear(cfg.num_classes)

    def encode(self, src: jnp.ndarray, src_mask: jnp.ndarray | None = None, deterministic: bool = True, *,
               src_segments: jnp.ndarray | None = None, src_positions: jnp.ndarray | None = None) -> jnp.ndarray:
        """src (B, S) -> hidden states (B, S, D)."""
        return run_encoder(self, src, src_mask, src_segments, src_positions, deterministic)  # [B, S, D]

    def classify(self, hidden: jnp.ndarray, src_mask: jnp.ndarray,
                 src_segments: jnp.ndarray | None = None) -> jnp.ndarray:
        """hidden (B, S, D), padding mask (B, S) -> logits (B, C); with src_segments (B, S) -> (B, S, C)."""
        if self.num_classes is None:
            raise ValueError("this EncoderOnly has no classification head (num_classes=None)")
        pooled = mean_pool(hidden, src_mask, src_segments)  # [B, D] or [B, S, D]
        return self.classifier(jnp.tanh(self.pooler(pooled)))  # [B, C] or [B, S, C]

    def __call__(self, src: jnp.ndarray, src_mask: jnp.ndarray | None = None, deterministic: bool = True, *,
                 src_segments: jnp.ndarray | None = None, src_positions: jnp.ndarray | None = None):
        """src (B, S) -> hidden (B, S, D), or (hidden, logits) with a classification head."""
        _check_ids(src, "src")
        src_mask = padding_mask(src, self.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        hidden = self.encode(src, src_mask, deterministic, src_segments=src_segments,
                             src_positions=src_positions)  # [B, S, D]
        if self.num_classes is None:
            return hidden
        return hidden, self.classify(hidden, src_mask, src_segments)


class DecoderOnly(nn.Module):
    """The decoder alone (GPT-style causal language model): tgt (B, T) int ids -> logits (B, T, V).

    No cross-attention. tgt_mask / tgt_segments / tgt_positions as in `Transformer.decode`.
    """

    cfg: TransformerConfig

    def __post_init__(self):
        object.__setattr__(self, "cfg", _arch_config(self.cfg, "decoder"))
        super().__post_init__()

    def setup(self):
        cfg = self.cfg
        self.tgt_embed = token_embedding(cfg, cfg.tgt_vocab_size)
        self.pos_encoding = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.dropout, cfg.positions, cfg.pad_id)
        self.decoder = Decoder(cfg, cross_attention=False)
        self.generator = Generator(cfg.tgt_vocab_size, cfg.output_bias, cfg.tie_output)

    def init_cache(self, batch_size: int, length: int | None = None) -> dict:
        """The KV cache for `length` (default max_len) positions of `batch_size` sequences, in the params' dtype.

        {"index": 0 (int32), "tgt_mask": (B, L) bool, "layers": one {"self_k", "self_v": (B, H, L, K)} per layer}.
        """
        length = _cache_length(self.cfg, length)
        template = jnp.zeros((batch_size, 0, self.cfg.d_model), self.tgt_embed.embedding.dtype)  # [B, 0, D]
        return {"index": jnp.zeros((), jnp.int32), "tgt_mask": jnp.zeros((batch_size, length), dtype=jnp.bool_),
                "layers": self.decoder.init_cache(template, length)}

    def decode(self, tgt: jnp.ndarray, tgt_mask: jnp.ndarray | None = None, cache: dict | None = None,
               deterministic: bool = True, *, tgt_segments: jnp.ndarray | None = None,
               tgt_positions: jnp.ndarray | None = None):
        """tgt (B, T) -> logits (B, T, V); with `cache`, as `Transformer.decode`: (logits, new cache advanced by T)."""
        _check_ids(tgt, "tgt")
        if cache is not None:
            return decode_cached(self, tgt, tgt_mask, cache, tgt_segments, tgt_positions, deterministic)
        return run_decoder(self, tgt, None, None, tgt_mask, tgt_segments, tgt_positions, deterministic)  # [B, T, V]

    def __call__(self, tgt: jnp.ndarray, tgt_mask: jnp.ndarray | None = None, deterministic: bool = True, *,
                 tgt_segments: jnp.ndarray | None = None, tgt_positions: jnp.ndarray | None = None) -> jnp.ndarray:
        """tgt (B, T) -> logits (B, T, V)."""
        return self.decode(tgt, tgt_mask, deterministic=deterministic, tgt_segments=tgt_segments,
                           tgt_positions=tgt_positions)  # [B, T, V]


def token_embedding(cfg: TransformerConfig, vocab_size: int) -> TokenEmbedding:
    """A TokenEmbedding as the config says: scaled by sqrt(D) or not, the pad row frozen or not."""
    return TokenEmbedding(vocab_size, cfg.d_model, cfg.scale_embedding,
                          cfg.pad_id if cfg.freeze_pad_embedding else None)


def model_for(cfg: TransformerConfig) -> nn.Module:
    """The model of cfg.arch: Transformer, EncoderOnly (with cfg.num_classes) or DecoderOnly."""
    return {"seq2seq": Transformer, "encoder": EncoderOnly, "decoder": DecoderOnly}[cfg.arch](cfg)


def init_inputs(cfg: TransformerConfig) -> tuple[jnp.ndarray, ...]:
    """The (1, 1) int32 ids `model_for(cfg).init(rng, *init_inputs(cfg))` takes: (src, tgt) for seq2seq, else one."""
    return (jnp.ones((1, 1), dtype=jnp.int32),) * (2 if cfg.arch == "seq2seq" else 1)


def run_encoder(model: nn.Module, src: jnp.ndarray, src_mask: jnp.ndarray | None, src_segments: jnp.ndarray | None,
                src_positions: jnp.ndarray | None, deterministic: bool) -> jnp.ndarray:
    """Embed src (B, S) and run model.encoder -> (B, S, D): Transformer.encode and EncoderOnly.encode."""
    _check_ids(src, "src")
    _, mask, _, positions = self_attention_masks(src, model.cfg.pad_id, src_mask, src_segments, src_positions,
                                                 False, "src")  # mask [B, 1, S|1, S]
    x = model.pos_encoding(model.src_embed(src), deterministic=deterministic, positions=positions)  # [B, S, D]
    return model.encoder(x, mask, deterministic)  # [B, S, D]


def run_decoder(model: nn.Module, tgt: jnp.ndarray, memory: jnp.ndarray | None, cross_mask: jnp.ndarray | None,
                tgt_mask: jnp.ndarray | None, tgt_segments: jnp.ndarray | None, tgt_positions: jnp.ndarray | None,
                deterministic: bool) -> jnp.ndarray:
    """Embed tgt (B, T), run model.decoder (causal) and the output layer -> logits (B, T, V)."""
    _, self_mask, _, positions = self_attention_masks(tgt, model.cfg.pad_id, tgt_mask, tgt_segments, tgt_positions,
                                                      True, "tgt", model.cfg.arch == "seq2seq")  # [B, 1, T, T]
    y = model.pos_encoding(model.tgt_embed(tgt), deterministic=deterministic, positions=positions)  # [B, T, D]
    y = model.decoder(y, memory, self_mask, cross_mask, deterministic=deterministic)  # [B, T, D]
    return model.generator(y, model.tgt_embed)  # [B, T, V]


def decode_cached(model: nn.Module, tgt: jnp.ndarray, tgt_mask: jnp.ndarray | None, cache: dict,
                  tgt_segments: jnp.ndarray | None, tgt_positions: jnp.ndarray | None,
                  deterministic: bool) -> tuple[jnp.ndarray, dict]:
    """One cached step of T tokens at cache slots index..index+T-1 -> (logits (B, T, V), new cache advanced by T).

    Positions default to the slots; `tgt_positions` (B, T) overrides them (prompts of different lengths).
    """
    if tgt_segments is not None:
        raise ValueError("packed rows (tgt_segments) cannot be decoded with a cache")
    index, (b, t), (cache_b, length) = cache["index"], tgt.shape, cache["tgt_mask"].shape
    _check_cache_call(b, cache_b, index, t, length)
    tgt_pad = padding_mask(tgt, model.cfg.pad_id, tgt_mask, "tgt_mask")  # [B, T]
    if tgt_mask is None and model.cfg.arch == "seq2seq":
        tgt_pad = first_position_real(tgt_pad, index)  # [B, T]
    keys = jax.lax.dynamic_update_slice_in_dim(cache["tgt_mask"], tgt_pad, index, axis=1)  # [B, L]
    self_mask = key_mask(keys) & causal_mask(t, index, length)  # [B, 1, T, L]
    cross_mask = key_mask(cache["src_mask"]) if "src_mask" in cache else None  # [B, 1, 1, S]
    y = model.pos_encoding(model.tgt_embed(tgt), index, deterministic, positions=tgt_positions)  # [B, T, D]
    y, layers = model.decoder(y, None, self_mask, cross_mask, cache["layers"], index, deterministic)  # [B, T, D]
    return model.generator(y, model.tgt_embed), {**cache, "index": index + t, "tgt_mask": keys, "layers": layers}


def mean_pool(hidden: jnp.ndarray, pad: jnp.ndarray, segments: jnp.ndarray | None = None) -> jnp.ndarray:
    """Mean of the real tokens' hidden (B, S, D) -> (B, D); with segments, each token's segment mean (B, S, D)."""
    if segments is None:
        weights = pad.astype(hidden.dtype)[:, None, :]  # [B, 1, S]
    else:
        weights = segment_mask(segments, segments)[:, 0].astype(hidden.dtype) * pad.astype(hidden.dtype)[:, None, :]  # [B, S, S]
    pooled = (weights @ hidden) / jnp.maximum(weights.sum(-1, keepdims=True), 1)  # [B, 1|S, D]
    return pooled[:, 0] if segments is None else pooled  # [B, D] or [B, S, D]


def _arch_config(cfg: TransformerConfig, arch: str, num_classes: int | None = None) -> TransformerConfig:
    if cfg.arch not in ("seq2seq", arch):
        raise ValueError(f"this config is for arch {cfg.arch!r}, not {arch!r}: build it with model_for(cfg)")
    return cfg.for_arch(arch, num_classes)


def _cache_length(cfg: TransformerConfig, length: int | None) -> int:
    length = cfg.max_len if length is None else length
    if not 1 <= length <= cfg.max_len:
        raise ValueError(f"cache length must be in [1, max_len={cfg.max_len}], got {length}")
    return length


def _check_ids(ids: jnp.ndarray, name: str) -> None:
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape (B, L), got {tuple(ids.shape)}")


def _check_cache_call(batch: int, cache_batch: int, index, length: int, slots: int) -> None:
    if batch != cache_batch:
        raise ValueError(f"tgt has batch size {batch}, the cache {cache_batch}")
    if not tracing() and int(index) + length > slots:
        raise ValueError(f"the cache holds {slots} positions and {int(index)} are used: {length} more do not fit")
