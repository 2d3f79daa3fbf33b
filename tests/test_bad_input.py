"""Bad input and failed writes end in one line naming the file, exit status 1, nothing lost and nothing
half-written left behind: hostile JSON in every file `twin` reads (a config.json nested 100,000 levels
deep, not UTF-8, garbage, the wrong top-level type, wrong field types), paths that cannot be read or
written, and a full disk during `twin train` and `twin convert` (a real tmpfs when the tests run as
root and `mount` works)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from parity import checkpoint, cli, formats
from parity.checkpoint import CheckpointError, WriteError, append_bytes, atomic_write_bytes, read_json
from parity.data import DataError, load_corpus
from parity.tokenizer import Tokenizer
from parity.train import (TrainConfig, checkpoint_dirs, load_training_checkpoint, read_metrics, run,
                          save_training_checkpoint)

DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE_JSON = {
    "deep array": DEEP.encode(),
    "deep object": ('{"a": ' * 100_000 + "1" + "}" * 100_000).encode(),
    "not UTF-8": b'{"d_model": "\xff\xfe"}',
    "binary garbage": bytes(range(256)) * 4,
    "empty": b"",
    "truncated": b'{"d_model": 32, "num_heads": [2',
    "an array": b"[1, 2, 3]",
    "a 5000-digit integer": b'{"d_model": ' + b"1" * 5000 + b"}",
}
STEP = "checkpoints/step_0000004"
TRAIN = ["--config", "tiny", "--max-tokens", "256", "--no-progress", "--test-limit", "0"]


def twin(capsys, *args: str) -> tuple[int, str, str]:
    """`twin ARGS` in this process: (exit status, stdout, stderr); a traceback fails the test."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args: str, naming: str | Path) -> str:
    """The one line `twin ARGS` answers with (exit status 1), which names `naming`."""
    code, _, err = twin(capsys, *args)
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert str(naming) in err, err
    return err.strip()


def leftovers(root: Path) -> list[Path]:
    """Temporary files and directories (`*.tmp*`, orbax's `*.orbax-checkpoint-tmp*`) under `root`."""
    return [p for p in root.rglob("*") if ".tmp" in p.name or "orbax-checkpoint-tmp" in p.name]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small TSV corpus (300 pairs): a tiny tokenizer and quick runs."""
    path = tmp_path_factory.mktemp("data") / "pairs.tsv"
    path.write_text("".join(f"number {n} of {n % 7}\tnombre {n} de {n % 7}\n" for n in range(300)))
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data) -> Path:
    """A finished torch run: 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "run"
    run("torch", str(data), out, model="tiny", tcfg=TrainConfig(steps=4, save_every=2, eval_every=2, log_every=1,
                                                                max_tokens=256, vocab_size=200),
        test_limit=0, progress=False, echo=lambda text: None)
    return out


@pytest.fixture
def a_run(base_run, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def resume(a_run: Path, data: Path) -> list[str]:
    return ["train", "--resume", "--out", a_run, "--data", data, "--steps", "5", *TRAIN]


# ------------------------------------------------------------------------------- the shared reader

@pytest.mark.parametrize("name", list(HOSTILE_JSON))
def test_read_json_turns_any_malformed_file_into_one_line(tmp_path, name):
    path = tmp_path / "config.json"
    path.write_bytes(HOSTILE_JSON[name])
    with pytest.raises(CheckpointError) as raised:
        read_json(path, "config")
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert {"deep array": "nested too deeply", "deep object": "nested too deeply", "not UTF-8": "not UTF-8",
            "binary garbage": "not valid JSON", "empty": "not valid JSON", "truncated": "not valid JSON",
            "an array": "expected a JSON object, got array", "a 5000-digit integer": "4300 digits"}[name] in message


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file (cannot read config)"),
    ("a directory", "is a directory, not a config file"),
    ("a symlink loop", "Too many levels of symbolic links"),
    ("under a file", "Not a directory"),
    ("a name too long", "File name too long"),
])
def test_read_json_names_paths_that_cannot_be_read(tmp_path, case, message):
    path = {"missing": tmp_path / "none.json", "a directory": tmp_path, "a symlink loop": tmp_path / "loop.json",
            "under a file": tmp_path / "file" / "config.json", "a name too long": tmp_path / ("x" * 300)}[case]
    (tmp_path / "loop.json").symlink_to(tmp_path / "loop.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=re.escape(message)) as raised:
        read_json(path, "config")
    assert str(raised.value).startswith(f"{path}: ")


# ------------------------------------------------------------------------- every JSON file twin reads

COMMANDS = {
    "translate": lambda run_dir, tmp: ["translate", run_dir, "number 3"],
    "eval": lambda run_dir, tmp: ["eval", run_dir, "--limit", "2"],
    "convert": lambda run_dir, tmp: ["convert", run_dir, tmp / "out.pt", "--to", "torch"],
    "parity": lambda run_dir, tmp: ["parity", run_dir, "--dtypes", "float32"],
    "train --init-from": lambda run_dir, tmp: ["train", "--init-from", run_dir, "--out", tmp / "new", "--steps", "1",
                                               *TRAIN],
    "train --resume": lambda run_dir, tmp: ["train", "--resume", "--out", run_dir, "--steps", "5", *TRAIN],
}


@pytest.mark.parametrize("name", list(HOSTILE_JSON))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_hostile_config_json_is_one_line_in_every_command(a_run, tmp_path, capsys, command, name):
    (a_run / "config.json").write_bytes(HOSTILE_JSON[name])
    refused(capsys, *COMMANDS[command](a_run, tmp_path), naming=a_run / "config.json")
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "new" / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["deep array", "not UTF-8", "binary garbage", "an array", "truncated"])
@pytest.mark.parametrize("file", ["train_config.json", f"{STEP}/trainer_state.json", f"{STEP}/config.json",
                                  "metrics.jsonl", "tokenizer.json"])
def test_hostile_run_files_are_one_line_on_resume(a_run, data, capsys, file, name):
    content = HOSTILE_JSON[name]
    if file == "metrics.jsonl":  # a bad line among good ones (a bad last line without newline is a torn write)
        lines = (a_run / file).read_bytes().split(b"\n")
        content = b"\n".join(lines[:2] + [content.replace(b"\n", b" ")] + lines[2:])
    (a_run / file).write_bytes(content)
    before = (a_run / "model.safetensors").read_bytes()
    line = refused(capsys, *resume(a_run, data), naming=a_run / file)
    if file == "metrics.jsonl":
        assert f"{a_run / file}:3: " in line
    assert (a_run / "model.safetensors").read_bytes() == before and [p.name for p in checkpoint_dirs(a_run)] == [
        "step_0000002", "step_0000004"]


@pytest.mark.parametrize("change, message", [
    ({"step": "4"}, '"step" must be a non-negative int'),
    ({"step": -1}, '"step" must be a non-negative int'),
    ({"position": [0]}, '"position" must be [epoch, index]'),
    ({"position": [0.5, 1]}, '"position" must be [epoch, index]'),
    ({"position": None}, '"position" must be [epoch, index]'),
    ({"tokenizer": 5}, '"tokenizer" must be a string'),
])
def test_wrong_field_types_in_trainer_state_are_named(a_run, data, capsys, change, message):
    path = a_run / STEP / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    assert message in refused(capsys, *resume(a_run, data), naming=path)


@pytest.mark.parametrize("change, message", [
    (5, '"train" must be a JSON object'),
    ({"warmup_steps": "400"}, "warmup_steps must be an int"),
    ({"betas": 5}, "betas must be two numbers"),
    ({"lr_factor": None}, "lr_factor must be a finite number"),
    ({"pack": 1}, "pack must be a bool"),
    ({"colour": 1}, "unknown config keys: colour"),
])
def test_wrong_field_types_in_train_config_are_named(a_run, data, capsys, change, message):
    path = a_run / "train_config.json"
    saved = json.loads(path.read_text())
    saved["train"] = change if not isinstance(change, dict) else {**saved["train"], **change}
    path.write_text(json.dumps(saved))
    assert message in refused(capsys, *resume(a_run, data), naming=path)


@pytest.mark.parametrize("record, message", [
    ({"split": "train", "loss": 1.0, "nll": 1.0}, 'expected a record with "step"'),
    ({"step": 1, "split": "valid"}, 'a valid record needs numbers "loss" and "nll"'),
    ({"step": "1", "split": "train", "loss": 1.0, "nll": 1.0}, 'expected a record with "step"'),
])
def test_malformed_metrics_records_are_named_with_their_line(a_run, data, capsys, record, message):
    path = a_run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:1], json.dumps(record), *lines[1:]]) + "\n")
    assert f"{path}:2: {message}" in refused(capsys, *resume(a_run, data), naming=path)


def test_a_torn_last_metrics_line_is_left_out_and_the_run_resumes(a_run, data, capsys):
    path = a_run / "metrics.jsonl"
    good = read_metrics(a_run)
    path.write_bytes(path.read_bytes() + b'{"step": 5, "spl')  # a crash in the middle of an append
    assert read_metrics(a_run) == good
    code, _, err = twin(capsys, *resume(a_run, data))
    assert code == 0, err
    assert [r["step"] for r in read_metrics(a_run) if r["split"] == "train"] == [1, 2, 3, 4, 5]


def test_an_rng_state_of_the_wrong_size_is_named(a_run, data, capsys):
    path = a_run / STEP / "optimizer.safetensors"
    arrays = load_file(str(path))
    arrays["rng.torch"] = arrays["rng.torch"][:10]
    save_file(arrays, str(path))
    assert "cannot resume from it" in refused(capsys, *resume(a_run, data), naming=path)


def test_integer_adam_moments_are_named(a_run, data, capsys):
    path = a_run / STEP / "optimizer.safetensors"
    arrays = load_file(str(path))
    key = sorted(k for k in arrays if k.startswith("exp_avg."))[0]
    arrays[key] = arrays[key].astype(np.int32)
    save_file(arrays, str(path))
    assert f"{key!r} has dtype int32" in refused(capsys, *resume(a_run, data), naming=path)


@pytest.mark.parametrize("name", ["deep array", "not UTF-8", "an array", "a 5000-digit integer"])
def test_a_hostile_train_config_names_the_file_for_eval(a_run, capsys, name):
    (a_run / "train_config.json").write_bytes(HOSTILE_JSON[name])
    assert "pass --data" in refused(capsys, "eval", a_run, "--limit", "2", naming=a_run / "train_config.json")


@pytest.mark.parametrize("name", list(HOSTILE_JSON))
def test_a_hostile_config_file_for_train_is_one_line(tmp_path, data, capsys, name):
    path = tmp_path / "model.json"
    path.write_bytes(HOSTILE_JSON[name])
    refused(capsys, "train", "--config", path, "--data", data, "--out", tmp_path / "run", "--steps", "1",
            *TRAIN[2:], naming=f"--config {path}")
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("change, message", [
    ({"layer_norm_eps": float("inf")}, "layer_norm_eps must be positive and finite"),
    ({"layer_norm_eps": True}, "layer_norm_eps must be positive and finite"),
    ({"dropout": float("nan")}, "dropout must be in"),
])
def test_non_finite_and_boolean_config_numbers_are_refused(tmp_path, data, capsys, change, message):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(change))  # Python's json writes Infinity and NaN, and reads them back
    assert message in refused(capsys, "train", "--config", path, "--data", data, "--out", tmp_path / "run",
                              "--steps", "1", *TRAIN[2:], naming=path)


@pytest.mark.parametrize("line", [DEEP, '{"src": ' + "1" * 5000 + ', "tgt": "b"}'])
def test_a_hostile_jsonl_line_names_file_and_line(tmp_path, capsys, line):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"src": "a", "tgt": "b"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"pairs.jsonl:2: not usable JSON"):
        load_corpus(path)
    refused(capsys, "train", "--data", path, "--out", tmp_path / "run", "--steps", "1", *TRAIN, naming=f"{path}:2")


def test_a_data_path_with_a_name_too_long_is_one_line(tmp_path, capsys):
    path = tmp_path / ("x" * 300 + ".tsv")
    refused(capsys, "train", "--data", path, "--out", tmp_path / "run", "--steps", "1", *TRAIN, naming=path)


@pytest.mark.parametrize("name", ["deep array", "not UTF-8", "an array", "binary garbage"])
def test_a_hostile_tokenizer_is_named(tmp_path, name):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(HOSTILE_JSON[name])
    with pytest.raises(ValueError) as raised:
        Tokenizer.load(path)
    assert str(raised.value).startswith(f"{path}: ") and "\n" not in str(raised.value)


# -------------------------------------------------------------------------------- safetensors headers

def _safetensors(path: Path, header: bytes, data: bytes = b"\0" * 64) -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


SAFETENSORS_HEADERS = {
    "nested 100,000 deep": (DEEP.encode(), "safetensors header: not usable JSON (nested too deeply)"),
    "not UTF-8": (b'{"\xff": 1}', "safetensors header: not UTF-8"),
    "a 5000-digit integer": (b'{"a": ' + b"1" * 5000 + b"}", "safetensors header: not usable JSON"),
    "__metadata__ not a map": (b'{"__metadata__": 5}', "__metadata__ must map names to strings"),
    "config not a string": (b'{"__metadata__": {"config": 5}}', "__metadata__ must map names to strings"),
    "config nested 100,000 deep": (json.dumps({"__metadata__": {"config": DEEP}}).encode(),
                                   "the config in the safetensors metadata: not usable JSON (nested too deeply)"),
    "config an array": (json.dumps({"__metadata__": {"config": "[1]"}}).encode(),
                        "the config in the safetensors metadata: expected a JSON object, got array"),
    "negative shape": (b'{"a": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}',
                       "malformed safetensors header entry for 'a'"),
    "float shape": (b'{"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}',
                    "malformed safetensors header entry for 'a'"),
    "string offsets": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}',
                       "malformed safetensors header entry for 'a'"),
    "one offset": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}',
                   "malformed safetensors header entry for 'a'"),
    "entry not an object": (b'{"a": 5}', "malformed safetensors header entry for 'a'"),
    "a shape of 2**64 elements": (b'{"a": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}}',
                                  "needs 73786976294838206464 bytes, the header gives 0"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_HEADERS))
@pytest.mark.parametrize("command", ["convert", "parity"])
def test_hostile_safetensors_headers_are_one_line(tmp_path, capsys, case, command):
    header, message = SAFETENSORS_HEADERS[case]
    path = _safetensors(tmp_path / "model.safetensors", header)
    args = (["convert", path, tmp_path / "out.pt", "--to", "torch"] if command == "convert" else
            ["parity", path, "--dtypes", "float32"])
    assert message in refused(capsys, *args, naming=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_header_over_the_format_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "SAFETENSORS_MAX_HEADER", 10)
    path = _safetensors(tmp_path / "model.safetensors", b'{"__metadata__": {"a": "b"}}')
    with pytest.raises(formats.FormatError, match="is more than the format allows"):
        formats.read_checkpoint(path)


def test_orbax_custom_metadata_that_is_not_a_mapping_is_named_by_orbax(base_run, tmp_path, capsys):
    dst = tmp_path / "flax"
    assert twin(capsys, "convert", base_run, dst, "--to", "flax")[0] == 0
    meta = dst / "_CHECKPOINT_METADATA"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "custom_metadata": [1, 2]}))
    assert "not a readable orbax checkpoint" in refused(capsys, "convert", dst, tmp_path / "o.pt", "--to", "torch",
                                                        naming=dst)


@pytest.mark.parametrize("case", ["a symlink loop", "a name too long"])
def test_a_source_that_cannot_be_read_is_one_line(tmp_path, capsys, case):
    path = tmp_path / ("loop.safetensors" if case == "a symlink loop" else "x" * 300 + ".safetensors")
    if case == "a symlink loop":
        path.symlink_to(path)
    line = refused(capsys, "convert", path, tmp_path / "o.pt", "--to", "torch", naming=path)
    assert ("leads nowhere" if case == "a symlink loop" else "File name too long") in line


# ---------------------------------------------------------------------- paths that cannot be written

def test_outputs_that_cannot_be_written_are_one_line(base_run, data, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    long = tmp_path / ("x" * 300)
    assert "is a file, not a run directory" in refused(capsys, "train", "--out", afile, "--data", data, "--steps",
                                                       "1", *TRAIN, naming=afile)
    assert "File name too long" in refused(capsys, "train", "--out", long, "--data", data, "--steps", "1", *TRAIN,
                                           naming=long)
    for dst, message in ((afile / "x.pt", "is a file, not a directory"), (Path(f"{long}.pt"), "File name too long"),
                         (long, "File name too long")):
        assert message in refused(capsys, "convert", base_run, dst, "--to", "torch", naming=dst)
    png = Path(f"{long}.png")
    assert "File name too long" in refused(capsys, "translate", base_run, "number 3", "--plot-attention", png,
                                           naming=png)
    assert "File name too long" in refused(capsys, "eval", base_run, "--limit", "2", "--json", png, naming=png)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("target, suffix", [("torch", ".pt"), ("safetensors", ""), ("flax", "")])
def test_names_of_up_to_255_bytes_can_be_written(base_run, tmp_path, capsys, target, suffix):
    """The temporary sibling of a long name keeps within the file system's 255 bytes."""
    name = "z" * (255 - len(suffix)) + suffix
    code, _, err = twin(capsys, "convert", base_run, tmp_path / name, "--to", target)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    atomic_write_bytes(tmp_path / ("y" * 255), b"data")
    assert (tmp_path / ("y" * 255)).read_bytes() == b"data"


def test_checkpoint_directories_honour_the_umask(base_run):
    mode = (base_run / "model.safetensors").parent.stat().st_mode & 0o777
    assert [p.stat().st_mode & 0o777 for p in checkpoint_dirs(base_run)] == [mode, mode]


# ------------------------------------------------------------------ failed writes (any machine)

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_atomic_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(WriteError) as raised:
        atomic_write_bytes(target, b"new")
    assert str(raised.value) == f"cannot write {target}: No space left on device"
    assert raised.value.errno == errno.ENOSPC and target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_a_failed_append_is_cut_back_off(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of the record
        monkeypatch.setattr(os, "write", _enospc)
        return real_write(fd, bytes(data[:len(data) // 2]))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(WriteError, match=f"cannot write {path}: No space left on device"):
        append_bytes(path, b'{"step": 2, "split": "train"}\n')
    assert path.read_bytes() == b'{"step": 1}\n'


def test_a_failed_training_checkpoint_names_its_final_path_and_leaves_the_last_one(base_run, tmp_path, monkeypatch):
    run_dir = Path(shutil.copytree(base_run, tmp_path / "run"))
    cfg = checkpoint.load_config(run_dir)
    state, meta = load_training_checkpoint(checkpoint_dirs(run_dir)[-1], cfg)
    state.step = 6
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(WriteError) as raised:
        save_training_checkpoint(run_dir, cfg, state, meta, keep=3)
    assert str(raised.value) == (f"cannot write {run_dir / 'checkpoints/step_0000006/model.safetensors'}: "
                                 "No space left on device")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before and not leftovers(run_dir)


@pytest.mark.parametrize("target, dst, names", [
    ("torch", "out.pt", "out.pt"), ("safetensors", "out", "out/config.json"), ("flax", "out.msgpack", "out.msgpack"),
])
def test_a_failed_convert_names_the_file_and_keeps_the_old_one(base_run, tmp_path, capsys, monkeypatch, target, dst,
                                                               names):
    (tmp_path / dst).write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", _enospc)
    line = refused(capsys, "convert", base_run, tmp_path / dst, "--to", target, "--force", naming=tmp_path / names)
    assert line == f"twin convert: error: cannot write {tmp_path / names}: No space left on device"
    assert (tmp_path / dst).read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == [dst]


def test_ctrl_c_during_an_orbax_save_leaves_nothing_once_its_writers_stop(base_run, tmp_path, monkeypatch):
    """Ctrl-C reaches the main thread while orbax's commit threads still write: write_checkpoint removes
    the temporary directory only after they stop, so none of their files turns up later."""
    from orbax.checkpoint import future

    def interrupted(self, timeout=None):
        raise KeyboardInterrupt

    loaded = formats.read_checkpoint(base_run)
    monkeypatch.setattr(future.ChainedFuture, "result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        formats.write_checkpoint(tmp_path / "out", "flax", loaded.cfg, loaded.weights)
    for thread in threading.enumerate():  # whatever orbax still runs may write: wait for it, then look
        if type(thread).__module__.startswith("orbax."):
            thread.join(timeout=60)
    assert os.listdir(tmp_path) == []


def test_a_failed_write_during_training_is_one_line_naming_the_last_good_checkpoint(base_run, data, tmp_path, capsys,
                                                                                     monkeypatch):
    run_dir = Path(shutil.copytree(base_run, tmp_path / "run"))
    real = checkpoint.atomic_write_bytes

    def fail_optimizer(path, payload):
        if Path(path).name == "optimizer.safetensors":
            with checkpoint.writing(path):
                _enospc()
        real(path, payload)

    monkeypatch.setattr("parity.train.atomic_write_bytes", fail_optimizer)
    line = refused(capsys, "train", "--resume", "--out", run_dir, "--data", data, "--steps", "6", "--save-every", "2",
                   *TRAIN, naming=run_dir / "checkpoints/step_0000006/optimizer.safetensors")
    assert line.endswith(f"No space left on device; stopped at step 6, the last good checkpoint is "
                         f"{run_dir / STEP} (continue with --resume)")
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step_0000002", "step_0000004"] and not leftovers(run_dir)


# ------------------------------------------------------------------------------ a real full disk

def _mount_skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "tmpfs needs Linux"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (the tests run as uid %d)" % os.geteuid()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount command"
    return None


@contextlib.contextmanager
def tmpfs(where: Path, size: int):
    """A tmpfs of `size` bytes mounted at `where` (skip with the reason when it cannot be); always unmounted."""
    reason = _mount_skip_reason()
    if reason:
        pytest.skip(reason)
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                            text=True)
    if result.returncode:
        pytest.skip(f"mount -t tmpfs failed: {result.stderr.strip() or result.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def _resize(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def _disk_bytes(root: Path) -> int:
    """What `root`'s files and directories take on a tmpfs: whole 4 KiB pages."""
    return sum(-(-p.stat().st_size // 4096) * 4096 if p.is_file() else 4096 for p in root.rglob("*"))


def _twin(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "parity.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_train_on_a_full_disk_stops_with_one_line_and_resumes(tmp_path, data):
    """The disk holds the run up to its first checkpoint (step 2) and half a checkpoint more: the checkpoint of
    step 4 does not fit. One line, exit status 1, the step-2 checkpoint and model.safetensors intact, no
    temporary files; with room again, --resume continues from step 2."""
    reason = _mount_skip_reason()
    if reason:
        pytest.skip(reason)
    args = ["--data", data, "--save-every", "2", "--eval-every", "2", "--log-every", "1", "--vocab-size", "200", *TRAIN]
    probe = tmp_path / "probe"
    assert _twin("train", "--out", probe, "--steps", "2", *args).returncode == 0
    room = _disk_bytes(probe) + _disk_bytes(checkpoint_dirs(probe)[0]) // 2
    with tmpfs(tmp_path / "disk", room) as disk:
        out = disk / "run"
        result = _twin("train", "--out", out, "--steps", "4", *args)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert lines[0].startswith(f"twin train: cannot write {out / 'checkpoints/step_0000004'}/")
        assert lines[0].endswith(f": No space left on device; stopped at step 4, the last good checkpoint is "
                                 f"{out / 'checkpoints/step_0000002'} (continue with --resume)")
        assert [p.name for p in checkpoint_dirs(out)] == ["step_0000002"] and not leftovers(disk)
        last = checkpoint_dirs(out)[0]
        assert (out / "model.safetensors").read_bytes() == (last / "model.safetensors").read_bytes()
        assert (out / "model.safetensors").read_bytes() == (probe / "model.safetensors").read_bytes()
        load_training_checkpoint(last, checkpoint.load_config(out))
        assert [r["step"] for r in read_metrics(out) if r["split"] == "valid"] == [2, 4]
        _resize(disk, 64 << 20)
        result = _twin("train", "--out", out, "--resume", "--steps", "4", *args)
        assert result.returncode == 0, result.stderr
        assert [p.name for p in checkpoint_dirs(out)] == ["step_0000002", "step_0000004"] and not leftovers(disk)
        assert [r["step"] for r in read_metrics(out) if r["split"] == "valid"] == [2, 4]


CONVERT_TARGETS = [  # (--to, DST on the disk, the file a failure mid-write names)
    ("torch", "out.pt", "out.pt"), ("safetensors", "out.safetensors", "out.safetensors"),
    ("safetensors", "out", "out/model.safetensors"), ("nn-transformer", "out.pt", "out.pt"),
    ("flax", "out.msgpack", "out.msgpack"), ("flax", "out", "out"), ("ctranslate2", "out", "out"),
]


@pytest.mark.parametrize("target, dst, named", CONVERT_TARGETS)
def test_convert_onto_a_full_disk_is_refused_before_writing(base_run, tmp_path, target, dst, named):
    """The disk (64 KiB) holds an old DST but not the tensors (about 170 KB): --force is refused before
    anything is written, one line, the old DST untouched and nothing else left."""
    with tmpfs(tmp_path / "disk", 64 << 10) as disk:
        (disk / dst).write_bytes(b"old")
        result = _twin("convert", base_run, disk / dst, "--to", target, "--force")
        assert result.returncode == 1 and result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"twin convert: error: cannot write {disk / dst}: No space left on device (")
        assert " MB of tensors, " in result.stderr and result.stderr.endswith(" MB free)\n")
        assert (disk / dst).read_bytes() == b"old" and sorted(os.listdir(disk)) == [dst]


NO_SPACE_CHECK = ("import sys; from parity import cli, formats; formats._free_bytes = lambda directory: 1 << 60; "
                  "sys.exit(cli.main(sys.argv[1:]))")


@pytest.mark.parametrize("target, dst, named", CONVERT_TARGETS)
def test_convert_filling_the_disk_mid_write_is_one_line_and_keeps_the_old_file(base_run, tmp_path, target, dst, named):
    """The same disk with the free-space check out of the way: the write itself hits ENOSPC. One line on
    stderr naming the file (a subprocess: orbax's threads log their tracebacks through Python's
    last-resort logging handler, which pytest replaces), the old DST untouched, nothing else left."""
    with tmpfs(tmp_path / "disk", 64 << 10) as disk:
        (disk / dst).write_bytes(b"old")
        result = subprocess.run([sys.executable, "-c", NO_SPACE_CHECK, "convert", str(base_run), str(disk / dst),
                                 "--to", target, "--force"], capture_output=True, text=True,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr == f"twin convert: error: cannot write {disk / named}: No space left on device\n"
        assert (disk / dst).read_bytes() == b"old" and sorted(os.listdir(disk)) == [dst]
