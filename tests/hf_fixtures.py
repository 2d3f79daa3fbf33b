"""Offline Hugging Face fixtures: random, seeded transformers models (Marian, FSMT) with the layouts real
checkpoints use, a real MarianTokenizer (SentencePiece models trained at test time on the builtin corpus) and
complete opus-mt-like directories. No download, ever."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

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
    model.generation_config.bad_words_ids = [[pad]]  # as opus-mt's generation_config.json says
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
    model.generation_config.bad_words_ids = [[pad]]  # the twins never emit pad (fairseq's generator neither)
    return _randomize(model, seed, {"model.encoder.embed_tokens.weight": pad, "model.decoder.embed_tokens.weight": pad})


SPM_FILES = ("source.spm", "target.spm", "vocab.json", "tokenizer_config.json")
SPM_SENTENCES = 2_000  # the first training pairs of the builtin corpus
SPM_VOCAB = {"source": 40, "target": 48}  # pieces per side; vocab.json (their union plus </s> <unk> <pad>) has 67
_TEMPORARY: list[tempfile.TemporaryDirectory] = []


def _train_spm(texts: list[str], vocab_size: int) -> bytes:
    """A unigram SentencePiece model (opus-mt's kind, default ids: <unk> 0, <s> 1, </s> 2) of `texts`, serialized."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, num_threads=1, minloglevel=2)
    return model.getvalue()


def _marian_vocab(models: list[bytes]) -> dict[str, int]:
    """vocab.json as opus-mt has it: </s> 0, <unk> 1, the pieces of both SentencePiece models (source first), <pad>
    last."""
    import sentencepiece as spm

    vocab = {"</s>": 0, "<unk>": 1}
    for proto in models:
        sp = spm.SentencePieceProcessor(model_proto=proto)
        for i in range(sp.get_piece_size()):
            if not (sp.is_control(i) or sp.is_unknown(i)):
                vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    return vocab


@functools.cache
def marian_tokenizer_dir() -> Path:
    """A per-process directory with source.spm (English), target.spm (French), vocab.json and tokenizer_config.json
    as MarianTokenizer.save_pretrained writes them; trained once per process (well under a second). Read only:
    copy it with `save_marian_tokenizer`."""
    from transformers import MarianTokenizer

    from parity.data import load_corpus

    pairs = load_corpus("builtin").train[:SPM_SENTENCES]
    holder = tempfile.TemporaryDirectory(prefix="marian-spm-")  # removed at exit, kept alive by the cache below
    _TEMPORARY.append(holder)
    tmp = Path(holder.name)
    models = {side: _train_spm([pair[k] for pair in pairs], SPM_VOCAB[side])
              for k, side in enumerate(("source", "target"))}
    for side, proto in models.items():
        (tmp / f"{side}.spm").write_bytes(proto)
    (tmp / "vocab.json").write_text(json.dumps(_marian_vocab(list(models.values())), indent=2, ensure_ascii=False))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        tokenizer = MarianTokenizer(str(tmp / "source.spm"), str(tmp / "target.spm"), str(tmp / "vocab.json"),
                                    source_lang="en", target_lang="fr")
        out = tmp / "saved"
        tokenizer.save_pretrained(str(out))
    for name in SPM_FILES:
        assert (out / name).is_file(), name
    return out


def marian_vocab_size() -> int:
    """The fixture tokenizer's vocabulary size (len(vocab.json)); its pad (= decoder start) is the last id."""
    return len(json.loads((marian_tokenizer_dir() / "vocab.json").read_text()))


def save_marian_tokenizer(path: str | os.PathLike) -> Path:
    """Copy the fixture MarianTokenizer's files into `path` (created); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in SPM_FILES:
        shutil.copyfile(marian_tokenizer_dir() / name, path / name)
    return path


def marian_generation_config(config, **overrides) -> dict:
    """generation_config.json as opus-mt has it: decoder start = pad, eos 0, bad_words_ids [[pad]], 4 beams."""
    pad = config.pad_token_id
    fields = dict(bad_words_ids=[[pad]], bos_token_id=0, decoder_start_token_id=config.decoder_start_token_id,
                  eos_token_id=config.eos_token_id, forced_eos_token_id=config.eos_token_id,
                  max_length=config.max_position_embeddings, num_beams=4, pad_token_id=pad)
    fields.update(overrides)
    return fields


def save_marian_dir(path: str | os.PathLike, model=None, seed: int = 0, tokenizer: bool = True,
                    generation: dict | None = None) -> Path:
    """A complete opus-mt-like directory in `path`: `model.save_pretrained` (default: `marian_model(seed)` with the
    fixture tokenizer's vocabulary), generation_config.json (`marian_generation_config`, updated by `generation`)
    and, with `tokenizer`, the MarianTokenizer files. Returns `path`."""
    from transformers import GenerationConfig

    path = Path(path)
    if model is None:
        model = marian_model(seed, **({"vocab_size": marian_vocab_size()} if tokenizer else {}))
    if tokenizer and model.config.vocab_size != marian_vocab_size():
        raise ValueError(f"the model's vocab_size is {model.config.vocab_size}, the fixture tokenizer has "
                         f"{marian_vocab_size()} tokens")
    model.save_pretrained(str(path))
    GenerationConfig(**marian_generation_config(model.config, **(generation or {}))).save_pretrained(str(path))
    if tokenizer:
        save_marian_tokenizer(path)
    return path
