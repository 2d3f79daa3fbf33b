"""Run by tests/test_distributed_torch.py under torchrun (2 processes, gloo): the torch Trainer under DDP and
FSDP2 against the single-process Trainer on the same global batches, in the same process; then, in the same
processes, the `twin train` commands of ROOT/commands.json ({name: argv}), one after the other.

The corpora are the data directories ROOT/data/{seq2seq,encoder,decoder}. Each process writes what it measured
to ROOT/rank{R}.json before the commands; the test asserts on it. Each command runs as under a torchrun launch
of its own (its own rendezvous and process group); its output (file descriptor 1) goes to
ROOT/NAME.rank{R}.out, and ROOT/NAME.rank{R}.done marks that it returned 0. Usage:
    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py ROOT
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity import cli  # noqa: E402
from parity.batching import Batcher  # noqa: E402
from parity.data import load_corpus  # noqa: E402
from parity.tokenizer import train_tokenizer  # noqa: E402
from parity.train import TrainConfig, model_config  # noqa: E402
from torch_tx import distributed  # noqa: E402
from torch_tx.train import Trainer  # noqa: E402

TCFG = TrainConfig(warmup_steps=2, max_tokens=144, bucket_step=8, seed=3)


def relative(a: dict[str, np.ndarray], b: dict[str, np.ndarray], *, skip_key_biases: bool = False) -> float:
    """|a - b| / |a| over all arrays of two canonical weight dicts (the same keys). `skip_key_biases` leaves the
    k_proj biases out: their gradient is zero in exact arithmetic, so Adam walks them on rounding noise
    (tests/test_train.py)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    keys = sorted(k for k in a if not (skip_key_biases and k.endswith("k_proj.bias")))
    x = np.concatenate([np.asarray(a[k], np.float64).ravel() for k in keys])
    y = np.concatenate([np.asarray(b[k], np.float64).ravel() for k in keys])
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def metric_gap(a: dict, b: dict) -> float:
    return max(abs(float(a[k]) - float(b[k])) / max(abs(float(a[k])), 1.0) for k in a)


def batches_of(arch: str, corpus, tokenizer, count: int, pack: bool = False) -> list:
    first = tokenizer.encode([e[0] for e in corpus.train])
    if arch == "seq2seq":
        kw = dict(src=first, tgt=tokenizer.encode([e[1] for e in corpus.train]))
    elif arch == "decoder":
        kw = dict(src=None, tgt=first)
    else:
        index = {label: i for i, label in enumerate(corpus.labels)}
        kw = dict(src=first, tgt=None, classes=[index[e[1]] for e in corpus.train])
    batcher = Batcher(**kw, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                      max_tokens=TCFG.max_tokens, max_len=64, bucket_step=TCFG.bucket_step, seed=TCFG.seed, pack=pack)
    stream = batcher.stream()
    return [next(stream)[1] for _ in range(count)]


def compare(arch: str, strategy: str, dtype: str, cfg, batches, src: np.ndarray, context) -> dict:
    """Three steps single vs distributed, evaluation, decoding, and resume both ways (a fourth step)."""
    single = Trainer(cfg, TCFG, dtype=dtype)
    spread = Trainer(cfg, TCFG, dtype=dtype, context=context)
    result = {"initial": relative(single.weights(), spread.weights(), skip_key_biases=True), "metrics": 0.0}
    for batch in batches[:3]:
        a, b = single.train_step(batch), spread.train_step(batch)
        result["metrics"] = max(result["metrics"], metric_gap(a, b))
        result.setdefault("sums", []).append({k: float(v) for k, v in b.items()})
    result["weights"] = relative(single.weights(), spread.weights(), skip_key_biases=True)
    state_a, state_b = single.export_state(3), spread.export_state(3)
    result["moments"] = max(relative(state_a.exp_avg, state_b.exp_avg, skip_key_biases=True),
                            relative(state_a.exp_avg_sq, state_b.exp_avg_sq, skip_key_biases=True))
    result["eval"] = metric_gap(single.eval_step(batches[3]), spread.eval_step(batches[3]))
    if arch == "encoder":
        result["decoded"] = bool(np.array_equal(single.classify(src), spread.classify(src)))
    else:
        kw = dict(max_new_tokens=6, bos_id=1, eos_id=2)
        result["decoded"] = bool(np.array_equal(single.greedy(src, **kw), spread.greedy(src, **kw)))
    into_spread = Trainer(cfg, TCFG, dtype=dtype, context=context)
    into_spread.load_state(state_a)
    into_single = Trainer(cfg, TCFG, dtype=dtype)
    into_single.load_state(state_b)
    for trainer in (single, into_spread, into_single):
        trainer.train_step(batches[3])
    reference = single.weights()
    result["resumed_distributed"] = relative(reference, into_spread.weights(), skip_key_biases=True)
    result["resumed_single"] = relative(reference, into_single.weights(), skip_key_biases=True)
    return result


@contextlib.contextmanager
def fd_output(path: Path):
    """File descriptor 1 (print's and anything else's) into `path` for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "wb") as file:
        os.dup2(file.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_commands(root: Path, commands: dict[str, list[str]], rank: int) -> None:
    """Each `twin` command with a rendezvous of its own: torchrun's store holds the keys of the first process
    group, so process 0 hosts each command's store, on a free port it announces through torchrun's store."""
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    for name, argv in commands.items():
        if rank == 0:
            with socket.socket() as sock:
                sock.bind((os.environ["MASTER_ADDR"], 0))
                agent.set(f"twin-test/{name}/port", str(sock.getsockname()[1]))
        os.environ["MASTER_PORT"] = agent.get(f"twin-test/{name}/port").decode()
        with fd_output(root / f"{name}.rank{rank}.out"):
            code = cli.main(argv)
        if code != 0:
            raise SystemExit(f"{name}: twin {' '.join(argv)} returned {code}")
        (root / f"{name}.rank{rank}.done").touch()


def main(root: Path) -> None:
    context = distributed.setup("cpu")
    rank = context.rank
    corpus = {arch: load_corpus(root / "data" / arch, arch=arch) for arch in ("seq2seq", "encoder", "decoder")}
    tokenizer = train_tokenizer((s for pair in corpus["seq2seq"].train for s in pair), vocab_size=200)
    report: dict = {"rank": rank, "describe": {}, "runs": {}}
    src = batches_of("seq2seq", corpus["seq2seq"], tokenizer, 1)[0].src[:5]  # [5, S]: odd, padded rows
    cases = [("seq2seq", "ddp", "float64", True, False), ("seq2seq", "fsdp", "float64", True, False),
             ("seq2seq", "ddp", "float32", False, False), ("seq2seq", "fsdp", "float32", False, False),
             ("encoder", "fsdp", "float64", False, False), ("decoder", "fsdp", "float64", True, False),
             ("decoder", "ddp", "float64", False, True)]
    for arch, strategy, dtype, tied, pack in cases:
        data = corpus[arch]
        cfg = model_config("tiny", tokenizer.vocab_size, arch, None if data.labels is None else len(data.labels))
        cfg = cfg.replace(dropout=0.0)
        if tied:
            cfg = cfg.replace(tie_output=True, share_embeddings=arch == "seq2seq")
        batches = batches_of(arch, data, tokenizer, 4, pack)
        ctx = context if strategy == "ddp" else distributed.Context(context.device, "fsdp")
        report["describe"][strategy] = ctx.describe()
        report["runs"][f"{arch}{'-packed' * pack}-{strategy}-{dtype}"] = {"rows": [len(b.labels) for b in batches],
                                                        **compare(arch, strategy, dtype, cfg, batches, src, ctx)}

    report["check_same_ok"] = context.check_same("same", 7) is None
    try:
        context.check_same("step", 10 + rank)
    except ValueError as e:
        report["check_same_error"] = str(e)
    report["any"] = [context.any(rank == 1), context.any(False)]
    report["all_sum"] = context.all_sum(torch.tensor([1.0, rank])).tolist()

    cfg = model_config("tiny", tokenizer.vocab_size).replace(dropout=0.1)
    trainer = Trainer(cfg, TCFG, context=distributed.Context(context.device, "fsdp"))
    trainer.train_step(batches_of("seq2seq", corpus["seq2seq"], tokenizer, 1)[0])
    state = trainer.export_state(1)
    streams = state.rng["torch_processes"]  # [P, N]
    report["streams_differ"] = not np.array_equal(streams[0], streams[1])
    resumed = Trainer(cfg, TCFG, context=distributed.Context(context.device, "fsdp"))
    resumed.load_state(state)
    report["stream_restored"] = bool(np.array_equal(torch.get_rng_state().numpy(), streams[rank]))
    (root / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    context.close()
    run_commands(root, json.loads((root / "commands.json").read_text()), rank)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
