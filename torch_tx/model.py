"""Encoder, Decoder and the three model families (torch twin): the encoder-decoder Transformer,
EncoderOnly and DecoderOnly, built from the same layers."""

from __future__ import annotations

import torch
from torch import nn

from parity.config import TransformerConfig
from torch_tx.embeddings import PositionalEncoding, TokenEmbedding
from torch_tx.initializers import linear
from torch_tx.layers import DecoderLayer, EncoderLayer
from torch_tx.masks import (causal_mask, check_padding_mask, check_segments, first_position_real, key_mask, padding_mask,
                            segment_mask, self_attention_masks)


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

    With `cache` (the list of layer caches of `init_cache`) -> (hidden states, cache). Without
    `cross_attention` (DecoderOnly) memory and cross_mask are None.
    """

    def __init__(self, cfg: TransformerConfig, cross_attention: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, cross_attention) for _ in range(cfg.num_decoder_layers))
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
    cfg.pad_id when None. The decoder's self-attention is causal. Packed rows: src_segments (B, S) and
    tgt_segments (B, T) int, 0 = padding, example i of a row has segment id i + 1 on both sides;
    attention stays inside the example and positions restart at each (or come from *_positions).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg = _arch_config(cfg, "seq2seq")
        self.src_embed = token_embedding(cfg, cfg.src_vocab_size)
        self.tgt_embed = (self.src_embed if cfg.share_embeddings
                          else token_embedding(cfg, cfg.tgt_vocab_size))
        self.pos_encoding = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.dropout, cfg.positions, cfg.pad_id)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.generator = linear(cfg.d_model, cfg.tgt_vocab_size, bias=cfg.output_bias)
        if cfg.tie_output:
            self.generator.weight = self.tgt_embed.weight

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None, *,
               src_segments: torch.Tensor | None = None, src_positions: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) -> memory (B, S, D)."""
        return run_encoder(self, src, src_mask, src_segments, src_positions)  # [B, S, D]

    def init_cache(self, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
                   length: int | None = None) -> dict:
        """The KV cache for decoding up to `length` (default max_len) target positions against memory (B, S, D).

        {"index": 0 (positions filled), "tgt_mask": (B, L) bool, "src_mask": (B, S) bool, "layers": one
        {"self_k", "self_v": (B, H, L, K) slots; "cross_k", "cross_v": (B, H, S, K) of memory} per decoder layer}.
        `decode(tgt, None, cache=cache)` writes the buffers in place and returns the cache with the index advanced.
        A beam search repeats the self-attention slots and tgt_mask per hypothesis (B*G rows) and keeps the cross
        keys, values and src_mask at B rows, shared by each source's G hypotheses (`DecoderLayer`).
        """
        length = _cache_length(self.cfg, length)
        if memory.dim() != 3 or memory.shape[2] != self.cfg.d_model:
            raise ValueError(f"memory must have shape (B, S, D) with D = {self.cfg.d_model}, got {tuple(memory.shape)}")
        b, s, _ = memory.shape
        src_pad = (torch.ones(b, s, dtype=torch.bool, device=memory.device) if src_mask is None
                   else check_padding_mask(src_mask, (b, s), "src_mask").to(memory.device))  # [B, S]
        return {"index": 0, "tgt_mask": torch.zeros(b, length, dtype=torch.bool, device=memory.device),
                "src_mask": src_pad, "layers": self.decoder.init_cache(memory, length)}

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor | None, src_mask: torch.Tensor | None = None,
               tgt_mask: torch.Tensor | None = None, cache: dict | None = None, *,
               src_segments: torch.Tensor | None = None, tgt_segments: torch.Tensor | None = None,
               tgt_positions: torch.Tensor | None = None):
        """tgt (B, T), memory (B, S, D) -> logits (B, T, V). src_mask None: every memory row is attended.

        With `cache` (from `init_cache`; memory and src_mask are in it, pass None): tgt holds the T tokens at
        positions cache["index"]..; returns (logits (B, T, V), cache with the index advanced by T).
        """
        _check_ids(tgt, "tgt")
        if cache is not None:
            if memory is not None or src_mask is not None:
                raise ValueError("with a cache, pass memory=None and src_mask=None: init_cache already holds them")
            return decode_cached(self, tgt, tgt_mask, cache, tgt_segments, tgt_positions)
        if memory is None or memory.dim() != 3 or memory.shape[0] != tgt.shape[0] or memory.shape[2] != self.cfg.d_model:
            raise ValueError(f"memory must have shape (B, S, D) = ({tgt.shape[0]}, S, {self.cfg.d_model}), "
                             f"got {None if memory is None else tuple(memory.shape)}")
        cross_mask = None
        if src_mask is not None:
            src_pad = check_padding_mask(src_mask, tuple(memory.shape[:2]), "src_mask")  # [B, S]
            cross_mask = key_mask(src_pad.to(memory.device))  # [B, 1, 1, S]
        if (src_segments is None) != (tgt_segments is None):
            raise ValueError("packed rows need both src_segments and tgt_segments")
        if src_segments is not None:
            src_segments = check_segments(src_segments, tuple(memory.shape[:2]), "src_segments")
            tgt_segments = check_segments(tgt_segments, tuple(tgt.shape), "tgt_segments")
            pairs = segment_mask(tgt_segments, src_segments.to(tgt_segments.device))  # [B, 1, T, S]
            cross_mask = pairs if cross_mask is None else cross_mask & pairs
        return run_decoder(self, tgt, memory, cross_mask, tgt_mask, tgt_segments, tgt_positions)  # [B, T, V]

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None, *, src_segments: torch.Tensor | None = None,
                tgt_segments: torch.Tensor | None = None, src_positions: torch.Tensor | None = None,
                tgt_positions: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S), tgt (B, T) -> logits (B, T, V)."""
        _check_ids(src, "src")
        src_mask = padding_mask(src, self.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        memory = self.encode(src, src_mask, src_segments=src_segments, src_positions=src_positions)  # [B, S, D]
        return self.decode(tgt, memory, src_mask, tgt_mask, src_segments=src_segments, tgt_segments=tgt_segments,
                           tgt_positions=tgt_positions)  # [B, T, V]


class EncoderOnly(nn.Module):
    """The encoder alone (BERT-style): src (B, S) int ids -> hidden states (B, S, D).

    With `num_classes` (or cfg.num_classes), also a classification head on the mean of the real tokens'
    hidden states: logits = classifier(tanh(pooler(mean))), and the result is (hidden, logits (B, C)).
    Packed rows (src_segments, 0 = padding): each token gets its segment's logits, (B, S, C).
    """

    def __init__(self, cfg: TransformerConfig, num_classes: int | None = None):
        super().__init__()
        self.cfg = cfg = _arch_config(cfg, "encoder", num_classes)
        self.num_classes = cfg.num_classes
        self.src_embed = token_embedding(cfg, cfg.src_vocab_size)
        self.pos_encoding = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.dropout, cfg.positions, cfg.pad_id)
        self.encoder = Encoder(cfg)
        if cfg.num_classes is not None:
            self.pooler = linear(cfg.d_model, cfg.d_model)
            self.classifier = linear(cfg.d_model, cfg.num_classes)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None, *,
               src_segments: torch.Tensor | None = None, src_positions: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) -> hidden states (B, S, D)."""
        return run_encoder(self, src, src_mask, src_segments, src_positions)  # [B, S, D]

    def classify(self, hidden: torch.Tensor, src_mask: torch.Tensor,
                 src_segments: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, S, D), padding mask (B, S) -> logits (B, C); with src_segments (B, S) -> (B, S, C)."""
        if self.num_classes is None:
            raise ValueError("this EncoderOnly has no classification head (num_classes=None)")
        pooled = mean_pool(hidden, src_mask, src_segments)  # [B, D] or [B, S, D]
        return self.classifier(torch.tanh(self.pooler(pooled)))  # [B, C] or [B, S, C]

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None, *,
                src_segments: torch.Tensor | None = None, src_positions: torch.Tensor | None = None):
        """src (B, S) -> hidden (B, S, D), or (hidden, logits) with a classification head."""
        _check_ids(src, "src")
        src_mask = padding_mask(src, self.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        hidden = self.encode(src, src_mask, src_segments=src_segments, src_positions=src_positions)  # [B, S, D]
        if self.num_classes is None:
            return hidden
        return hidden, self.classify(hidden, src_mask, src_segments)


class DecoderOnly(nn.Module):
    """The decoder alone (GPT-style causal language model): tgt (B, T) int ids -> logits (B, T, V).

    No cross-attention. tgt_mask / tgt_segments / tgt_positions as in `Transformer.decode`.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg = _arch_config(cfg, "decoder")
        self.tgt_embed = token_embedding(cfg, cfg.tgt_vocab_size)
        self.pos_encoding = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.dropout, cfg.positions, cfg.pad_id)
        self.decoder = Decoder(cfg, cross_attention=False)
        self.generator = linear(cfg.d_model, cfg.tgt_vocab_size, bias=cfg.output_bias)
        if cfg.tie_output:
            self.generator.weight = self.tgt_embed.weight

    def init_cache(self, batch_size: int, length: int | None = None) -> dict:
        """The KV cache for `length` (default max_len) positions of `batch_size` sequences, in the params' dtype.

        {"index": 0, "tgt_mask": (B, L) bool, "layers": one {"self_k", "self_v": (B, H, L, K)} per layer}.
        """
        length = _cache_length(self.cfg, length)
        weight = self.tgt_embed.weight
        template = weight.new_zeros(batch_size, 0, self.cfg.d_model)  # [B, 0, D]
        return {"index": 0, "tgt_mask": torch.zeros(batch_size, length, dtype=torch.bool, device=weight.device),
                "layers": self.decoder.init_cache(template, length)}

    def decode(self, tgt: torch.Tensor, tgt_mask: torch.Tensor | None = None, cache: dict | None = None, *,
               tgt_segments: torch.Tensor | None = None, tgt_positions: torch.Tensor | None = None):
        """tgt (B, T) -> logits (B, T, V); with `cache`, as `Transformer.decode`: (logits, cache advanced by T)."""
        _check_ids(tgt, "tgt")
        if cache is not None:
            return decode_cached(self, tgt, tgt_mask, cache, tgt_segments, tgt_positions)
        return run_decoder(self, tgt, None, None, tgt_mask, tgt_segments, tgt_positions)  # [B, T, V]

    def forward(self, tgt: torch.Tensor, tgt_mask: torch.Tensor | None = None, *,
                tgt_segments: torch.Tensor | None = None, tgt_positions: torch.Tensor | None = None) -> torch.Tensor:
        """tgt (B, T) -> logits (B, T, V)."""
        return self.decode(tgt, tgt_mask, tgt_segments=tgt_segments, tgt_positions=tgt_positions)  # [B, T, V]


def token_embedding(cfg: TransformerConfig, vocab_size: int) -> TokenEmbedding:
    """A TokenEmbedding as the config says: scaled by sqrt(D) or not, the pad row frozen or not."""
    return TokenEmbedding(vocab_size, cfg.d_model, cfg.scale_embedding,
                          cfg.pad_id if cfg.freeze_pad_embedding else None)


def model_for(cfg: TransformerConfig) -> nn.Module:
    """The model of cfg.arch: Transformer, EncoderOnly (with cfg.num_classes) or DecoderOnly."""
    return {"seq2seq": Transformer, "encoder": EncoderOnly, "decoder": DecoderOnly}[cfg.arch](cfg)


def run_encoder(model: nn.Module, src: torch.Tensor, src_mask: torch.Tensor | None,
                src_segments: torch.Tensor | None, src_positions: torch.Tensor | None) -> torch.Tensor:
    """Embed src (B, S) and run model.encoder -> (B, S, D): Transformer.encode and EncoderOnly.encode."""
    _check_ids(src, "src")
    _, mask, _, positions = self_attention_masks(src, model.cfg.pad_id, src_mask, src_segments, src_positions,
                                                 False, "src")  # mask [B, 1, S|1, S]
    x = model.pos_encoding(model.src_embed(src), positions=positions)  # [B, S, D]
    return model.encoder(x, mask)  # [B, S, D]


def run_decoder(model: nn.Module, tgt: torch.Tensor, memory: torch.Tensor | None, cross_mask: torch.Tensor | None,
                tgt_mask: torch.Tensor | None, tgt_segments: torch.Tensor | None,
                tgt_positions: torch.Tensor | None) -> torch.Tensor:
    """Embed tgt (B, T), run model.decoder (causal) and the output layer -> logits (B, T, V)."""
    _, self_mask, _, positions = self_attention_masks(tgt, model.cfg.pad_id, tgt_mask, tgt_segments, tgt_positions,
                                                      True, "tgt", model.cfg.arch == "seq2seq")  # [B, 1, T, T]
    y = model.pos_encoding(model.tgt_embed(tgt), positions=positions)  # [B, T, D]
    y = model.decoder(y, memory, self_mask, cross_mask)  # [B, T, D]
    return model.generator(y)  # [B, T, V]


def decode_cached(model: nn.Module, tgt: torch.Tensor, tgt_mask: torch.Tensor | None, cache: dict,
                  tgt_segments: torch.Tensor | None, tgt_positions: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """One cached step of T tokens at cache slots index..index+T-1 -> (logits (B, T, V), cache advanced by T).

    Positions default to the slots; `tgt_positions` (B, T) overrides them (prompts of different lengths).
    """
    if tgt_segments is not None:
        raise ValueError("packed rows (tgt_segments) cannot be decoded with a cache")
    index, (b, t), (cache_b, length) = cache["index"], tgt.shape, cache["tgt_mask"].shape
    _check_cache_call(b, cache_b, index, t, length)
    end = index + t
    tgt_pad = padding_mask(tgt, model.cfg.pad_id, tgt_mask, "tgt_mask")  # [B, T]
    if tgt_mask is None and model.cfg.arch == "seq2seq":
        tgt_pad = first_position_real(tgt_pad, index)  # [B, T]
    cache["tgt_mask"][:, index:end] = tgt_pad
    self_mask = key_mask(cache["tgt_mask"][:, :end]) & causal_mask(t, tgt.device, offset=index)  # [B, 1, T, end]
    cross_mask = key_mask(cache["src_mask"]) if "src_mask" in cache else None  # [B, 1, 1, S]
    y = model.pos_encoding(model.tgt_embed(tgt), offset=index, positions=tgt_positions)  # [B, T, D]
    y, layers = model.decoder(y, None, self_mask, cross_mask, cache["layers"], index)  # [B, T, D]
    return model.generator(y), {**cache, "index": end, "layers": layers}  # [B, T, V]


def mean_pool(hidden: torch.Tensor, pad: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the real tokens' hidden (B, S, D) -> (B, D); with segments, each token's segment mean (B, S, D)."""
    if segments is None:
        weights = pad.to(hidden.dtype)[:, None, :]  # [B, 1, S]
    else:
        weights = segment_mask(segments, segments)[:, 0].to(hidden.dtype) * pad.to(hidden.dtype)[:, None, :]  # [B, S, S]
    pooled = (weights @ hidden) / weights.sum(-1, keepdim=True).clamp(min=1)  # [B, 1|S, D]
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


def _check_ids(ids: torch.Tensor, name: str) -> None:
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (B, L), got {tuple(ids.shape)}")


def _check_cache_call(batch: int, cache_batch: int, index: int, length: int, slots: int) -> None:
    if batch != cache_batch:
        raise ValueError(f"tgt has batch size {batch}, the cache {cache_batch}")
    if index + length > slots:
        raise ValueError(f"the cache holds {slots} positions and {index} are used: {length} more do not fit")
