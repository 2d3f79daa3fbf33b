"""`twin` in the test process, for the CLI tests that read its exit status and output."""

from __future__ import annotations

import io
import sys

from parity.cli import main


def twin(capsys, monkeypatch, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """`twin ARGS` in this process: (exit status, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
