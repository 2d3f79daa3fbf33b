"""Hugging Face tokenizers for the twins: transformers' own tokenizer of a `save_pretrained` directory behind the
interface of `parity.tokenizer.Tokenizer`, and the project's tokenizer written as a directory transformers loads.

`HFTokenizer` wraps `AutoTokenizer.from_pretrained(dir)`: MarianTokenizer for opus-mt (`source.spm`, `target.spm`,
`vocab.json`, `tokenizer_config.json`; sources through the source SentencePiece model, targets through the target
one) or a PreTrainedTokenizerFast (`tokenizer.json`). Like `Tokenizer.encode`, its `encode` gives the ids without
the final eos, which the batcher and `translate` append: transformers' ids are `encode(texts) + [eos]`. `bos_id`
is the decoder start: the directory's `decoder_start_token_id` (config.json, else generation_config.json, which
`save` writes), else the tokenizer's bos, else pad (Marian, whose decoder starts from pad). transformers is
imported only inside functions.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from parity.checkpoint import atomic_write_bytes, read_bytes, read_json, writing
from parity.formats.hf_dir import GENERATION_CONFIG, HF_CONFIG, TOKENIZER_FILES
from parity.tokenizer import BOS, EOS, PAD, TOKENIZER_FILE, UNK, Tokenizer, TokenizerError, content_ids

TOKENIZER_CONFIG = "tokenizer_config.json"
FILES = TOKENIZER_FILES + ("added_tokens.json",)
MARIAN_FILES = ("source.spm", "target.spm", "vocab.json")
FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
REQUIRED = {"MarianTokenizer": MARIAN_FILES, "FSMTTokenizer": ("vocab-src.json", "vocab-tgt.json", "merges.txt"),
            **{name: (TOKENIZER_FILE,) for name in FAST_CLASSES}}
QUIET = "Recommended: pip install sacremoses"  # MarianTokenizer's warning; it never uses sacremoses to encode


class HFTokenizerError(TokenizerError):
    """A Hugging Face tokenizer directory that cannot be used (one line naming the directory and why)."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _declared_start(directory: Path) -> int | None:
    """`decoder_start_token_id` of the directory's Hugging Face config.json or generation_config.json, if any."""
    for name in (HF_CONFIG, GENERATION_CONFIG):
        file = directory / name
        if not file.is_file():
            continue
        data = read_json(file, "config", error=HFTokenizerError)
        start = data.get("decoder_start_token_id")
        if isinstance(start, int) and not isinstance(start, bool):
            return start
    return None


class HFTokenizer:
    """transformers' tokenizer with the ids the trainers and decoders need: pad_id, bos_id (the decoder start),
    eos_id, unk_id; `encode` returns transformers' ids less the final eos."""

    def __init__(self, hf_tokenizer, files: dict[str, bytes], bos_id: int | None = None, where: str = "") -> None:
        self.hf, self.files, self.where = hf_tokenizer, dict(files), where
        self.pad_id, self.eos_id = hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id
        for name, value in (("pad", self.pad_id), ("eos", self.eos_id)):
            if value is None:
                raise HFTokenizerError(f"{where or 'tokenizer'}: has no {name} token")
        if bos_id is None:
            bos_id = self.pad_id if hf_tokenizer.bos_token_id is None else hf_tokenizer.bos_token_id
        self.bos_id = int(bos_id)
        self.unk_id = -1 if hf_tokenizer.unk_token_id is None else hf_tokenizer.unk_token_id  # -1: no unk (byte-level)

    @property
    def kind(self) -> str:
        """transformers' tokenizer class (MarianTokenizer, PreTrainedTokenizerFast, ...): what train_config.json
        records."""
        return type(self.hf).__name__

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def tgt_vocab_size(self) -> int:
        """The target side's vocabulary (differs from `vocab_size` only for Marian's separate_vocabs)."""
        target = getattr(self.hf, "target_encoder", None) if getattr(self.hf, "separate_vocabs", False) else None
        return self.vocab_size if target is None else len(target)

    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer files (names and bytes) and the decoder start id."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            data = self.files[name]
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
        digest.update(f"bos={self.bos_id}".encode())
        return digest.hexdigest()

    def _call(self, texts: list[str], target: bool, **kwargs) -> Any:
        return self.hf(text_target=texts, **kwargs) if target else self.hf(texts, **kwargs)

    def encode(self, texts: Sequence[str], *, target: bool = False) -> list[np.ndarray]:
        """transformers' ids of each text (sources; targets with `target=True`, as `text_target=`) without the eos
        it appends: list of [L] int32."""
        texts = list(texts)
        if not texts:
            return []
        rows = self._call(texts, target)["input_ids"]
        return [np.asarray(ids[:-1] if ids and ids[-1] == self.eos_id else ids, dtype=np.int32) for ids in rows]

    def unknown_characters(self, texts: Sequence[str], *, target: bool = False) -> list[list[str]]:
        """The characters of each text that become unk (unique, in order of appearance)."""
        texts = list(texts)
        known: dict[str, bool] = {}
        found = []
        for text, ids in zip(texts, self.encode(texts, target=target)):
            if self.unk_id < 0 or self.unk_id not in ids.tolist():
                found.append([])
                continue
            chars = [c for c in dict.fromkeys(text) if not c.isspace()]
            fresh = [c for c in chars if c not in known]
            for c, row in zip(fresh, self.encode(fresh, target=target)):
                known[c] = self.unk_id in row.tolist()
            found.append([c for c in chars if known[c]] or self._unknown_pieces(text, target))
        return found

    def _unknown_pieces(self, text: str, target: bool) -> list[str]:
        """The pieces that become unk where no single character does (a piece missing from vocab.json)."""
        switch = getattr(self.hf, "_switch_to_target_mode" if target else "_switch_to_input_mode", None)
        if switch is not None:
            switch()
        try:
            pieces = self.hf.tokenize(text)
        finally:
            if target and hasattr(self.hf, "_switch_to_input_mode"):
                self.hf._switch_to_input_mode()
        ids = self.hf.convert_tokens_to_ids(pieces)
        return list(dict.fromkeys(p.replace("\u2581", "") for p, i in zip(pieces, ids) if i == self.unk_id
                                  and p.replace("\u2581", "")))

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary string of each id (e.g. '▁one'), special tokens included."""
        size = self.vocab_size
        return [self.hf.convert_ids_to_tokens(int(i)) if 0 <= int(i) < size else f"<{int(i)}?>" for i in ids]

    def tokens(self, *, target: bool = False) -> list[str]:
        """Every vocabulary string of a side, in id order (the target side's own for Marian's separate_vocabs)."""
        side = getattr(self.hf, "target_encoder", None) if target and getattr(self.hf, "separate_vocabs", False) \
            else None
        if side is None:
            return self.token_strings(range(self.vocab_size))
        by_id = {int(i): token for token, i in side.items()}
        return [by_id.get(i, f"<{i}?>") for i in range(self.tgt_vocab_size)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids up to the first eos, skipping pad and the decoder start (transformers' decode)."""
        return self.hf.decode(content_ids(ids, self.eos_id, (self.pad_id, self.bos_id)), skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """Copy the tokenizer files, unchanged, into the directory `path` (or the directory of the file `path`,
        e.g. RUN/tokenizer.json, as `Tokenizer.save` is called), and generation_config.json with the decoder start,
        eos and pad ids where the directory has none, so that `load` of the copy has the same ids."""
        import json

        path = Path(path)
        directory = path if path.is_dir() or not path.suffix else path.parent
        with writing(directory):
            directory.mkdir(parents=True, exist_ok=True)
        for name, data in sorted(self.files.items()):
            atomic_write_bytes(directory / name, data)
        if not (directory / GENERATION_CONFIG).is_file():
            forbidden = sorted({self.pad_id, self.bos_id} - {self.eos_id})  # what the twins never emit
            record = {"decoder_start_token_id": self.bos_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id,
                      "bad_words_ids": [[i] for i in forbidden]}
            atomic_write_bytes(directory / GENERATION_CONFIG, (json.dumps(record, indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike, *, decoder_start_id: int | None = None) -> "HFTokenizer":
        """The tokenizer of a Hugging Face directory (or of the directory of a file in it); HFTokenizerError, one
        line naming the directory and the missing file, where it is incomplete."""
        path = Path(path)
        directory = path.parent if path.is_file() else path
        if not directory.is_dir():
            raise HFTokenizerError(f"{directory}: no such directory (cannot read a Hugging Face tokenizer)")
        present = [name for name in FILES if (directory / name).is_file()]
        config: dict[str, Any] = {}
        if TOKENIZER_CONFIG in present:
            config = read_json(directory / TOKENIZER_CONFIG, "tokenizer config", error=HFTokenizerError)
            kind = config.get("tokenizer_class")
        elif any(name in present for name in MARIAN_FILES):
            kind = "MarianTokenizer"
        elif TOKENIZER_FILE in present:
            raise HFTokenizerError(f"{directory}: missing {TOKENIZER_CONFIG} (a Hugging Face tokenizer directory "
                                   f"needs it beside {TOKENIZER_FILE})")
        else:
            raise HFTokenizerError(f"{directory}: missing {TOKENIZER_CONFIG} (not a Hugging Face tokenizer "
                                   f"directory: no tokenizer files)")
        required = REQUIRED.get(kind, ())
        if kind == "MarianTokenizer" and config.get("separate_vocabs"):
            required += ("target_vocab.json",)
        for name in required:
            if name not in present:
                raise HFTokenizerError(f"{directory}: missing {name} (a {kind} directory needs "
                                       f"{', '.join(required)})")
        files = {name: read_bytes(directory / name, "tokenizer", error=HFTokenizerError) for name in present}
        try:
            from transformers import AutoTokenizer, MarianTokenizer
        except ImportError as e:
            raise HFTokenizerError(f"{directory}: a Hugging Face tokenizer needs transformers and sentencepiece "
                                   f"(pip install 'twin-transformer[hf]'): {_one_line(e)}") from None
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=QUIET)
                if config:
                    hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
                else:
                    hf = MarianTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # transformers' and the backends' own errors for unusable files
            raise HFTokenizerError(f"{directory}: transformers cannot load the tokenizer ({_one_line(e)})") from None
        start = decoder_start_id if decoder_start_id is not None else _declared_start(directory)
        return cls(hf, files, start, str(directory))


def save_fast_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike, *, model_max_length: int | None = None) -> None:
    """Write the project's tokenizer into the directory `path` as a PreTrainedTokenizerFast that
    `AutoTokenizer.from_pretrained(path)` loads offline: tokenizer.json (with a post-processor appending <eos>, so
    transformers' ids are what the twins feed the model: `tokenizer.encode(text) + [eos]`) and tokenizer_config.json
    (<pad> <bos> <eos> <unk>). Needs only the tokenizers library."""
    import json

    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import processors

    raw = RawTokenizer.from_str(tokenizer.hf.to_str())
    raw.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                       special_tokens=[(EOS, tokenizer.eos_id)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD, "bos_token": BOS, "eos_token": EOS,
              "unk_token": UNK, "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    directory = Path(path)
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / TOKENIZER_FILE, raw.to_str(pretty=True).encode())
    atomic_write_bytes(directory / TOKENIZER_CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
