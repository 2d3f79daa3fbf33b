"""The command line on Hugging Face directories: `twin parity HF_DIR` runs the three-way checks, `twin convert`
reads a Marian directory and writes one back (--to hf-marian) that transformers loads offline, and what cannot
be read or exported fails with one line and exit status 1, leaving nothing behind."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_fixtures import fsmt_model, marian_model  # noqa: E402
from parity import cli  # noqa: E402


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("marian")
    marian_model(11).save_pretrained(path)
    return path


def test_twin_parity_on_a_marian_directory_runs_three_ways(marian_dir, capsys):
    assert cli.main(["parity", str(marian_dir), "--dtypes", "float64,float32", "--batch", "3", "--length", "6"]) == 0
    out = capsys.readouterr().out
    for row in ("marian->torch logits", "marian->jax grads", "marian generate->torch greedy tokens",
                "marian generate->jax greedy tokens", "torch->jax logits"):
        assert row in out, row


def test_twin_parity_on_an_fsmt_directory(tmp_path, capsys):
    fsmt_model(4).save_pretrained(tmp_path)
    assert cli.main(["parity", str(tmp_path), "--dtypes", "float64", "--batch", "2", "--length", "5"]) == 0
    assert "fsmt->jax memory" in capsys.readouterr().out


def test_convert_in_and_back_out_is_what_transformers_loads(marian_dir, tmp_path):
    run = tmp_path / "run"
    out = tmp_path / "exported"
    assert cli.main(["convert", str(marian_dir), str(run), "--to", "safetensors"]) == 0
    assert cli.main(["convert", str(run), str(out), "--to", "hf-marian"]) == 0
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    original = transformers.MarianMTModel.from_pretrained(marian_dir, local_files_only=True).eval()
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, local_files_only=True).eval()
    assert config["model_type"] == "marian" and generation["bad_words_ids"] == [[original.config.pad_token_id]]
    assert config["decoder_start_token_id"] == original.config.decoder_start_token_id
    for key, value in original.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    src = torch.tensor([[3, 4, 5, 0]])
    with torch.no_grad():
        assert torch.equal(original.generate(input_ids=src, max_new_tokens=6),
                           reloaded.generate(input_ids=src, max_new_tokens=6))


def test_a_model_type_the_twins_do_not_read_is_one_line_and_exit_1(marian_dir, tmp_path, capsys):
    bad = tmp_path / "bart"
    bad.mkdir()
    config = json.loads((marian_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "bart"}))
    (bad / "model.safetensors").write_bytes((marian_dir / "model.safetensors").read_bytes())
    assert cli.main(["convert", str(bad), str(tmp_path / "out"), "--to", "torch"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model_type 'bart' is not supported: twin reads Hugging Face marian, fsmt" in err
    assert not (tmp_path / "out").exists()


def test_export_of_a_config_marian_cannot_express_is_refused_by_field(tmp_path, capsys):
    run = tmp_path / "tiny"
    assert cli.main(["convert", "tests/data/tiny_run", str(run), "--to", "safetensors"]) == 0
    assert cli.main(["convert", str(run), str(tmp_path / "out"), "--to", "hf-marian"]) == 1
    err = capsys.readouterr().err.strip()
    assert "final_norm is true" in err and "--config marian" in err and err.count("\n") == 0
    assert not (tmp_path / "out").exists()
