"""Offline Hugging Face fixtures: random, seeded transformers models (Marian, FSMT) with the layouts real
checkpoints use. No download, ever."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def marian_config(**overrides):
    """A tiny MarianConfig as opus-mt configs say: swish, scaled embeddings, pad = decoder start = the last id,
    eos 0."""
    from transformers import MarianConfig

    vocab = overrides.pop("vocab_size", 61)
    fields = dict(vocab_size=vocab, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                  pad_token_id=vocab - 1, decoder_start_token_id=vocab - 1, eos_token_id=0, forced_eos_token_id=0,
                  activation_function="swish", scale_embedding=True, dropout=0.1, attention_dropout=0.0,
                  activation_dropout=0.0)
    fields.update(overrides)
    return MarianConfig(**fields)


def _randomize(model, seed: int, pad_rows: dict[str, int]):
    """Every parameter and buffer but the position tables drawn from N(0, 0.25^2) (LayerNorms around 1), seeded;
    the embeddings' pad rows zero, as transformers initialises them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "embed_positions" in name:
                continue
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * 0.25
            tensor.copy_((1.0 + 0.2 * noise) if "layer_norm" in name and name.endswith("weight") else noise)
        for name, row in pad_rows.items():
            if name in dict(model.named_parameters(remove_duplicate=False)):
                dict(model.named_parameters(remove_duplicate=False))[name][row].zero_()
    return model.eval()


def marian_model(seed: int, **overrides):
    """A random MarianMTModel (eval mode), final_logits_bias and LayerNorms included."""
    from transformers import MarianMTModel

    torch.manual_seed(seed)
    config = marian_config(**overrides)
    model = MarianMTModel(config)
    pad = config.pad_token_id
    return _randomize(model, seed, {"model.encoder.embed_tokens.weight": pad, "model.decoder.embed_tokens.weight": pad})


def fsmt_config(**overrides):
    """A tiny FSMTConfig as fairseq's WMT19 ports say: separate vocabularies, pad 1, bos 0, eos 2 = decoder start."""
    from transformers import FSMTConfig

    fields = dict(langs=["en", "de"], src_vocab_size=43, tgt_vocab_size=47, d_model=16, encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                  decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  decoder_start_token_id=2, forced_eos_token_id=2, activation_function="relu", scale_embedding=True,
                  tie_word_embeddings=False)
    fields.update(overrides)
    return FSMTConfig(**fields)


def fsmt_model(seed: int, **overrides):
    """A random FSMTForConditionalGeneration (eval mode)."""
    from transformers import FSMTForConditionalGeneration

    torch.manual_seed(seed)
    config = fsmt_config(**overrides)
    model = FSMTForConditionalGeneration(config)
    pad = config.pad_token_id
    return _randomize(model, seed, {"model.encoder.embed_tokens.weight": pad, "model.decoder.embed_tokens.weight": pad})
