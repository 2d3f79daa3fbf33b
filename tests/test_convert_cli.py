"""`twin convert`: every pair of formats round-trips bit-exactly in float32/float64/bfloat16/float16,
--verify loads each target natively and runs the parity checks, writes are atomic and never clobber.

Formats: canonical safetensors, PyTorch state dict (.pt), Flax orbax directory, Flax msgpack, and
torch.nn.Transformer names (.pt). Conversions run in-process through `parity.cli.main`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from parity import formats
from parity.cli import main
from parity.config import TransformerConfig
from parity.convert import build_nn_transformer
from parity.suite import init_canonical, np_dtype
from strategies import random_weights

CFG = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=2, d_ff=16, max_len=16, dropout=0.0, tie_output=True)
DTYPES = ("float32", "float64", "bfloat16", "float16")
# format name -> (--to, DST name)
FORMATS = {"safetensors": ("safetensors", "model.safetensors"), "torch": ("torch", "model.pt"),
           "orbax": ("flax", "orbax"), "msgpack": ("flax", "model.msgpack"),
           "nn-transformer": ("nn-transformer", "nn.pt")}


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def assert_bit_exact(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert np.array_equal(bits(got[k]), bits(want[k])), k


def convert(*args: str) -> int:
    return main(["convert", *map(str, args)])


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Each dtype's weights written in each format (by `twin convert` from a canonical safetensors)."""
    root = tmp_path_factory.mktemp("sources")
    (root / "config.json").write_text(CFG.to_json())
    out = {}
    for dtype in DTYPES:
        seed = formats.write_checkpoint(root / f"{dtype}.safetensors", "safetensors", CFG, random_weights(CFG, dtype))
        for name, (to, file) in FORMATS.items():
            dst = root / dtype / name / file
            dst.parent.mkdir(parents=True)
            assert convert(seed, dst, "--to", to) == 0
            out[dtype, name] = dst
    return out


def config_of(source: Path) -> Path:
    """The config.json of the `sources` fixture."""
    return source.parents[2] / "config.json"


def config_args(path: Path) -> list[str]:
    """Files that cannot carry a config (.pt, .msgpack) take --config."""
    return ["--config", str(config_of(path))] if path.suffix in (".pt", ".msgpack") else []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("src_name,dst_name", list(itertools.product(FORMATS, FORMATS)))
def test_every_pair_of_formats_round_trips_bit_exactly(sources, tmp_path, dtype, src_name, dst_name):
    src = sources[dtype, src_name]
    to, file = FORMATS[dst_name]
    dst = tmp_path / file
    assert convert(src, dst, "--to", to, *config_args(src)) == 0
    loaded = formats.read_checkpoint(dst, config=config_of(sources[dtype, "safetensors"]))
    assert loaded.cfg == CFG
    assert_bit_exact(loaded.weights, random_weights(CFG, dtype))
    assert sorted(p.name for p in tmp_path.iterdir()) == [file]  # no temporary files left


def test_directory_outputs_hold_config_json_and_the_native_file(sources, tmp_path):
    src = sources["float32", "safetensors"]
    layouts = {"safetensors": "model.safetensors", "torch": "pytorch_model.bin", "nn-transformer": "nn_transformer.pt",
               "flax": "_CHECKPOINT_METADATA"}
    for to, expected in layouts.items():
        dst = tmp_path / to
        assert convert(src, dst, "--to", to) == 0
        assert expected in os.listdir(dst)
        assert TransformerConfig.from_json((dst / "config.json").read_text()) == CFG
        loaded = formats.read_checkpoint(dst)  # the config travels: no --config needed
        assert_bit_exact(loaded.weights, random_weights(CFG, "float32"))


def test_the_native_loaders_read_what_convert_writes(sources, tmp_path):
    """What each framework's own API loads: torch.load / safetensors into torch_tx, orbax / from_bytes in flax."""
    import orbax.checkpoint as ocp
    from flax import serialization

    import torch_tx

    want = random_weights(CFG, "float32")
    model = torch_tx.Transformer(CFG)
    model.load_state_dict(torch.load(sources["float32", "torch"], weights_only=True), strict=True)
    assert np.array_equal(model.generator.weight.detach().numpy(), want["generator.weight"])
    from safetensors.torch import load_file

    model.load_state_dict(load_file(sources["float32", "safetensors"]), strict=True)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(sources["float32", "orbax"].resolve())
    assert np.array_equal(restored["params"]["generator"]["bias"], want["generator.bias"])
    variables = serialization.msgpack_restore(sources["float32", "msgpack"].read_bytes())
    assert np.array_equal(variables["params"]["encoder"]["layers_0"]["ff"]["linear1"]["kernel"],
                          want["encoder.layers.0.ff.linear1.weight"].T)
    nn_sd = torch.load(sources["float32", "nn-transformer"], weights_only=True)
    module = build_nn_transformer(CFG)
    module.load_state_dict({k: v for k, v in nn_sd.items() if k.startswith(("encoder.", "decoder."))}, strict=True)
    q, k, v = (want[f"decoder.layers.1.cross_attn.{p}_proj.weight"] for p in "qkv")
    assert np.array_equal(module.decoder.layers[1].multihead_attn.in_proj_weight.detach().numpy(),
                          np.concatenate([q, k, v]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_dtype_casts_and_only_when_asked(sources, tmp_path, dtype):
    dst = tmp_path / "cast.safetensors"
    assert convert(sources["float32", "torch"], dst, "--to", "safetensors", "--dtype", dtype,
                   *config_args(sources["float32", "torch"])) == 0
    want = {k: v.astype(np_dtype(dtype)) for k, v in random_weights(CFG, "float32").items()}
    assert_bit_exact(formats.read_checkpoint(dst).weights, want)


@pytest.fixture(scope="module")
def initialized(tmp_path_factory) -> Path:
    """A float32 checkpoint of the torch twin's freshly initialized weights. The parity claims are about
    weights at a model's scale: with the N(0, 1) weights of `sources` every softmax saturates, the k
    projections' float32 gradients are rounding noise, and their twin-to-twin error straddles 1e-5 (median
    9e-6 over 80 input draws with separate q/k/v projections, 1.1e-5 fused; 1e-6 on these weights)."""
    path = tmp_path_factory.mktemp("initialized") / "model.safetensors"
    return formats.write_checkpoint(path, "safetensors", CFG, init_canonical(CFG, "torch", 0))


@pytest.mark.parametrize("name", list(FORMATS))
def test_verify_loads_each_target_and_runs_the_parity_checks(initialized, tmp_path, capsys, name):
    to, file = FORMATS[name]
    assert convert(initialized, tmp_path / file, "--to", to, "--verify") == 0
    out, err = capsys.readouterr()
    assert err == ""  # no library warnings either
    assert f"{to} reload bit-exact" in out
    assert "logits" in out and "grads" in out and " 0 failed" in out
    if name == "nn-transformer":
        assert "nn.Transformer->torch stacks" in out


def test_verify_fails_when_the_twins_disagree(sources, tmp_path, capsys, monkeypatch):
    """The check can fail: a corrupted reload is reported and the exit status is 1."""
    from parity import verify

    real = verify.load_native

    def corrupted(dst, target, cfg):
        weights, loaded = real(dst, target, cfg)
        weights = dict(weights)
        weights["encoder.layers.0.ff.linear1.bias"] = weights["encoder.layers.0.ff.linear1.bias"] + 1
        return weights, loaded

    monkeypatch.setattr(verify, "load_native", corrupted)
    assert convert(sources["float32", "safetensors"], tmp_path / "x.pt", "--to", "torch", "--verify") == 1
    assert "FAIL" in capsys.readouterr().out


def test_an_existing_destination_needs_force(sources, tmp_path, capsys):
    src = sources["float64", "safetensors"]
    for dst in (tmp_path / "out.pt", tmp_path / "outdir"):
        if dst.suffix:
            dst.write_bytes(b"precious")
        else:
            dst.mkdir()
            (dst / "keep.txt").write_text("precious")
        before = sorted(p.name for p in tmp_path.iterdir())
        assert convert(src, dst, "--to", "torch") == 1
        err = capsys.readouterr().err
        assert f"{dst}: exists (pass --force to replace it)" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert (dst.read_bytes() if dst.suffix else (dst / "keep.txt").read_bytes()) == b"precious"
        assert convert(src, dst, "--to", "torch", "--force") == 0
        assert_bit_exact(formats.read_checkpoint(dst, config=config_of(src)).weights,
                         random_weights(CFG, "float64"))
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # the old one is gone, no temporaries


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fail_while_writing(monkeypatch, point: str, dst: Path) -> None:
    """Make the next conversion fail: half-way through writing its data, at fsync, or at the rename."""
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if point == "writing":
        real = formats._write_container

        def half_written(tmp, *args):
            real(tmp, *args)
            (tmp / "partial" if tmp.is_dir() else tmp).write_bytes(b"half")
            disk_full()

        monkeypatch.setattr(formats, "_write_container", half_written)
    elif point == "fsync":
        monkeypatch.setattr(formats, "_fsync_tree", disk_full)
    else:
        real_rename, failed = os.rename, []

        def rename(a, b):  # the new file's rename into place fails (once: putting an old DST back works)
            if Path(b) == dst and not failed:
                failed.append(a)
                disk_full()
            real_rename(a, b)

        monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("point", ["writing", "fsync", "rename"])
@pytest.mark.parametrize("to,file", [("torch", "out.pt"), ("flax", "orbax"), ("safetensors", "dir")])
def test_a_failure_while_writing_leaves_nothing_and_keeps_the_old_destination(sources, tmp_path, monkeypatch, capsys,
                                                                              to, file, point):
    """One line naming DST, exit status 1 (not a traceback), the old DST whole and nothing else left."""
    src = sources["float32", "safetensors"]
    dst = tmp_path / "out" / file
    dst.parent.mkdir()
    assert convert(src, dst, "--to", to) == 0
    old = snapshot(tmp_path / "out")
    capsys.readouterr()
    fail_while_writing(monkeypatch, point, dst)
    assert convert(src, dst, "--to", to, "--force") == 1
    assert capsys.readouterr().err == f"twin convert: error: cannot write {dst}: No space left on device\n"
    assert snapshot(tmp_path / "out") == old  # the old DST whole, no temporaries, no partial file
    monkeypatch.undo()
    (dst.unlink() if dst.is_file() else shutil.rmtree(dst))
    fail_while_writing(monkeypatch, point, dst)
    assert convert(src, dst, "--to", to) == 1
    assert capsys.readouterr().err == f"twin convert: error: cannot write {dst}: No space left on device\n"
    assert list((tmp_path / "out").iterdir()) == []


def test_the_source_is_never_the_destination(sources, tmp_path, capsys):
    src = sources["float32", "safetensors"]
    digest = src.read_bytes()
    assert convert(src, src, "--to", "safetensors", "--force") == 1
    assert "is the source" in capsys.readouterr().err
    assert src.read_bytes() == digest


def test_a_run_directory_converts_with_its_tokenizer(tmp_path, capsys):
    run = Path(__file__).parent / "data" / "tiny_run"
    assert convert(run, tmp_path / "flax", "--to", "flax") == 0
    assert (tmp_path / "flax" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    assert convert(tmp_path / "flax", tmp_path / "back", "--to", "safetensors") == 0
    cfg = TransformerConfig.from_json((run / "config.json").read_text())
    from safetensors.numpy import load_file

    assert_bit_exact(formats.read_checkpoint(tmp_path / "back").weights,
                     {k: v for k, v in load_file(run / "model.safetensors").items()})
    assert formats.read_checkpoint(tmp_path / "back").cfg == cfg
    out = capsys.readouterr().out
    assert "orbax (flax names)" in out and "config from orbax metadata" in out


def test_nn_transformer_state_dict_in_and_out(tmp_path):
    """A torch.nn.Transformer's own state dict, with embeddings and output layer saved beside it."""
    from parity.suite import compare_nn_transformer, random_inputs

    torch.manual_seed(0)
    cfg = CFG.replace(tie_output=False)
    module = build_nn_transformer(cfg).double()
    rng = np.random.default_rng(1)
    extra = {"src_embed.weight": torch.from_numpy(rng.standard_normal((11, 8))),
             "tgt_embed.weight": torch.from_numpy(rng.standard_normal((13, 8))),
             "generator.weight": torch.from_numpy(rng.standard_normal((13, 8))),
             "generator.bias": torch.from_numpy(rng.standard_normal(13))}
    torch.save({**module.state_dict(), **extra}, tmp_path / "nn.pt")
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert convert(tmp_path / "nn.pt", tmp_path / "canonical.safetensors", "--to", "safetensors") == 0
    loaded = formats.read_checkpoint(tmp_path / "canonical.safetensors")
    assert loaded.weights["decoder.layers.0.cross_attn.v_proj.weight"].shape == (8, 8)
    inputs = random_inputs(cfg, 3, 7, 7, rng)
    assert compare_nn_transformer(cfg, module, loaded.weights, inputs, rng).passed
    assert convert(tmp_path / "canonical.safetensors", tmp_path / "back.pt", "--to", "nn-transformer") == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    original = {**module.state_dict(), **extra}
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_wrapped_and_prefixed_torch_state_dicts_are_read(sources, tmp_path):
    """{"state_dict": ...} wrappers and DDP's `module.` prefix, as users' training scripts save them."""
    sd = torch.load(sources["float32", "torch"], weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ddp.pt")
    loaded = formats.read_checkpoint(tmp_path / "ddp.pt", config=config_of(sources["float32", "safetensors"]).parent)
    assert_bit_exact(loaded.weights, random_weights(CFG, "float32"))


def test_the_config_flag_overrides_and_a_bad_config_is_named(sources, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**CFG.to_dict(), "d_model": 7}))
    assert convert(sources["float32", "safetensors"], tmp_path / "o.pt", "--to", "torch", "--config", bad) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"twin convert: error: {bad}: not a valid config") and "d_model" in err
    assert not (tmp_path / "o.pt").exists()


def test_twin_parity_reads_any_format(sources, capsys):
    src = sources["bfloat16", "msgpack"]
    assert main(["parity", str(src), *config_args(src), "--dtypes", "float64"]) == 0
    out = capsys.readouterr().out
    assert "torch->jax logits" in out and "jax->torch logits" in out and " 0 failed" in out


def test_msgpack_is_byte_for_byte_what_flax_writes(tmp_path):
    """The streamed writer emits exactly flax.serialization.msgpack_serialize's bytes (fixext, ext8/16/32)."""
    import ml_dtypes
    from flax import serialization

    from parity.convert import canonical_to_flax

    odd = {"a": np.arange(1, dtype=ml_dtypes.bfloat16), "b": np.zeros((0, 3), np.float32),
           "c": np.full((70, 500), 0.5, np.float64)}  # a 16-byte fixext, an empty array, an ext32
    for dtype in DTYPES:
        tree = {"params": canonical_to_flax(random_weights(CFG, dtype), CFG), "odd": odd}
        formats._save_msgpack(tmp_path / f"{dtype}.msgpack", tree)
        assert (tmp_path / f"{dtype}.msgpack").read_bytes() == serialization.msgpack_serialize(tree)


def test_an_orbax_train_state_saved_with_orbax_defaults_is_read(tmp_path):
    """What a Flax training script writes: StandardCheckpointer (OCDBT, compressed) of a train state;
    only its params are read, with the config passed in."""
    import orbax.checkpoint as ocp

    from parity.convert import canonical_to_flax

    want = random_weights(CFG, "float32")
    params = canonical_to_flax(want, CFG)
    state = {"step": np.int64(7), "params": params,
             "opt_state": {"mu": {k: np.zeros_like(v) for k, v in params["generator"].items()}}}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((tmp_path / "state").resolve(), state)
    (tmp_path / "config.json").write_text(CFG.to_json())
    assert convert(tmp_path / "state", tmp_path / "out.safetensors", "--to", "safetensors", "--config",
                   tmp_path / "config.json") == 0
    assert_bit_exact(formats.read_checkpoint(tmp_path / "out.safetensors").weights, want)
