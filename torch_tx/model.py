"""Encoder, Decoder and the encoder-decoder Transformer (torch twin)."""

from __future__ import annotations

import torch
from torch import nn

from parity.config import TransformerConfig
from torch_tx.embeddings import PositionalEncoding, TokenEmbedding
from torch_tx.initializers import linear
from torch_tx.layers import DecoderLayer, EncoderLayer
from torch_tx.masks import causal_mask, check_padding_mask, decoder_self_mask, key_mask, padding_mask


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
    """Embedded target x (B, T, D), memory (B, S, D), masks -> hidden states (B, T, D).

    With `cache` (the list of layer caches of `Transformer.init_cache`) -> (hidden states, cache).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.final_norm else None

    def init_cache(self, memory: torch.Tensor, length: int) -> list[dict[str, torch.Tensor]]:
        return [layer.init_cache(memory, length) for layer in self.layers]

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, self_mask: torch.Tensor | None,
                cross_mask: torch.Tensor | None, cache: list[dict[str, torch.Tensor]] | None = None,
                index: int = 0):
        new_cache = []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = layer(x, memory, self_mask, cross_mask)  # [B, T, D]
            else:
                x, layer_cache = layer(x, memory, self_mask, cross_mask, cache[i], index)  # [B, T, D]
                new_cache.append(layer_cache)
        x = self.norm(x) if self.norm is not None else x
        return x if cache is None else (x, new_cache)


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

    def init_cache(self, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
                   length: int | None = None) -> dict:
        """The KV cache for decoding up to `length` (default max_len) target positions against memory (B, S, D).

        {"index": 0 (positions filled), "tgt_mask": (B, L) bool, "src_mask": (B, S) bool, "layers": one
        {"self_k", "self_v": (B, H, L, K) slots; "cross_k", "cross_v": (B, H, S, K) of memory} per decoder layer}.
        `decode(tgt, None, cache=cache)` writes the buffers in place and returns the cache with the index advanced.
        """
        length = self.cfg.max_len if length is None else length
        if not 1 <= length <= self.cfg.max_len:
            raise ValueError(f"cache length must be in [1, max_len={self.cfg.max_len}], got {length}")
        if memory.dim() != 3 or memory.shape[2] != self.cfg.d_model:
            raise ValueError(f"memory must have shape (B, S, D) with D = {self.cfg.d_model}, got {tuple(memory.shape)}")
        b, s, _ = memory.shape
        src_pad = (torch.ones(b, s, dtype=torch.bool, device=memory.device) if src_mask is None
                   else check_padding_mask(src_mask, (b, s), "src_mask").to(memory.device))  # [B, S]
        return {"index": 0, "tgt_mask": torch.zeros(b, length, dtype=torch.bool, device=memory.device),
                "src_mask": src_pad, "layers": self.decoder.init_cache(memory, length)}

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor | None, src_mask: torch.Tensor | None = None,
               tgt_mask: torch.Tensor | None = None, cache: dict | None = None):
        """tgt (B, T), memory (B, S, D) -> logits (B, T, V). src_mask None: every memory row is attended.

        With `cache` (from `init_cache`; memory and src_mask are in it, pass None): tgt holds the T tokens at
        positions cache["index"]..; returns (logits (B, T, V), cache with the index advanced by T).
        """
        _check_ids(tgt, "tgt")
        if cache is not None:
            return self._decode_cached(tgt, memory, src_mask, tgt_mask, cache)
        if memory is None or memory.dim() != 3 or memory.shape[0] != tgt.shape[0] or memory.shape[2] != self.cfg.d_model:
            raise ValueError(f"memory must have shape (B, S, D) = ({tgt.shape[0]}, S, {self.cfg.d_model}), "
                             f"got {None if memory is None else tuple(memory.shape)}")
        tgt_pad = padding_mask(tgt, self.cfg.pad_id, tgt_mask, "tgt_mask")  # [B, T]
        cross_mask = None
        if src_mask is not None:
            src_pad = check_padding_mask(src_mask, tuple(memory.shape[:2]), "src_mask")  # [B, S]
            cross_mask = key_mask(src_pad.to(memory.device))  # [B, 1, 1, S]
        y = self.pos_encoding(self.tgt_embed(tgt))  # [B, T, D]
        y = self.decoder(y, memory, decoder_self_mask(tgt_pad), cross_mask)  # [B, T, D]
        return self.generator(y)  # [B, T, V]

    def _decode_cached(self, tgt: torch.Tensor, memory: torch.Tensor | None, src_mask: torch.Tensor | None,
                       tgt_mask: torch.Tensor | None, cache: dict) -> tuple[torch.Tensor, dict]:
        index, (b, t), (cache_b, length) = cache["index"], tgt.shape, cache["tgt_mask"].shape
        _check_cache_call(memory, src_mask, b, cache_b, index, t, length)
        end = index + t
        cache["tgt_mask"][:, index:end] = padding_mask(tgt, self.cfg.pad_id, tgt_mask, "tgt_mask")  # [B, T]
        self_mask = key_mask(cache["tgt_mask"][:, :end]) & causal_mask(t, tgt.device, offset=index)  # [B, 1, T, end]
        y = self.pos_encoding(self.tgt_embed(tgt), offset=index)  # [B, T, D]
        y, layers = self.decoder(y, None, self_mask, key_mask(cache["src_mask"]), cache["layers"], index)  # [B, T, D]
        return self.generator(y), {**cache, "index": end, "layers": layers}  # [B, T, V]

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


def _check_cache_call(memory, src_mask, batch: int, cache_batch: int, index: int, length: int, slots: int) -> None:
    if memory is not None or src_mask is not None:
        raise ValueError("with a cache, pass memory=None and src_mask=None: init_cache already holds them")
    if batch != cache_batch:
        raise ValueError(f"tgt has batch size {batch}, the cache {cache_batch}")
    if index + length > slots:
        raise ValueError(f"the cache holds {slots} positions and {index} are used: {length} more do not fit")
