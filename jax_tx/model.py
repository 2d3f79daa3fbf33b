"""Encoder, Decoder and the encoder-decoder Transformer (Flax twin)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_tx.embeddings import PositionalEncoding, TokenEmbedding
from jax_tx.layers import DecoderLayer, EncoderLayer, layer_norm
from jax_tx.masks import causal_mask, check_padding_mask, decoder_self_mask, key_mask, padding_mask
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

    With `cache` (the list of layer caches of `Transformer.init_cache`) -> (hidden states, cache).
    """

    cfg: TransformerConfig

    def setup(self):
        self.layers = [DecoderLayer(self.cfg) for _ in range(self.cfg.num_decoder_layers)]
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
    cfg.pad_id when None. The decoder's self-attention is causal. Dropout draws from the "dropout"
    rng stream when `deterministic` is False.
    """

    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        self.src_embed = TokenEmbedding(cfg.src_vocab_size, cfg.d_model)
        self.tgt_embed = (self.src_embed if cfg.share_embeddings
                          else TokenEmbedding(cfg.tgt_vocab_size, cfg.d_model))
        self.pos_encoding = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.dropout)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.generator = Generator(cfg.tgt_vocab_size, cfg.output_bias, cfg.tie_output)

    def encode(self, src: jnp.ndarray, src_mask: jnp.ndarray | None = None,
               deterministic: bool = True) -> jnp.ndarray:
        """src (B, S) -> memory (B, S, D)."""
        _check_ids(src, "src")
        src_pad = padding_mask(src, self.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        x = self.pos_encoding(self.src_embed(src), deterministic=deterministic)  # [B, S, D]
        return self.encoder(x, key_mask(src_pad), deterministic)  # [B, S, D]

    def init_cache(self, memory: jnp.ndarray, src_mask: jnp.ndarray | None = None,
                   length: int | None = None) -> dict:
        """The KV cache for decoding up to `length` (default max_len) target positions against memory (B, S, D).

        {"index": 0 (positions filled, int32), "tgt_mask": (B, L) bool, "src_mask": (B, S) bool, "layers": one
        {"self_k", "self_v": (B, H, L, K) slots; "cross_k", "cross_v": (B, H, S, K) of memory} per decoder layer}.
        A pytree: `decode(tgt, None, cache=cache)` returns a new one with the index advanced.
        """
        length = self.cfg.max_len if length is None else length
        if not 1 <= length <= self.cfg.max_len:
            raise ValueError(f"cache length must be in [1, max_len={self.cfg.max_len}], got {length}")
        if memory.ndim != 3 or memory.shape[2] != self.cfg.d_model:
            raise ValueError(f"memory must have shape (B, S, D) with D = {self.cfg.d_model}, got {tuple(memory.shape)}")
        b, s, _ = memory.shape
        src_pad = (jnp.ones((b, s), dtype=jnp.bool_) if src_mask is None
                   else check_padding_mask(src_mask, (b, s), "src_mask"))  # [B, S]
        return {"index": jnp.zeros((), jnp.int32), "tgt_mask": jnp.zeros((b, length), dtype=jnp.bool_),
                "src_mask": src_pad, "layers": self.decoder.init_cache(memory, length)}

    def decode(self, tgt: jnp.ndarray, memory: jnp.ndarray | None, src_mask: jnp.ndarray | None = None,
               tgt_mask: jnp.ndarray | None = None, cache: dict | None = None, deterministic: bool = True):
        """tgt (B, T), memory (B, S, D) -> logits (B, T, V). src_mask None: every memory row is attended.

        With `cache` (from `init_cache`; memory and src_mask are in it, pass None): tgt holds the T tokens at
        positions cache["index"]..; returns (logits (B, T, V), new cache with the index advanced by T).
        """
        _check_ids(tgt, "tgt")
        if cache is not None:
            return self._decode_cached(tgt, memory, src_mask, tgt_mask, cache, deterministic)
        if memory is None or memory.ndim != 3 or memory.shape[0] != tgt.shape[0] or memory.shape[2] != self.cfg.d_model:
            raise ValueError(f"memory must have shape (B, S, D) = ({tgt.shape[0]}, S, {self.cfg.d_model}), "
                             f"got {None if memory is None else tuple(memory.shape)}")
        tgt_pad = padding_mask(tgt, self.cfg.pad_id, tgt_mask, "tgt_mask")  # [B, T]
        cross_mask = None
        if src_mask is not None:
            src_pad = check_padding_mask(src_mask, tuple(memory.shape[:2]), "src_mask")  # [B, S]
            cross_mask = key_mask(src_pad)  # [B, 1, 1, S]
        y = self.pos_encoding(self.tgt_embed(tgt), deterministic=deterministic)  # [B, T, D]
        y = self.decoder(y, memory, decoder_self_mask(tgt_pad), cross_mask, deterministic=deterministic)  # [B, T, D]
        return self.generator(y, self.tgt_embed)  # [B, T, V]

    def _decode_cached(self, tgt: jnp.ndarray, memory: jnp.ndarray | None, src_mask: jnp.ndarray | None,
                       tgt_mask: jnp.ndarray | None, cache: dict, deterministic: bool) -> tuple[jnp.ndarray, dict]:
        index, (b, t), (cache_b, length) = cache["index"], tgt.shape, cache["tgt_mask"].shape
        _check_cache_call(memory, src_mask, b, cache_b, index, t, length)
        tgt_pad = padding_mask(tgt, self.cfg.pad_id, tgt_mask, "tgt_mask")  # [B, T]
        keys = jax.lax.dynamic_update_slice_in_dim(cache["tgt_mask"], tgt_pad, index, axis=1)  # [B, L]
        self_mask = key_mask(keys) & causal_mask(t, index, length)  # [B, 1, T, L]
        y = self.pos_encoding(self.tgt_embed(tgt), index, deterministic)  # [B, T, D]
        y, layers = self.decoder(y, None, self_mask, key_mask(cache["src_mask"]), cache["layers"], index,
                                 deterministic)  # [B, T, D]
        return self.generator(y, self.tgt_embed), {**cache, "index": index + t, "tgt_mask": keys, "layers": layers}

    def __call__(self, src: jnp.ndarray, tgt: jnp.ndarray, src_mask: jnp.ndarray | None = None,
                 tgt_mask: jnp.ndarray | None = None, deterministic: bool = True) -> jnp.ndarray:
        """src (B, S), tgt (B, T) -> logits (B, T, V)."""
        _check_ids(src, "src")
        src_mask = padding_mask(src, self.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        memory = self.encode(src, src_mask, deterministic)  # [B, S, D]
        return self.decode(tgt, memory, src_mask, tgt_mask, deterministic=deterministic)  # [B, T, V]


def _check_ids(ids: jnp.ndarray, name: str) -> None:
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape (B, L), got {tuple(ids.shape)}")


def _check_cache_call(memory, src_mask, batch: int, cache_batch: int, index, length: int, slots: int) -> None:
    if memory is not None or src_mask is not None:
        raise ValueError("with a cache, pass memory=None and src_mask=None: init_cache already holds them")
    if batch != cache_batch:
        raise ValueError(f"tgt has batch size {batch}, the cache {cache_batch}")
    if not isinstance(index, jax.core.Tracer) and int(index) + length > slots:
        raise ValueError(f"the cache holds {slots} positions and {int(index)} are used: {length} more do not fit")
