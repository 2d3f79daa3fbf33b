"""Encoder, Decoder and the encoder-decoder Transformer (torch twin)."""

from __future__ import annotations

import torch
from torch import nn

from parity.config import TransformerConfig
from torch_tx.embeddings import PositionalEncoding, TokenEmbedding
from torch_tx.initializers import linear
from torch_tx.layers import DecoderLayer, EncoderLayer
from torch_tx.masks import check_padding_mask, decoder_self_mask, key_mask, padding_mask


class Encoder(nn.Module):
    """Embedded source x (B, S, D), mask (B, 1, 1, S) -> memory (B, S, D)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.final_norm else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)  # [B, S, D]
        return self.norm(x) if self.norm is not None else x


class Decoder(nn.Module):
    """Embedded target x (B, T, D), memory (B, S, D), masks -> hidden states (B, T, D)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.final_norm else None

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor | None,
                cross_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, memory, self_mask, cross_mask)  # [B, T, D]
        return self.norm(x) if self.norm is not None else x


class Transformer(nn.Module):
    """The encoder-decoder Transformer. src (B, S), tgt (B, T) int ids -> logits (B, T, V).

    src_mask (B, S) / tgt_mask (B, T): bool padding masks, True = real token; derived from
    cfg.pad_id when None. The decoder's self-attention is causal.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.src_embed = TokenEmbedding(cfg.src_vocab_size, cfg.d_model)
        self.tgt_embed = (self.src_embed if cfg.share_embeddings
                          else TokenEmbedding(cfg.tgt_vocab_size, cfg.d_model))
        self.pos_encoding = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.dropout)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.generator = linear(cfg.d_model, cfg.tgt_vocab_size, bias=cfg.output_bias)
        if cfg.tie_output:
            self.generator.weight = self.tgt_embed.weight

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) -> memory (B, S, D)."""
        _check_ids(src, "src")
        src_pad = padding_mask(src, self.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        x = self.pos_encoding(self.src_embed(src))  # [B, S, D]
        return self.encoder(x, key_mask(src_pad))  # [B, S, D]

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
               tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tgt (B, T), memory (B, S, D) -> logits (B, T, V). src_mask None: every memory row is attended."""
        _check_ids(tgt, "tgt")
        if memory.dim() != 3 or memory.shape[0] != tgt.shape[0] or memory.shape[2] != self.cfg.d_model:
            raise ValueError(f"memory must have shape (B, S, D) = ({tgt.shape[0]}, S, {self.cfg.d_model}), "
                             f"got {tuple(memory.shape)}")
        tgt_pad = padding_mask(tgt, self.cfg.pad_id, tgt_mask, "tgt_mask")  # [B, T]
        cross_mask = None
        if src_mask is not None:
            src_pad = check_padding_mask(src_mask, tuple(memory.shape[:2]), "src_mask")  # [B, S]
            cross_mask = key_mask(src_pad.to(memory.device))  # [B, 1, 1, S]
        y = self.pos_encoding(self.tgt_embed(tgt))  # [B, T, D]
        y = self.decoder(y, memory, decoder_self_mask(tgt_pad), cross_mask)  # [B, T, D]
        return self.generator(y)  # [B, T, V]

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S), tgt (B, T) -> logits (B, T, V)."""
        _check_ids(src, "src")
        src_mask = padding_mask(src, self.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        memory = self.encode(src, src_mask)  # [B, S, D]
        return self.decode(tgt, memory, src_mask, tgt_mask)  # [B, T, V]


def _check_ids(ids: torch.Tensor, name: str) -> None:
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (B, L), got {tuple(ids.shape)}")
