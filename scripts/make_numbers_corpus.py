"""Regenerate the embedded corpus `parity/data/numbers_en_fr.tsv.xz` with `num2words`.

Each row is `number<TAB>English<TAB>French`. The numbers are a fixed sample of 0..999,999: every
number is ranked by the BLAKE2b hash of its decimal string and the first `--size` are kept, so the
sample (and the split made from the same ranking in `parity.data`) never depends on a random
generator. Shipping the generated file pins the text against changes in num2words.

    python scripts/make_numbers_corpus.py [--size 200000] [--jobs 2]
"""

from __future__ import annotations

import argparse
import lzma
from multiprocessing import Pool
from pathlib import Path

from parity.data import NUMBERS_FILE, number_rank


def _pair(n: int) -> str:
    from num2words import num2words

    return f"{n}\t{num2words(n, lang='en')}\t{num2words(n, lang='fr')}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=NUMBERS_FILE)
    args = parser.parse_args()
    numbers = sorted(range(1_000_000), key=number_rank)[: args.size]
    with Pool(args.jobs) as pool:
        rows = pool.map(_pair, numbers, chunksize=2000)
    args.out.write_bytes(lzma.compress("".join(rows).encode(), preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {len(rows)} rows to {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
