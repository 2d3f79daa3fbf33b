"""The conversion benchmark runs end to end on a small checkpoint (no timing or memory target is asserted:
those claims need the >= 1 GB run of benchmarks/bench_convert.py)."""

from __future__ import annotations

import json

from parity import cli

CONVERSIONS = {"safetensors -> torch", "torch -> safetensors", "safetensors -> flax (orbax)",
               "flax (orbax) -> safetensors", "safetensors -> flax (msgpack)", "flax (msgpack) -> safetensors",
               "safetensors -> nn-transformer", "nn-transformer -> safetensors"}


def test_bench_convert_quick_writes_a_report(tmp_path, capsys):
    report = tmp_path / "convert.json"
    workdir = tmp_path / "work"
    assert cli.main(["bench", "--convert", "--quick", "--workdir", str(workdir), "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    rows = data["results"]
    assert {r["conversion"] for r in rows} == CONVERSIONS
    assert {r["to"] for r in rows} == {"torch", "safetensors", "flax", "nn-transformer"}
    for r in rows:
        assert r["seconds"] > 0 and r["read_once_seconds"] > 0 and r["imports_seconds"] > 0
        assert r["max_rss_bytes"] > 0 and r["imports_rss_bytes"] > 0 and r["rss_ratio"] > 0
        assert r["dst_bytes"] > 0 and r["src_bytes"] > 0
        assert "parity.cli" in r["imports"]["modules"]
    assert data["checkpoint"]["tensor_bytes"] > 1e6
    assert [t["chain"] for t in data["round_trips"]] == ["torch", "orbax", "msgpack", "nn-transformer"]
    assert all(t["equal"] for t in data["round_trips"])
    # the source checkpoint stays cached, the converted files are removed
    assert [p.suffix for p in workdir.iterdir() if p.name.startswith("source-")] == [".safetensors"]
    assert not any((workdir / name).exists() for name in ("torch.pt", "orbax", "flax.msgpack"))
    out = capsys.readouterr().out
    assert "peak RSS MB" in out and "page cache" in out and "equals the source" in out
