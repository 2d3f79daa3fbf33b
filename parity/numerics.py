"""Numerics shared by both twins, in numpy so that neither framework is needed to compute them."""

from __future__ import annotations

import math

import numpy as np


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """The paper's positional table, float64 [max_len, d_model].

    PE[p, 2i] = sin(p / 10000^(2i/d_model)), PE[p, 2i+1] = cos(p / 10000^(2i/d_model)).
    Both twins cast this one float64 table to their compute dtype, so the tables agree bit for bit.
    """
    position = np.arange(max_len, dtype=np.float64)[:, None]  # [L, 1]
    inv_freq = 10000.0 ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)  # [D/2]
    angles = position * inv_freq  # [L, D/2]
    table = np.empty((max_len, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    return table


# The layout is a config field (TransformerConfig.positions) rather than a permutation of the residual basis
# of every imported weight: a permutation expresses Marian's [sin | cos] halves exactly, but not fairseq's
# tensor2tensor frequencies, nor either table's float32 rounding. A field expresses all three exactly.
def position_table(kind: str, max_len: int, d_model: int, pad_id: int = 0) -> np.ndarray:
    """The fixed positional table of `kind` (TransformerConfig.positions), float64 [max_len, d_model].

    "paper": `sinusoidal_table`. "marian": transformers' MarianSinusoidalPositionalEmbedding.create_weight:
    angle p / 10000^(2(j//2)/D) in float64, sin in columns [0, D/2), cos in [D/2, D), rounded to float32 as
    transformers keeps it (also after `.double()`), positions from 0. "fairseq": transformers' FSMT
    SinusoidalPositionalEmbedding.get_embedding(max_len + pad_id + 1, D, pad_id) rows pad_id + 1 .. (row t is
    fairseq's position pad_id + 1 + t): frequencies exp(-i ln(10000) / (D/2 - 1)), [sin | cos], computed in
    float32 with torch's own ops where torch is importable (bit for bit transformers' table in the same
    process), else a numpy float32 emulation that can be 1 ulp off per op. fairseq gives pad tokens a zero
    row; the twins give them row t (pad tokens are masked keys: only outputs at pad positions differ).
    """
    if kind == "paper":
        return sinusoidal_table(max_len, d_model)
    if kind == "marian":
        j = np.arange(d_model)
        angles = np.arange(max_len, dtype=np.float64)[:, None] / np.power(10000, 2 * (j // 2) / d_model)[None, :]
        table = np.empty((max_len, d_model), dtype=np.float32)
        half = d_model // 2
        table[:, :half] = np.sin(angles[:, 0::2])
        table[:, half:] = np.cos(angles[:, 1::2])
        return table.astype(np.float64)
    if kind == "fairseq":
        return _fairseq_table(max_len + pad_id + 1, d_model, pad_id)[pad_id + 1:].astype(np.float64)
    raise ValueError(f"unknown positions {kind!r}")


def _fairseq_table(num_embeddings: int, d_model: int, pad_id: int) -> np.ndarray:
    half = d_model // 2
    scale = math.log(10000) / (half - 1)
    try:
        import torch
    except ImportError:
        freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-scale))  # [D/2]
        angles = np.arange(num_embeddings, dtype=np.float32)[:, None] * freqs[None, :]  # [N, D/2]
        table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # [N, D]
    else:
        freqs = torch.exp(torch.arange(half, dtype=torch.int64).float() * -scale)  # [D/2]
        angles = torch.arange(num_embeddings, dtype=torch.int64).float().unsqueeze(1) * freqs.unsqueeze(0)  # [N, D/2]
        table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).numpy()  # [N, D]
    table[pad_id, :] = 0
    return table
