"""One-framework installs: `pip install -e '.[torch]'` and `'.[jax]'`, each into a fresh virtualenv, where every
`twin` subcommand works with the installed framework or exits 1 with one line naming the missing extra
(scripts/smoke_install.py runs them all); and parity.extras, the checks behind those lines, in this process.

Each virtualenv is built as the README says (torch==2.13.0 first, from the CPU wheel on disk, then the project
pinned by constraints.txt), without byte-compiling at install time (the imported modules are compiled once, into
a cache of the test's own), used by one test and removed after it. It lives in /dev/shm where that has room (a
memory file system: writing the 1 GB of a torch install there took 1 s of system time instead of 7-12 s on disk),
else in the test's tmp_path.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ROOT / "tests" / "data" / "tiny_run"
TORCH_PIN = "torch==2.13.0"  # the Makefile's: the CPU wheel that pip finds on disk
SHM, SHM_ROOM = Path("/dev/shm"), 4 << 30  # bytes free that /dev/shm must have to hold a virtualenv
CLEARED = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV")


def _run(command: list[str], what: str, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout,
                            **kwargs)
    assert result.returncode == 0, (f"{what} failed ({result.returncode}): {' '.join(command)}\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def build_venv(venv: Path, framework: str, lock: Path) -> float:
    """A fresh virtualenv with `pip install -e 'ROOT[framework]'`; returns the seconds it took."""
    from filelock import FileLock

    start = time.perf_counter()
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], "venv", 120)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-compile"]
    if framework in ("torch", "hf"):  # [hf] needs torch: the CPU wheel first, so that pip pulls no CUDA
        _run([*pip, TORCH_PIN], f"pip install {TORCH_PIN}", 1200)
    with FileLock(str(lock)):  # the editable build writes ROOT/twin_transformer.egg-info: one build at a time
        _run([*pip, "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[{framework}]"],
             f"pip install -e '.[{framework}]'", 1200)
    return time.perf_counter() - start


def venv_home(tmp_path: Path) -> Path:
    """A new directory in /dev/shm for one test's virtualenv and byte-code cache, or tmp_path when /dev/shm is
    missing, not writable or short of SHM_ROOM."""
    if SHM.is_dir() and os.access(SHM, os.W_OK) and shutil.disk_usage(SHM).free >= SHM_ROOM:
        return Path(tempfile.mkdtemp(prefix="twin-install-test-", dir=SHM))
    return tmp_path


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """tests/data/tiny_run as a torch .pt, a flax msgpack and an orbax checkpoint (written here, with both
    frameworks): the formats a one-framework install must refuse to read, naming the extra."""
    from parity.formats import read_checkpoint, write_checkpoint

    out = tmp_path_factory.mktemp("foreign")
    loaded = read_checkpoint(TINY_RUN)
    for name, target in (("tiny.pt", "torch"), ("tiny.msgpack", "flax"), ("tiny-orbax", "flax")):
        write_checkpoint(out / name, target, loaded.cfg, loaded.weights)
    return out


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_one_framework_install(framework, foreign, tmp_path, tmp_path_factory):
    home = venv_home(tmp_path)
    venv = home / f"venv-{framework}"
    try:
        seconds = build_venv(venv, framework, tmp_path_factory.getbasetemp().parent / "editable-install.lock")
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", JAX_PLATFORMS="cpu",
                   PYTHONNOUSERSITE="1", PYTHONPYCACHEPREFIX=str(home / "pycache"))
        start = time.perf_counter()
        result = subprocess.run([str(venv / "bin" / "python"), str(ROOT / "scripts" / "smoke_install.py"),
                                 "--framework", framework, "--foreign", str(foreign), "--work", str(tmp_path)],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=1200)
        print(f"{framework}-only virtualenv built in {seconds:.0f} s, smoke test {time.perf_counter() - start:.0f} s")
        print(result.stdout)
        assert result.returncode == 0, f"{result.stdout[-12000:]}\n{result.stderr[-4000:]}"
        assert f"{framework}-only install: 0 failed checks" in result.stdout
    finally:
        start = time.perf_counter()
        shutil.rmtree(venv if home == tmp_path else home, ignore_errors=True)
        print(f"{framework}-only virtualenv removed in {time.perf_counter() - start:.0f} s")


HF_SMOKE = """
import subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])  # tests/: the offline fixtures
from hf_fixtures import save_marian_dir
work = Path(sys.argv[2])
opus = save_marian_dir(work / "opus-mt", seed=3)
def twin(*args):
    r = subprocess.run([sys.executable, "-m", "parity.cli", *map(str, args)], capture_output=True, text=True)
    print(f"twin {' '.join(map(str, args[:2]))}: {r.returncode}", r.stdout.strip()[-200:], r.stderr.strip()[-300:])
    return r
assert twin("convert", opus, work / "run", "--to", "safetensors").returncode == 0
assert twin("convert", work / "run", work / "back", "--to", "hf-marian").returncode == 0
r = twin("translate", opus, "one two three", "--max-new-tokens", "5")
assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
r = twin("parity", opus)
assert r.returncode == 1 and r.stderr.strip().splitlines() == [
    "twin parity: JAX/Flax is not installed (it runs both twins): pip install 'twin-transformer[jax]'"], r.stderr
print("hf install: 0 failed checks")
"""


def run_extra_smoke(extra: str, script: str, args: list, tmp_path, tmp_path_factory) -> None:
    """`pip install -e '.[extra]'` alone into a fresh virtualenv, then `script` (python -c) with `args`, on one
    thread; it must exit 0 and print "<extra> install: 0 failed checks"."""
    home = venv_home(tmp_path)
    venv = home / f"venv-{extra}"
    try:
        seconds = build_venv(venv, extra, tmp_path_factory.getbasetemp().parent / "editable-install.lock")
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONNOUSERSITE="1",
                   PYTHONPYCACHEPREFIX=str(home / "pycache"), OMP_NUM_THREADS="1")
        result = subprocess.run([str(venv / "bin" / "python"), "-c", script, *map(str, args)],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=1200)
        print(f"{extra}-only virtualenv built in {seconds:.0f} s\n{result.stdout}")
        assert result.returncode == 0, f"{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
        assert f"{extra} install: 0 failed checks" in result.stdout
    finally:
        shutil.rmtree(venv if home == tmp_path else home, ignore_errors=True)


def test_hf_extra_install_reads_translates_and_exports_opus_mt(tmp_path, tmp_path_factory):
    """`pip install -e '.[hf]'` alone (torch, transformers, sentencepiece; no JAX): an opus-mt-like directory
    converts in and back out, translates through its MarianTokenizer, and twin parity names the missing extra."""
    run_extra_smoke("hf", HF_SMOKE, [ROOT / "tests", tmp_path], tmp_path, tmp_path_factory)


DEPLOY_SMOKE = """
import subprocess, sys
from pathlib import Path
tiny, work = Path(sys.argv[1]), Path(sys.argv[2])
def twin(*args):
    r = subprocess.run([sys.executable, "-m", "parity.cli", *map(str, args)], capture_output=True, text=True)
    print(f"twin {' '.join(map(str, args[:2]))}: {r.returncode}", r.stdout.strip()[-300:], r.stderr.strip()[-300:])
    return r
assert twin("convert", tiny, work / "ct2", "--to", "ctranslate2").returncode == 0
r = twin("translate", work / "ct2", "one hundred and five", "twenty two")
assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr
r = twin("eval", work / "ct2", "--data", "builtin", "--limit", "20")
assert r.returncode == 0 and "ctranslate2, greedy" in r.stdout, r.stderr
for args in (("translate", tiny, "one"), ("convert", tiny, work / "v", "--to", "ctranslate2", "--verify")):
    r = twin(*args)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "not installed" in r.stderr, r.stderr
print("deploy install: 0 failed checks")
"""


def test_deploy_extra_install_converts_translates_and_evaluates(tmp_path, tmp_path_factory):
    """`pip install -e '.[deploy]'` alone (CTranslate2; neither torch nor JAX): tiny_run converts to CTranslate2,
    translates and evaluates through it; what needs a twin names the missing extra."""
    run_extra_smoke("deploy", DEPLOY_SMOKE, [TINY_RUN, tmp_path], tmp_path, tmp_path_factory)


# ------------------------------------------------------------------------ parity.extras in this process

def test_missing_extra_lines():
    from parity.extras import MissingExtra

    assert str(MissingExtra("twin translate", ["torch"], instead="pass --framework jax")) == (
        "twin translate: PyTorch is not installed: pip install 'twin-transformer[torch]', or pass --framework jax")
    assert str(MissingExtra("twin parity", ["jax"], why="it runs both twins")) == (
        "twin parity: JAX/Flax is not installed (it runs both twins): pip install 'twin-transformer[jax]'")
    assert str(MissingExtra("twin bench", ["torch", "jax"])) == (
        "twin bench: PyTorch and JAX/Flax are not installed: pip install 'twin-transformer[torch,jax]'")
    assert str(MissingExtra("twin eval", ["torch", "jax"], either=True)) == (
        "twin eval: PyTorch and JAX/Flax are not installed: pip install 'twin-transformer[torch]' or "
        "'twin-transformer[jax]'")


NOT_TORCH = "PyTorch is not installed: pip install 'twin-transformer[torch]'"
NOT_JAX = "JAX/Flax is not installed: pip install 'twin-transformer[jax]'"
NEITHER = ("PyTorch and JAX/Flax are not installed: pip install 'twin-transformer[torch]' or "
           "'twin-transformer[jax]'")


@pytest.mark.parametrize("present, expected", [
    (("torch", "jax"), {None: "torch", "torch": "torch", "jax": "jax"}),
    (("torch",), {None: "torch", "torch": "torch", "jax": f"{NOT_JAX}, or pass --framework torch"}),
    (("jax",), {None: "jax", "torch": f"{NOT_TORCH}, or pass --framework jax", "jax": "jax"}),
    ((), {None: NEITHER, "torch": NOT_TORCH, "jax": NOT_JAX}),
], ids=["both", "torch-only", "jax-only", "neither"])
def test_framework_defaults_to_the_installed_one(present, expected, monkeypatch):
    from parity import extras

    monkeypatch.setattr(extras, "installed", lambda extra: extra in present)
    for chosen, want in expected.items():
        if want in extras.FRAMEWORKS:
            assert extras.framework("twin train", chosen) == want
        else:
            with pytest.raises(extras.MissingExtra) as e:
                extras.framework("twin train", chosen)
            assert str(e.value) == f"twin train: {want}"


def test_installed_asks_finders_without_importing(monkeypatch):
    from parity import extras

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "flax":
                raise ImportError(f"{name} is blocked in this test")

    assert extras.installed("torch") and extras.installed("jax")
    monkeypatch.setattr(sys, "meta_path", [Block(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "flax", raising=False)
    assert not extras.installed("jax") and extras.installed("torch")
    assert extras.missing(["torch", "jax"]) == ["jax"]
    assert extras.extra_of_module("flax.linen") == "jax" and extras.extra_of_module("numpy") is None


def test_cli_names_the_extra_of_an_unforeseen_missing_module(monkeypatch, capsys):
    from parity import cli, extras

    def needs_flax(args):
        raise ModuleNotFoundError("No module named 'flax'", name="flax")

    monkeypatch.setattr(cli, "cmd_parity", needs_flax)
    monkeypatch.setattr(extras, "installed", lambda extra: extra == "torch")
    assert cli.main(["parity"]) == 1
    assert capsys.readouterr().err == "twin parity: JAX/Flax is not installed: pip install 'twin-transformer[jax]'\n"
    monkeypatch.setattr(extras, "installed", lambda extra: True)  # installed, so a real bug: the traceback stays
    with pytest.raises(ModuleNotFoundError):
        cli.main(["parity"])


def test_extras_are_the_pyproject_extras():
    from parity import extras

    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def modules(name: str) -> set[str]:  # the distributions an extra pulls in, through twin-transformer[...] too
        out = set()
        for requirement in optional[name]:
            project, _, rest = requirement.partition("[")
            if project == extras.PACKAGE:
                out |= set().union(*(modules(e) for e in rest.split("]")[0].split(",")))
            else:
                out.add(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])
        return out

    for name, extra in extras.EXTRAS.items():
        assert modules(name) == set(extra.modules), name
        assert all(importlib.util.find_spec(m) for m in extra.modules)  # this test environment has every extra
