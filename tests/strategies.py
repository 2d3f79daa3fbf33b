"""Hypothesis strategies: configs and inputs drawn from the small fixed sets of parity.suite.SPACE."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from parity.config import TransformerConfig
from parity.suite import SPACE, Inputs


def pick(name: str) -> st.SearchStrategy:
    return st.sampled_from(SPACE[name])


@st.composite
def configs(draw: st.DrawFn, **fixed) -> TransformerConfig:
    """A random config (dropout off); keyword arguments pin fields."""
    d_model = draw(pick("d_model"))
    share = draw(pick("share_embeddings"))
    src_vocab = draw(pick("vocab_size"))
    values = dict(
        src_vocab_size=src_vocab, tgt_vocab_size=src_vocab if share else draw(pick("vocab_size")),
        d_model=d_model, num_heads=draw(st.sampled_from([h for h in SPACE["num_heads"] if d_model % h == 0])),
        num_encoder_layers=draw(pick("num_layers")), num_decoder_layers=draw(pick("num_layers")),
        d_ff=draw(pick("d_ff")), dropout=0.0, activation=draw(pick("activation")),
        norm_first=draw(pick("norm_first")), layer_norm_eps=draw(pick("layer_norm_eps")), max_len=16,
        final_norm=draw(pick("final_norm")), tie_output=draw(pick("tie_output")), share_embeddings=share,
        output_bias=draw(pick("output_bias")))
    values.update(fixed)
    return TransformerConfig(**values)


@st.composite
def inputs(draw: st.DrawFn, cfg: TransformerConfig, allow_empty_source: bool = True) -> Inputs:
    """A batch with right-padding: lengths drawn per row (0 allowed for the source: an empty row)."""
    batch, src_len, tgt_len = draw(pick("batch")), draw(pick("src_len")), draw(pick("tgt_len"))
    min_src = 0 if allow_empty_source else 1
    src_lengths = draw(st.lists(st.integers(min_src, src_len), min_size=batch, max_size=batch))
    tgt_lengths = draw(st.lists(st.integers(1, tgt_len), min_size=batch, max_size=batch))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def ids(vocab: int, length: int, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
        mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]  # [B, L]
        tokens = rng.integers(0, vocab, size=(batch, length))  # [B, L]
        tokens = np.where(tokens == cfg.pad_id, (cfg.pad_id + 1) % vocab, tokens)
        return np.where(mask, tokens, cfg.pad_id).astype(np.int64), mask

    src, src_mask = ids(cfg.src_vocab_size, src_len, src_lengths)
    tgt, tgt_mask = ids(cfg.tgt_vocab_size, tgt_len, tgt_lengths)
    weights = rng.standard_normal((batch, tgt_len, cfg.tgt_vocab_size))  # [B, T, V]
    return Inputs(src, tgt, src_mask, tgt_mask, weights)
