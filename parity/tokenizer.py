"""One joint subword tokenizer for source and target (Hugging Face `tokenizers`, BPE), saved as `tokenizer.json`.

Special tokens have fixed ids: <pad> 0 (the config's default pad_id), <bos> 1, <eos> 2, <unk> 3.
Text is NFKC-normalized and split on spaces the sentencepiece way (Metaspace), so decoding gives the
text back exactly, spaces included. Characters never seen in training become <unk>.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from parity.checkpoint import atomic_write_bytes, read_bytes

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used."""


def content_ids(ids: Iterable[int], eos_id: int, skipped: Sequence[int]) -> list[int]:
    """The ids before the first `eos_id`, less those in `skipped` (pad, the decoder start): what decode turns
    into text."""
    kept = []
    for i in ids:
        i = int(i)
        if i == eos_id:
            break
        if i not in skipped:
            kept.append(i)
    return kept


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the ids the trainers and decoders need."""

    kind = "twin-bpe"  # what a run's train_config.json records (HFTokenizer: transformers' class name)

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        ids = [hf_tokenizer.token_to_id(token) for token in SPECIALS]
        if ids != list(range(len(SPECIALS))):
            raise TokenizerError(f"special tokens {SPECIALS} must have ids 0..3, found {ids}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = ids

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def fingerprint(self) -> str:
        """SHA-256 of the vocabulary (token -> id), to tell whether two tokenizers agree."""
        vocab = sorted(self.hf.get_vocab().items(), key=lambda item: item[1])
        return hashlib.sha256("\n".join(token for token, _ in vocab).encode()).hexdigest()

    def encode(self, texts: Sequence[str], *, target: bool = False) -> list[np.ndarray]:
        """Token ids of each text, no special tokens added: list of [L] int32. One joint vocabulary: `target` (the
        keyword of tokenizers with a side each, `parity.hf_tokenizer.HFTokenizer`) changes nothing."""
        return [np.asarray(e.ids, dtype=np.int32) for e in self.hf.encode_batch(list(texts))]

    def unknown_characters(self, texts: Sequence[str], *, target: bool = False) -> list[list[str]]:
        """The characters of each text that become <unk> (unique, in order of appearance)."""
        found = []
        for text, e in zip(texts, self.hf.encode_batch(list(texts))):
            chars = [text[a:b] for i, (a, b) in zip(e.ids, e.offsets) if i == self.unk_id]
            found.append(list(dict.fromkeys(c for c in chars if c)))
        return found

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary string of each id (e.g. '▁one'), special tokens included."""
        return [self.hf.id_to_token(int(i)) or f"<{int(i)}?>" for i in ids]

    def tokens(self, *, target: bool = False) -> list[str]:
        """Every vocabulary string, in id order (one joint vocabulary: `target` changes nothing)."""
        return self.token_strings(range(self.vocab_size))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids up to the first <eos>, skipping <pad> and <bos>."""
        return self.hf.decode(content_ids(ids, self.eos_id, (self.pad_id, self.bos_id)), skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, self.hf.to_str(pretty=True).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        data = read_bytes(path, "tokenizer", error=TokenizerError)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            return cls(HFTokenizer.from_str(text))
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None
        except Exception as e:  # tokenizers' own Exception for malformed (or over 128 levels deep) JSON
            raise TokenizerError(f"{path}: not a tokenizers JSON file ({e})") from None


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 1000, min_frequency: int = 2) -> Tokenizer:
    """BPE over `texts` (source and target sentences of the training split)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token=UNK))
    hf.normalizer = normalizers.NFKC()
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIALS), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


HF_TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "source.spm", "target.spm")


def load_any(path: str | os.PathLike):
    """The tokenizer of `path`: a Hugging Face tokenizer directory (tokenizer_config.json, or Marian's vocab.json /
    source.spm / target.spm; also a directory's tokenizer.json beside them) -> `parity.hf_tokenizer.HFTokenizer`;
    anything else (this project's tokenizer.json, or a directory holding it) -> `Tokenizer.load`."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent if path.name == TOKENIZER_FILE else None
    if directory is not None and any((directory / name).is_file() for name in HF_TOKENIZER_FILES):
        from parity.hf_tokenizer import HFTokenizer

        return HFTokenizer.load(directory)
    return Tokenizer.load(path)
