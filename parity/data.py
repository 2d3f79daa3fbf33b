"""Corpora for the three model families: sentence pairs (seq2seq), labelled texts (encoder), texts (decoder).

A corpus is three lists of examples, `train`, `valid` and `test`, disjoint by their first field (the
source or the text). An example is a tuple of strings: (source, target) for seq2seq, (text, label) for
the encoder's classifier, (text,) for the decoder's language model. Nothing here imports a framework.

- builtin: `parity/data/numbers_en_fr.tsv.xz`, 200,000 numbers sampled from 0..999,999 (0 is not
  among them) with their English and French names (num2words; `scripts/make_numbers_corpus.py`
  regenerates it). The file is ordered by `number_rank`; the first 2,000 rows are the test split,
  the next 2,000 validation, the rest training. Per arch:
  - seq2seq: (English, French) pairs;
  - encoder: each English and each French name labelled with the number's leading digit, "1".."9"
    (the split's numbers in both languages: 392,000 / 4,000 / 4,000 examples);
  - decoder: one line per number, "English = French" (prompted with "English =", the model translates).
- a file: seq2seq: TSV (`source<TAB>target` per line) or JSONL (`{"src": ..., "tgt": ...}`); encoder:
  TSV (`text<TAB>label`) or JSONL (`{"text": ..., "label": ...}`); decoder: plain text (one text per
  line) or JSONL (`{"text": ...}`). Split by a hash of the first field (about 2% test, 2% validation,
  at least one example each when there are three or more).
- a directory: `train`, `valid` and `test` files, each in one of the arch's formats (.tsv, .txt, .jsonl).
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from parity.checkpoint import parse_json

NUMBERS_FILE = Path(__file__).resolve().parent / "data" / "numbers_en_fr.tsv.xz"
BUILTIN = "builtin"
BUILTIN_TEST = 2_000
BUILTIN_VALID = 2_000
HELD_OUT_PERCENT = 2
SPLITS = ("train", "valid", "test")
FIELDS = {"seq2seq": ("src", "tgt"), "encoder": ("text", "label"), "decoder": ("text",)}
EXTENSIONS = {"seq2seq": (".tsv", ".jsonl"), "encoder": (".tsv", ".jsonl"), "decoder": (".txt", ".jsonl")}
FIELD_NAMES = {"src": "source", "tgt": "target", "text": "text", "label": "label"}

Pair = tuple[str, str]
Example = tuple[str, ...]


class DataError(ValueError):
    """A dataset that cannot be used: missing, empty or malformed (the message names file and line)."""


def number_rank(n: int) -> bytes:
    """Sort key that orders 0..999,999 pseudo-randomly but reproducibly (BLAKE2b of the decimal string)."""
    return hashlib.blake2b(str(n).encode(), digest_size=8).digest()


@dataclass(frozen=True)
class Corpus:
    """Disjoint train/valid/test examples of one arch, where they came from, and the class names (encoder)."""

    name: str
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    arch: str = "seq2seq"
    labels: tuple[str, ...] | None = None

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def texts(self) -> Iterator[str]:
        """The training texts a tokenizer learns from: both sides of pairs, never the labels."""
        for example in self.train:
            yield from example[:1] if self.arch == "encoder" else example

    def fingerprint(self) -> str:
        """SHA-256 of the training examples: a resumed run checks that it sees the same data."""
        digest = hashlib.sha256()
        for example in self.train:
            digest.update(("\t".join(example) + "\n").encode())
        return digest.hexdigest()


def load_corpus(data: str | os.PathLike, *, limit: int | None = None, arch: str = "seq2seq") -> Corpus:
    """`builtin`, a file or a directory of split files, for `arch`. `limit` caps the training examples."""
    if arch not in FIELDS:
        raise DataError(f"unknown arch {arch!r}; expected one of {', '.join(FIELDS)}")
    if str(data) == BUILTIN:
        corpus = _builtin(arch)
    else:
        path = Path(data)
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError as e:  # e.g. a name too long
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
        if is_dir:
            corpus = Corpus(str(path), *(_read_split(path, name, arch) for name in SPLITS), arch=arch)
        elif is_file:
            corpus = _split_by_hash(str(path), read_examples(path, FIELDS[arch]), arch)
        else:
            formats = "/".join(EXTENSIONS[arch])
            raise DataError(f"{path}: no such file or directory (expected '{BUILTIN}', a {formats} file or a "
                            f"directory with train/valid/test files)")
    if limit is not None:
        corpus = Corpus(corpus.name, corpus.train[:limit], corpus.valid, corpus.test, arch, corpus.labels)
    for name in SPLITS:
        if not corpus.split(name):
            raise DataError(f"{corpus.name}: the {name} split is empty; need at least one example in each split")
    return _with_labels(corpus) if arch == "encoder" else corpus


def leading_digit(number: int) -> str:
    """The builtin classification label: the first digit of a positive number, "1".."9"."""
    return str(number)[0]


@functools.cache
def _builtin_rows() -> tuple[tuple[str, ...], ...]:
    """The embedded corpus's (number, English, French) rows, decompressed and parsed once per process."""
    return tuple(tuple(row.split("\t")) for row in lzma.decompress(NUMBERS_FILE.read_bytes()).decode().splitlines())


def _builtin(arch: str) -> Corpus:
    rows = _builtin_rows()
    if arch == "seq2seq":
        examples = [[(en, fr)] for _, en, fr in rows]
    elif arch == "encoder":
        examples = [[(en, leading_digit(int(n))), (fr, leading_digit(int(n)))] for n, en, fr in rows]
    else:
        examples = [[(f"{en} = {fr}",)] for _, en, fr in rows]
    held_out = BUILTIN_TEST + BUILTIN_VALID

    def flat(part: list[list[Example]]) -> list[Example]:
        return [example for group in part for example in group]

    return Corpus(BUILTIN, flat(examples[held_out:]), flat(examples[BUILTIN_TEST:held_out]),
                  flat(examples[:BUILTIN_TEST]), arch)


def _with_labels(corpus: Corpus) -> Corpus:
    """The corpus with its class names: the training split's labels, sorted; held-out labels must be among them."""
    labels = tuple(sorted({label for _, label in corpus.train}))
    if len(labels) < 2:
        raise DataError(f"{corpus.name}: a classifier needs at least 2 labels in the training split, found "
                        f"{len(labels)}")
    for name in ("valid", "test"):
        unseen = sorted({label for _, label in corpus.split(name)} - set(labels))
        if unseen:
            raise DataError(f"{corpus.name}: the {name} split has labels the training split lacks: "
                            f"{', '.join(map(repr, unseen[:5]))}")
    return Corpus(corpus.name, corpus.train, corpus.valid, corpus.test, corpus.arch, labels)


def _read_split(directory: Path, name: str, arch: str) -> list[Example]:
    candidates = [directory / f"{name}{ext}" for ext in EXTENSIONS[arch]]
    found = [path for path in candidates if path.is_file()]
    if len(found) != 1:
        raise DataError(f"{directory}: expected exactly one of {', '.join(p.name for p in candidates)}, "
                        f"found {len(found)}")
    return read_examples(found[0], FIELDS[arch])


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Sentence pairs of a `.tsv` or `.jsonl` file (blank lines skipped); DataError names file and line."""
    return read_examples(path, FIELDS["seq2seq"])


def read_examples(path: str | os.PathLike, fields: tuple[str, ...]) -> list[Example]:
    """Examples with `fields` of a `.jsonl` file (objects with exactly those keys), or else one per line:
    tab-separated fields, or the whole line for a single field. Blank lines are skipped; DataError names
    file and line."""
    path = Path(path)
    jsonl = path.suffix == ".jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        example = (_parse_row(parse_json(line, f"{path}:{number}", error=DataError, expect=None), fields) if jsonl
                   else _parse_line(line, fields))
        if isinstance(example, str):
            raise DataError(f"{path}:{number}: {example}")
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no {'sentence pairs' if fields == FIELDS['seq2seq'] else 'examples'}")
    return examples


def _parse_line(line: str, fields: tuple[str, ...]) -> Example | str:
    values = line.split("\t") if len(fields) > 1 else [line]
    if len(values) != len(fields):
        names = ", ".join(FIELD_NAMES[f] for f in fields)
        return f"expected {len(fields)} tab-separated fields ({names}), found {len(values)}"
    return _checked([v.strip() for v in values], fields)


def _parse_row(row: Any, fields: tuple[str, ...]) -> Example | str:
    """The example of one parsed JSONL line, or what is wrong with it."""
    quoted = [f'"{f}"' for f in fields]
    if not isinstance(row, dict) or set(row) != set(fields):
        keys = " and ".join(quoted)
        return f"expected an object with exactly the key{'s' if len(fields) > 1 else ''} {keys}"
    if not all(isinstance(row[f], str) for f in fields):
        return f"{' and '.join(quoted)} must be strings" if len(fields) > 1 else f"{quoted[0]} must be a string"
    return _checked([row[f].strip() for f in fields], fields)


def _checked(values: list[str], fields: tuple[str, ...]) -> Example | str:
    if not all(values):
        return f"empty {' or '.join(FIELD_NAMES[f] for f in fields)}"
    return tuple(values)


def _split_by_hash(name: str, examples: list[Example], arch: str) -> Corpus:
    """Held-out splits by a hash of the first field, so a repeated source or text never crosses splits."""
    buckets: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for example in examples:
        bucket = int.from_bytes(hashlib.blake2b(example[0].encode(), digest_size=8).digest(), "big") % 100
        split = "test" if bucket < HELD_OUT_PERCENT else "valid" if bucket < 2 * HELD_OUT_PERCENT else "train"
        buckets[split].append(example)
    for split in ("test", "valid"):
        if not buckets[split] and len(buckets["train"]) > 1:
            first = buckets["train"][-1][0]
            buckets[split] = [e for e in buckets["train"] if e[0] == first]
            buckets["train"] = [e for e in buckets["train"] if e[0] != first]
    return Corpus(name, buckets["train"], buckets["valid"], buckets["test"], arch)
