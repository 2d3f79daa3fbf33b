"""Hostile and broken input to `twin convert`: each case is one line on stderr naming the file (and the
key, with expected and actual shape or dtype), exit status 1, no traceback, nothing written, the
source untouched.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from parity import formats
from parity.cli import main
from parity.config import TransformerConfig
from strategies import random_weights

CFG = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=1, d_ff=16, max_len=16, dropout=0.0)
KEY = "encoder.layers.0.ff.linear1.weight"


def weights() -> dict[str, np.ndarray]:
    return random_weights(CFG, "float32")


def save_safetensors(path: Path, arrays: dict[str, np.ndarray], cfg: TransformerConfig = CFG) -> Path:
    save_file(arrays, path, metadata={"config": cfg.to_json()})
    return path


class Evil:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


@pytest.fixture
def case(tmp_path):
    """(source dir, output dir): the output dir must stay empty."""
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "src", tmp_path / "out"


def refused(capsys, src: Path, out: Path, *args: str, to: str = "torch", dst_name: str = "converted.pt") -> str:
    """Run `twin convert SRC OUT/DST`; assert the refusal contract; return the one stderr line."""
    snapshot = {p: p.read_bytes() for p in ([src] if src.is_file() else src.rglob("*")) if p.is_file()} \
        if src.exists() and os.access(src, os.R_OK) and not src.is_symlink() else {}
    assert main(["convert", str(src), str(out / dst_name), "--to", to, *args]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("twin convert: error: ")
    assert "Traceback" not in captured.err + captured.out
    assert list(out.iterdir()) == []
    for path, data in snapshot.items():
        assert path.read_bytes() == data
    return lines[0]


def test_truncated_safetensors(case, capsys):
    src, out = case
    path = save_safetensors(src / "model.safetensors", weights())
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    line = refused(capsys, path, out)
    assert f"{path}: truncated: tensor " in line and "of the data, which has" in line


def test_header_longer_than_the_file(case, capsys):
    src, out = case
    path = save_safetensors(src / "model.safetensors", weights())
    data = path.read_bytes()
    path.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])
    line = refused(capsys, path, out)
    assert f"{path}: safetensors header length {len(data) * 2} bytes is longer than the file ({len(data)} bytes)" \
        in line


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "model.msgpack", "weights"])
def test_empty_file(case, capsys, name):
    src, out = case
    (src / name).write_bytes(b"")
    assert refused(capsys, src / name, out).endswith(f"{src / name}: empty file")


def test_directory_where_a_file_is_expected(case, capsys):
    src, out = case
    (src / "model.safetensors").mkdir()
    line = refused(capsys, src / "model.safetensors", out)
    assert line.endswith(f"{src / 'model.safetensors'}: is a directory where a file was expected")
    (src / "empty").mkdir()
    assert "is a directory where a file was expected" in refused(capsys, src / "empty", out)
    line = refused(capsys, save_safetensors(src / "x.safetensors", weights()), out, "--config", str(src / "empty"))
    assert f"{src / 'empty' / 'config.json'}: no such file" in line


def test_missing_key(case, capsys):
    src, out = case
    arrays = weights()
    del arrays["decoder.layers.0.cross_attn_norm.bias"]
    line = refused(capsys, save_safetensors(src / "m.safetensors", arrays), out)
    assert "missing key(s) 'decoder.layers.0.cross_attn_norm.bias'" in line and str(src / "m.safetensors") in line


def test_unexpected_key(case, capsys):
    src, out = case
    arrays = {**weights(), "encoder.layers.0.adapter.weight": np.zeros((2, 2), np.float32)}
    line = refused(capsys, save_safetensors(src / "m.safetensors", arrays), out)
    assert "unexpected key(s) 'encoder.layers.0.adapter.weight'" in line and str(src / "m.safetensors") in line


def test_shape_mismatch(case, capsys):
    src, out = case
    arrays = {**weights(), KEY: np.zeros((17, 8), np.float32)}
    line = refused(capsys, save_safetensors(src / "m.safetensors", arrays), out)
    assert f"shape mismatch for {KEY!r}: expected (16, 8), got (17, 8)" in line


def test_shape_mismatch_in_a_flax_checkpoint_names_the_param_path(case, capsys):
    """A user's own orbax checkpoint (no config in its metadata) beside a config.json that disagrees."""
    import orbax.checkpoint as ocp

    src, out = case

    from parity.convert import canonical_to_flax

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((src / "orbax").resolve(), {"params": canonical_to_flax(weights(), CFG)})
    (src / "orbax" / "config.json").write_text(CFG.replace(d_ff=32).to_json())
    line = refused(capsys, src / "orbax", out)
    assert "shape mismatch for 'encoder/layers_0/ff/linear1/kernel': expected (8, 32), got (8, 16)" in line


@pytest.mark.parametrize("container", ["safetensors", "torch"])
def test_a_dtype_that_cannot_be_converted(case, capsys, container):
    src, out = case
    if container == "safetensors":
        path = save_safetensors(src / "m.safetensors", {**weights(), KEY: np.zeros((16, 8), np.int32)})
        expected = f"{KEY!r} has dtype I32, which does not convert: expected one of float16, bfloat16, float32, float64"
        line = refused(capsys, path, out)
    else:
        sd = {k: torch.from_numpy(v) for k, v in weights().items()}
        sd[KEY] = sd[KEY].to(torch.float8_e4m3fn)
        torch.save(sd, src / "m.pt")
        expected = f"{KEY!r} has dtype float8_e4m3fn, which does not convert"
        (src / "config.json").write_text(CFG.to_json())
        line = refused(capsys, src / "m.pt", out)
    assert expected in line


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_refused_unless_allowed(case, capsys, bad):
    src, out = case
    arrays = weights()
    arrays[KEY][3, 4] = bad
    path = save_safetensors(src / "m.safetensors", arrays)
    line = refused(capsys, path, out, "--to", "flax", to="flax", dst_name="converted")
    assert f"{path}: {KEY!r} has 1 NaN/Inf value(s) (pass --allow-nonfinite to convert anyway)" in line
    assert main(["convert", str(path), str(out / "ok"), "--to", "flax", "--allow-nonfinite"]) == 0
    back = formats.read_checkpoint(out / "ok", allow_nonfinite=True).weights[KEY]
    assert np.array_equal(back.view(np.uint32), arrays[KEY].view(np.uint32))  # NaN payload kept too


@pytest.mark.parametrize("field,key", [("src_vocab_size", "src_embed.weight"), ("tgt_vocab_size", "tgt_embed.weight")])
def test_a_config_whose_vocabulary_disagrees_with_the_weights(case, capsys, field, key):
    src, out = case
    save_safetensors(src / "model.safetensors", weights(), cfg=CFG)
    (src / "config.json").write_text(CFG.replace(**{field: 20}).to_json())
    line = refused(capsys, src / "model.safetensors", out, "--config", str(src / "config.json"))
    rows = getattr(CFG, field)
    assert f"the config's {field} is 20 but {key!r} has shape ({rows}, 8) ({rows} entries)" in line


@pytest.mark.parametrize("container", ["torch.save", "plain pickle", "inside a state dict"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(case, capsys, tmp_path, container):
    src, out = case
    marker = tmp_path / "marker"
    path = src / "evil.pt"
    if container == "torch.save":
        torch.save(Evil(marker), path)
    elif container == "plain pickle":
        path.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    else:
        torch.save({**{k: torch.from_numpy(v) for k, v in weights().items()}, "x": Evil(marker)}, path)
    (src / "config.json").write_text(CFG.to_json())
    line = refused(capsys, path, out)
    assert f"{path}: refused: the pickle asks for more than tensors and plain containers" in line
    assert "(Unsupported global: GLOBAL exec)" in line and "nothing in it ran" in line
    assert not marker.exists()
    if container == "plain pickle":  # the file really is hostile: a plain unpickler runs it
        pickle.loads(path.read_bytes())
        assert marker.read_text() == "code ran"


def test_an_unreadable_file(case, capsys, monkeypatch):
    src, out = case
    path = save_safetensors(src / "m.safetensors", weights())
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads anything: make the open fail as it would for a user
            real_open = open

            def guarded(file, *args, **kwargs):
                if Path(file) == path:
                    raise PermissionError(13, "Permission denied", str(file))
                return real_open(file, *args, **kwargs)

            monkeypatch.setattr("builtins.open", guarded)
        line = refused(capsys, path, out)
        assert line.endswith(f"{path}: cannot read (Permission denied)")
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("content,message", [
    (b"\x00garbage that is no checkpoint at all", "unrecognised format"),
    (b"\x81\xa6params\xc1", "not a readable flax msgpack file"),
    (b"PK\x03\x04 a truncated zip", "not a readable PyTorch file"),
])
def test_other_garbage_is_named(case, capsys, content, message):
    src, out = case
    (src / "w.bin").write_bytes(content)
    (src / "config.json").write_text(CFG.to_json())
    assert message in refused(capsys, src / "w.bin", out)


def test_a_damaged_orbax_checkpoint(case, capsys):
    src, out = case
    formats.write_checkpoint(src / "ckpt", "flax", CFG, weights())
    os.remove(src / "ckpt" / "params.generator.bias" / "0")
    assert f"{src / 'ckpt'}: not a readable orbax checkpoint" in refused(capsys, src / "ckpt", out)


def test_a_file_without_a_config_asks_for_one(case, capsys):
    src, out = case
    torch.save({k: torch.from_numpy(v) for k, v in weights().items()}, src / "m.pt")
    line = refused(capsys, src / "m.pt", out)
    assert "carries no config and there is no config.json beside it: pass --config CONFIG.json" in line


def test_a_bare_nn_transformer_state_dict_names_what_it_lacks(case, capsys):
    from parity.convert import build_nn_transformer

    src, out = case
    torch.save(build_nn_transformer(CFG).state_dict(), src / "nn.pt")
    (src / "config.json").write_text(CFG.to_json())
    line = refused(capsys, src / "nn.pt", out)
    assert all(f"'{k}'" in line.split("missing key(s)")[1] for k in
               ("src_embed.weight", "tgt_embed.weight", "generator.weight", "generator.bias"))
    assert "nn.Transformer has no embeddings or output layer" in line


@pytest.mark.parametrize("kind", ["pickle", "orbax"])
def test_the_command_line_refuses_without_a_traceback(tmp_path, kind):
    """End to end in a fresh interpreter (the real entry point): a hostile pickle; a damaged orbax
    checkpoint, on which orbax itself would log warnings and tracebacks from its threads."""
    marker = tmp_path / "marker"
    if kind == "pickle":
        src = tmp_path / "evil.pt"
        torch.save(Evil(marker), src)
        (tmp_path / "config.json").write_text(json.dumps(CFG.to_dict()))
    else:
        src = formats.write_checkpoint(tmp_path / "ckpt", "flax", CFG, weights())
        os.remove(src / "params.generator.bias" / "0")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "convert", str(src), str(tmp_path / "out"),
                           "--to", "torch"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"twin convert: error: {src}: {'refused' if kind == 'pickle' else 'not a'}")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_safetensors_header_that_lies_about_a_shape(case, capsys):
    src, out = case
    path = save_safetensors(src / "m.safetensors", weights())
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    text = data[8:8 + n].decode()
    at = text.index('"shape":[16,8]', text.index(f'"{KEY}"'))
    text = text[:at] + '"shape":[16,9]' + text[at + 14:]
    path.write_bytes(data[:8] + text.encode() + data[8 + n:])
    line = refused(capsys, path, out)
    assert f"{KEY!r}: shape (16, 9) of F32 needs 576 bytes, the header gives 512" in line
