"""`twin translate` and `twin eval` end to end on the shipped tiny run: arguments and stdin, order, torch vs
JAX, attention plots, scores, and every kind of bad input (one line on stderr, exit 1, nothing written)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity.checkpoint import load_config, save_checkpoint
from parity.translate import Translator
from cli_helpers import twin
from strategies import random_weights

TINY_RUN = Path(__file__).resolve().parent / "data" / "tiny_run"
PNG = b"\x89PNG\r\n\x1a\n"
PAIRS = [("six hundred and sixty-five thousand, four hundred and eighty-eight",  # the first test pairs
          "six cent soixante-cinq mille quatre cent quatre-vingt-huit"),
         ("nine hundred and fifteen thousand, three hundred and thirty-one",
          "neuf cent quinze mille trois cent trente et un"),
         ("seven hundred and forty thousand and seventy-five", "sept cent quarante mille soixante-quinze"),
         ("four hundred and ninety-nine thousand, nine hundred and ninety-six",
          "quatre cent quatre-vingt-dix-neuf mille neuf cent quatre-vingt-seize"),
         ("fifty-two thousand, nine hundred and twenty-six", "cinquante-deux mille neuf cent vingt-six"),
         ("four hundred and seventy-seven thousand, one hundred", "quatre cent soixante-dix-sept mille cent")]
SOURCES, EXPECTED = [p[0] for p in PAIRS], [p[1] for p in PAIRS]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def run_dir() -> Path:
    """The shipped tiny run (scripts/make_test_run.py): 98.8% exact match, so translations are meaningful."""
    return TINY_RUN


def test_arguments_stdin_order_and_batching_agree(run_dir, capsys, monkeypatch):
    code, out, err = twin(capsys, monkeypatch, "translate", str(run_dir), *SOURCES)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines == EXPECTED
    code, out_stdin, _ = twin(capsys, monkeypatch, "translate", str(run_dir), stdin="\n".join(SOURCES) + "\n")
    assert code == 0 and out_stdin == out
    crlf = "\r\n".join(f" {s}\t" for s in SOURCES)  # CRLF, surrounding blanks, no final newline
    code, out_crlf, _ = twin(capsys, monkeypatch, "translate", str(run_dir), stdin=crlf)
    assert code == 0 and out_crlf == out
    code, out_reversed, _ = twin(capsys, monkeypatch, "translate", str(run_dir), "--batch-size", "2",
                                 *SOURCES[::-1])
    assert code == 0 and out_reversed.splitlines() == lines[::-1]
    code, out_mixed, _ = twin(capsys, monkeypatch, "translate", str(run_dir), SOURCES[0], "--batch-size", "1",
                              *SOURCES[1:])  # TEXTs on both sides of an option
    assert code == 0 and out_mixed == out


@pytest.mark.parametrize("beam", [1, 2])
def test_torch_and_jax_translate_alike(run_dir, beam):
    torch_tr, jax_tr = Translator.load(run_dir, "torch"), Translator.load(run_dir, "jax")
    assert torch_tr.translate(SOURCES, beam_size=beam) == jax_tr.translate(SOURCES, beam_size=beam) == EXPECTED
    if beam == 1:
        found = [tr.attention(SOURCES[0]) for tr in (torch_tr, jax_tr)]
        assert found[0].out_tokens == found[1].out_tokens and found[0].src_tokens == found[1].src_tokens
        np.testing.assert_allclose(found[0].weights, found[1].weights, atol=1e-5)


def test_installed_command_reads_stdin(run_dir, capsys, monkeypatch):
    twin_bin = Path(sys.executable).with_name("twin")
    if not twin_bin.is_file():
        pytest.skip(f"no {twin_bin} (pip install -e . makes it)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(twin_bin), "translate", str(run_dir), "--beam", "2"], input="seven\nforty\n",
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    _, expected, _ = twin(capsys, monkeypatch, "translate", str(run_dir), "--beam", "2", "seven", "forty")
    assert result.stdout == expected and len(expected.splitlines()) == 2


def test_plot_attention(run_dir, tmp_path, capsys, monkeypatch):
    found = Translator.load(run_dir).attention(SOURCES[1])
    cfg = json.loads((run_dir / "config.json").read_text())
    assert found.weights.shape == (cfg["num_decoder_layers"], cfg["num_heads"], len(found.out_tokens),
                                   len(found.src_tokens))
    np.testing.assert_allclose(found.weights.sum(-1), 1.0, rtol=1e-5)  # softmax over the source, pads excluded
    assert found.src_tokens[-1] == "<eos>"
    for heads in ([], ["--plot-heads"]):
        png = tmp_path / f"attention{len(heads)}.png"
        code, out, err = twin(capsys, monkeypatch, "translate", str(run_dir), "--plot-attention", str(png), *heads,
                              stdin=SOURCES[1] + "\n")
        assert code == 0 and err == "" and out == found.translation + "\n"
        assert png.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention0.png", "attention1.png"]  # no temp files left


def test_eval_prints_and_writes_scores(run_dir, tmp_path, capsys, monkeypatch):
    path = tmp_path / "scores.json"
    code, out, err = twin(capsys, monkeypatch, "eval", str(run_dir), "--limit", "50", "--json", str(path))
    assert code == 0, err
    assert "BLEU" in out and "chrF" in out and "exact match" in out and "50 sentences" in out
    assert "sentences/s" in out
    scores = json.loads(path.read_text())
    assert scores["sentences"] == 50 and scores["data"] == "builtin" and scores["framework"] == "torch"
    assert scores["bleu"] > 90 and scores["chrf"] > 90 and scores["exact_match"] >= 0.9  # a 98.8% model
    assert len(scores["translations"]) == 50 and scores["translations"][0]["ref"] == EXPECTED[0]
    assert scores["exact_match"] == np.mean([t["hyp"] == t["ref"] for t in scores["translations"]])
    assert f"BLEU {scores['bleu']:.2f}" in out


def _copy_run(run_dir: Path, to: Path, *leave_out: str) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("checkpoints", *leave_out))
    return to


LONG = " ".join(["one hundred"] * 40)

# (arguments after RUN_DIR, stdin, exit status, words the one-line message must contain)
BAD_TRANSLATE = {
    "empty line": ([], "seven\n\nnine\n", 1, ["line 2", "empty"]),
    "blank argument": (["seven", "  "], None, 1, ["text 2", "empty"]),
    "empty stdin": ([], "", 1, ["stdin is empty"]),
    "unknown characters": ([], "seven\nnine Ω1\n", 1, ["line 2", "'Ω'", "'1'", "never seen"]),
    "unknown characters argument": (["Seven"], None, 1, ["text 1", "'S'"]),
    "too long": ([LONG], None, 1, ["text 1", "too long", "81", "at most 64"]),
    "beam 0": (["--beam", "0", "seven"], None, 1, ["--beam", "at least 1", "0"]),
    "beam negative": (["--beam", "-3", "seven"], None, 1, ["--beam", "-3"]),
    "beam not a number": (["--beam", "two", "seven"], None, 2, ["--beam", "invalid int"]),
    "temperature negative": (["--temperature", "-1", "seven"], None, 1, ["--temperature", ">= 0"]),
    "temperature nan": (["--temperature", "nan", "seven"], None, 1, ["--temperature", "finite"]),
    "top-p zero": (["--temperature", "1", "--top-p", "0", "seven"], None, 1, ["--top-p", "(0, 1]"]),
    "top-p above one": (["--temperature", "1", "--top-p", "1.5", "seven"], None, 1, ["--top-p", "1.5"]),
    "top-k negative": (["--temperature", "1", "--top-k", "-1", "seven"], None, 1, ["--top-k", ">= 0"]),
    "top-k without sampling": (["--top-k", "5", "seven"], None, 1, ["--top-k", "--temperature > 0"]),
    "sampling with beam": (["--temperature", "1", "--beam", "2", "seven"], None, 1, ["--beam", "--temperature"]),
    "length penalty negative": (["--length-penalty", "-1", "seven"], None, 1, ["--length-penalty"]),
    "max-new-tokens 0": (["--max-new-tokens", "0", "seven"], None, 1, ["--max-new-tokens", "at least 1"]),
    "max-new-tokens above max_len": (["--max-new-tokens", "1000", "seven"], None, 1, ["1000", "max_len 64"]),
    "batch size 0": (["--batch-size", "0", "seven"], None, 1, ["--batch-size", "at least 1"]),
    "plot two texts": (["--plot-attention", "{tmp}/a.png", "seven", "nine"], None, 1, ["one sentence", "2 texts"]),
    "plot two lines": (["--plot-attention", "{tmp}/a.png"], "seven\nnine\n", 1, ["one sentence", "2 lines"]),
    "plot into a missing dir": (["--plot-attention", "{tmp}/missing/a.png", "seven"], None, 1,
                                ["--plot-attention", "missing/a.png", "No such file"]),
    "plot under a file": (["--plot-attention", "{tmp}/file.txt/a.png", "seven"], None, 1, ["file.txt/a.png",
                                                                                            "cannot write"]),
    "plot onto a dir": (["--plot-attention", "{tmp}", "seven"], None, 1, ["is a directory"]),
}


@pytest.mark.parametrize("case", list(BAD_TRANSLATE))
def test_bad_translate_input(case, run_dir, tmp_path, capsys, monkeypatch):
    args, stdin, status, words = BAD_TRANSLATE[case]
    (tmp_path / "file.txt").write_text("x")
    code, out, err = twin(capsys, monkeypatch, "translate", str(run_dir),
                          *[a.replace("{tmp}", str(tmp_path)) for a in args], stdin=stdin)
    assert code == status and out == ""
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("twin translate: ")
    if status == 1:
        assert len(err.strip().splitlines()) == 1
    for word in words:
        assert word in line, (word, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing written, no temp files


@pytest.mark.parametrize("case", ["missing", "a file", "no tokenizer", "no config", "bad weights", "encoder",
                                  "decoder"])
def test_bad_run_dir(case, run_dir, tmp_path, capsys, monkeypatch):
    if case in ("encoder", "decoder"):
        path, words = _copy_run(run_dir, tmp_path / "run"), [f"{case}-only model", "need a seq2seq run"]
        cfg = load_config(path).for_arch(case)
        save_checkpoint(path, cfg, random_weights(cfg, "float32"))
    elif case == "missing":
        path, words = tmp_path / "nope", ["nope", "no such directory"]
    elif case == "a file":
        path, words = tmp_path / "plain", ["plain", "no such directory"]
        path.write_text("x")
    elif case == "bad weights":
        path, words = _copy_run(run_dir, tmp_path / "run"), ["model.safetensors", "not safetensors"]
        (path / "model.safetensors").write_bytes(b"not safetensors")
    else:
        missing = "tokenizer.json" if case == "no tokenizer" else "config.json"
        path, words = _copy_run(run_dir, tmp_path / "run", missing), ["not a run directory", missing]
    for command, args in (("translate", ["seven"]), ("eval", ["--limit", "2"])):
        code, out, err = twin(capsys, monkeypatch, command, str(path), *args)
        assert code == 1 and out == "" and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"twin {command}: ")
        for word in words:
            assert word in err, (word, err)


def test_eval_needs_data_without_train_config(run_dir, tmp_path, capsys, monkeypatch):
    path = _copy_run(run_dir, tmp_path / "run", "train_config.json")
    code, out, err = twin(capsys, monkeypatch, "eval", str(path), "--limit", "2")
    assert code == 1 and out == "" and err.startswith("twin eval: ") and "pass --data" in err
    code, out, err = twin(capsys, monkeypatch, "eval", str(path), "--limit", "2", "--data", "builtin")
    assert code == 0 and "2 sentences" in out, err


@pytest.mark.parametrize("args, words", [
    (["--limit", "0"], ["--limit", "at least 1"]),
    (["--beam", "0"], ["--beam", "at least 1"]),
    (["--data", "{tmp}/none.tsv"], ["none.tsv", "no such file"]),
    (["--json", "{tmp}/missing/s.json"], ["--json", "No such file"]),
])
def test_bad_eval_input(args, words, run_dir, tmp_path, capsys, monkeypatch):
    code, out, err = twin(capsys, monkeypatch, "eval", str(run_dir), *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 1 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("twin eval: ")
    for word in words:
        assert word in err
    assert list(tmp_path.iterdir()) == []
