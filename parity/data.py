"""Sentence-pair corpora: the embedded English -> French number names, and the user's TSV/JSONL.

A corpus is three lists of (source, target) strings, `train`, `valid` and `test`, disjoint by
source text. Nothing here imports a framework.

- builtin: `parity/data/numbers_en_fr.tsv.xz`, 200,000 numbers sampled from 0..999,999 with their
  English and French names (num2words; `scripts/make_numbers_corpus.py` regenerates it). The file
  is ordered by `number_rank`; the first 2,000 rows are the test split, the next 2,000 validation,
  the rest training.
- a file: TSV (`source<TAB>target` per line) or JSONL (`{"src": ..., "tgt": ...}` per line), split
  by a hash of the source text (about 2% test, 2% validation, at least one pair each when there
  are three or more).
- a directory: `train`, `valid` and `test` files, each `.tsv` or `.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from dataclasses import dataclass
from pathlib import Path

NUMBERS_FILE = Path(__file__).resolve().parent / "data" / "numbers_en_fr.tsv.xz"
BUILTIN = "builtin"
BUILTIN_TEST = 2_000
BUILTIN_VALID = 2_000
HELD_OUT_PERCENT = 2
SPLITS = ("train", "valid", "test")

Pair = tuple[str, str]


class DataError(ValueError):
    """A dataset that cannot be used: missing, empty or malformed (the message names file and line)."""


def number_rank(n: int) -> bytes:
    """Sort key that orders 0..999,999 pseudo-randomly but reproducibly (BLAKE2b of the decimal string)."""
    return hashlib.blake2b(str(n).encode(), digest_size=8).digest()


@dataclass(frozen=True)
class Corpus:
    """Disjoint train/valid/test sentence pairs and where they came from."""

    name: str
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]

    def split(self, name: str) -> list[Pair]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def fingerprint(self) -> str:
        """SHA-256 of the training pairs: a resumed run checks that it sees the same data."""
        digest = hashlib.sha256()
        for src, tgt in self.train:
            digest.update(f"{src}\t{tgt}\n".encode())
        return digest.hexdigest()


def load_corpus(data: str | os.PathLike, *, limit: int | None = None) -> Corpus:
    """`builtin`, a TSV/JSONL file or a directory of split files. `limit` caps the training pairs."""
    if str(data) == BUILTIN:
        corpus = _builtin()
    else:
        path = Path(data)
        if path.is_dir():
            corpus = Corpus(str(path), *(_read_split(path, name) for name in SPLITS))
        elif path.is_file():
            corpus = _split_by_hash(str(path), read_pairs(path))
        else:
            raise DataError(f"{path}: no such file or directory (expected '{BUILTIN}', a .tsv/.jsonl file or a "
                            f"directory with train/valid/test files)")
    if limit is not None:
        corpus = Corpus(corpus.name, corpus.train[:limit], corpus.valid, corpus.test)
    for name in SPLITS:
        if not corpus.split(name):
            raise DataError(f"{corpus.name}: the {name} split is empty; need at least one sentence pair in each split")
    return corpus


def _builtin() -> Corpus:
    rows = lzma.decompress(NUMBERS_FILE.read_bytes()).decode().splitlines()
    pairs = [tuple(row.split("\t")[1:]) for row in rows]
    held_out = BUILTIN_TEST + BUILTIN_VALID
    return Corpus(BUILTIN, pairs[held_out:], pairs[BUILTIN_TEST:held_out], pairs[:BUILTIN_TEST])


def _read_split(directory: Path, name: str) -> list[Pair]:
    found = [directory / f"{name}{ext}" for ext in (".tsv", ".jsonl") if (directory / f"{name}{ext}").is_file()]
    if len(found) != 1:
        raise DataError(f"{directory}: expected exactly one of {name}.tsv, {name}.jsonl, found {len(found)}")
    return read_pairs(found[0])


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Sentence pairs of a `.tsv` or `.jsonl` file (blank lines skipped); DataError names file and line."""
    path = Path(path)
    jsonl = path.suffix == ".jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        pair = _parse_jsonl(line) if jsonl else _parse_tsv(line)
        if isinstance(pair, str):
            raise DataError(f"{path}:{number}: {pair}")
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: no sentence pairs")
    return pairs


def _parse_tsv(line: str) -> Pair | str:
    fields = line.split("\t")
    if len(fields) != 2:
        return f"expected 2 tab-separated fields (source, target), found {len(fields)}"
    return _checked(fields[0].strip(), fields[1].strip())


def _parse_jsonl(line: str) -> Pair | str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg})"
    if not isinstance(row, dict) or set(row) != {"src", "tgt"}:
        return 'expected an object with exactly the keys "src" and "tgt"'
    if not isinstance(row["src"], str) or not isinstance(row["tgt"], str):
        return '"src" and "tgt" must be strings'
    return _checked(row["src"].strip(), row["tgt"].strip())


def _checked(src: str, tgt: str) -> Pair | str:
    if not src or not tgt:
        return "empty source or target"
    return src, tgt


def _split_by_hash(name: str, pairs: list[Pair]) -> Corpus:
    """Held-out splits by a hash of the source, so a repeated source never crosses splits."""
    buckets: dict[str, list[Pair]] = {split: [] for split in SPLITS}
    for pair in pairs:
        bucket = int.from_bytes(hashlib.blake2b(pair[0].encode(), digest_size=8).digest(), "big") % 100
        split = "test" if bucket < HELD_OUT_PERCENT else "valid" if bucket < 2 * HELD_OUT_PERCENT else "train"
        buckets[split].append(pair)
    for split in ("test", "valid"):
        if not buckets[split] and len(buckets["train"]) > 1:
            source = buckets["train"][-1][0]
            buckets[split] = [p for p in buckets["train"] if p[0] == source]
            buckets["train"] = [p for p in buckets["train"] if p[0] != source]
    return Corpus(name, buckets["train"], buckets["valid"], buckets["test"])
