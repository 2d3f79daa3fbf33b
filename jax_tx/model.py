"""Encoder, Decoder and the encoder-decoder Transformer (Flax twin)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from jax_tx.embeddings import PositionalEncoding, TokenEmbedding
from jax_tx.layers import DecoderLayer, EncoderLayer, layer_norm
from jax_tx.masks import check_padding_mask, decoder_self_mask, key_mask, padding_mask
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
    """Embedded target x (B, T, D), memory (B, S, D), masks -> hidden states (B, T, D)."""

    cfg: TransformerConfig

    def setup(self):
        self.layers = [DecoderLayer(self.cfg) for _ in range(self.cfg.num_decoder_layers)]
        self.norm = layer_norm(self.cfg) if self.cfg.final_norm else None

    def __call__(self, x: jnp.ndarray, memory: jnp.ndarray, self_mask: jnp.ndarray | None,
                 cross_mask: jnp.ndarray | None, deterministic: bool = True) -> jnp.ndarray:
        for layer in self.layers:
            x = layer(x, memory, self_mask, cross_mask, deterministic)  # [B, T, D]
        return self.norm(x) if self.norm is not None else x


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
        x = self.pos_encoding(self.src_embed(src), deterministic)  # [B, S, D]
        return self.encoder(x, key_mask(src_pad), deterministic)  # [B, S, D]

    def decode(self, tgt: jnp.ndarray, memory: jnp.ndarray, src_mask: jnp.ndarray | None = None,
               tgt_mask: jnp.ndarray | None = None, deterministic: bool = True) -> jnp.ndarray:
        """tgt (B, T), memory (B, S, D) -> logits (B, T, V). src_mask None: every memory row is attended."""
        _check_ids(tgt, "tgt")
        if memory.ndim != 3 or memory.shape[0] != tgt.shape[0] or memory.shape[2] != self.cfg.d_model:
            raise ValueError(f"memory must have shape (B, S, D) = ({tgt.shape[0]}, S, {self.cfg.d_model}), "
                             f"got {tuple(memory.shape)}")
        tgt_pad = padding_mask(tgt, self.cfg.pad_id, tgt_mask, "tgt_mask")  # [B, T]
        cross_mask = None
        if src_mask is not None:
            src_pad = check_padding_mask(src_mask, tuple(memory.shape[:2]), "src_mask")  # [B, S]
            cross_mask = key_mask(src_pad)  # [B, 1, 1, S]
        y = self.pos_encoding(self.tgt_embed(tgt), deterministic)  # [B, T, D]
        y = self.decoder(y, memory, decoder_self_mask(tgt_pad), cross_mask, deterministic)  # [B, T, D]
        return self.generator(y, self.tgt_embed)  # [B, T, V]

    def __call__(self, src: jnp.ndarray, tgt: jnp.ndarray, src_mask: jnp.ndarray | None = None,
                 tgt_mask: jnp.ndarray | None = None, deterministic: bool = True) -> jnp.ndarray:
        """src (B, S), tgt (B, T) -> logits (B, T, V)."""
        _check_ids(src, "src")
        src_mask = padding_mask(src, self.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        memory = self.encode(src, src_mask, deterministic)  # [B, S, D]
        return self.decode(tgt, memory, src_mask, tgt_mask, deterministic)  # [B, T, V]


def _check_ids(ids: jnp.ndarray, name: str) -> None:
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape (B, L), got {tuple(ids.shape)}")
