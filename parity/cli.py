"""`twin`: the command line tool. Subcommands: train, translate, eval, convert, parity, bench."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from typing import Sequence

import numpy as np

from parity import extras
from parity.formats.ctranslate2 import QUANTIZATIONS
from parity.suite import TOLERANCES, TWINS, Check


def print_table(rows: Sequence[tuple[str, Check]], title: str) -> int:
    """Print one row per check; return the number of failures."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column, justify in (("config", "left"), ("check", "left"), ("dtype", "left"), ("max abs diff", "right"),
                            ("rel error", "right"), ("tolerance", "right"), ("result", "left")):
        table.add_column(column, justify=justify)
    failures = 0
    for config, check in rows:
        failures += not check.passed
        table.add_row(config, check.what, check.dtype, f"{check.max_abs:.3e}", f"{check.rel:.3e}",
                      f"{check.tol:.0e}", "[green]pass[/green]" if check.passed else "[red]FAIL[/red]")
    console = Console(width=max(160, Console().width))
    console.print(table)
    console.print(f"{len(rows) - failures} passed, {failures} failed")
    return failures


def _setup_jax(device: str) -> None:
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)


def config_label(cfg) -> str:
    """A config in a table row: arch, width, heads, layers (encoder/decoder for seq2seq) and classes."""
    layers = {"seq2seq": f"{cfg.num_encoder_layers}/{cfg.num_decoder_layers}", "encoder": cfg.num_encoder_layers,
              "decoder": cfg.num_decoder_layers}[cfg.arch]
    classes = f" C={cfg.num_classes}" if cfg.num_classes is not None else ""
    return f"{cfg.arch} d={cfg.d_model} h={cfg.num_heads} L={layers}{classes}"


def cmd_parity(args: argparse.Namespace) -> int:
    extras.require("twin parity", TWINS, why="it runs both twins")
    _setup_jax(args.device)
    from parity import suite

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in TOLERANCES:
            raise SystemExit(f"twin parity: unknown dtype {d!r} (choose from {', '.join(TOLERANCES)})")
    rng = np.random.default_rng(args.seed)
    rows: list[tuple[str, Check]] = []
    if args.run_dir:
        from parity.convert import ConversionError
        from parity.formats import FormatError, read_checkpoint

        try:
            loaded = read_checkpoint(args.run_dir, config=args.config)
        except (FormatError, ConversionError) as e:
            raise SystemExit(f"twin parity: {e}") from None
        cfg, weights = loaded.cfg.without_dropout(), loaded.weights
        jobs = [(os.path.basename(os.path.normpath(args.run_dir)), cfg, weights, source) for source in TWINS]
        if loaded.container in ("hf-marian", "fsmt"):
            from parity.hf_reference import reference_rows

            label = f"{jobs[0][0]} {config_label(cfg)}"
            rows += [(label, c) for c in reference_rows(args.run_dir, cfg, weights, dtypes, max(args.batch, 1),
                                                          min(cfg.max_len, args.length), rng)]
    else:
        jobs = []
        for i in range(args.configs):
            cfg = suite.random_config(rng)
            for source in TWINS:
                jobs.append((f"random #{i}", cfg, suite.init_canonical(cfg, source, args.seed + i), source))
    for name, cfg, weights, source in jobs:
        length = min(cfg.max_len, args.length)
        inputs = suite.random_inputs(cfg, args.batch, length, length, rng, empty_source_row=args.batch > 1)
        label = f"{name} {config_label(cfg)}"
        for dtype in dtypes:
            rows += [(label, c) for c in suite.compare_twins(cfg, weights, inputs, dtype, source, args.device)]
        if source == "torch":
            rows += [(label, c) for c in suite.round_trip_checks(cfg, weights)]
    title = f"twin parity ({args.run_dir or f'{args.configs} random configs, seed {args.seed}'}, {args.device})"
    return 1 if print_table(rows, title) else 0


def cmd_train(args: argparse.Namespace) -> int:
    from parity.train import TrainConfig, TrainError, run

    args.framework = extras.framework("twin train", args.framework)
    if args.framework == "jax" and args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    defaults = TrainConfig()
    hosts = {name: getattr(args, name) for name in ("coordinator", "num_processes", "process_id")
             if getattr(args, name) is not None}
    try:
        tcfg = TrainConfig(steps=args.steps, max_tokens=args.max_tokens, lr_factor=args.lr_factor,
                           warmup_steps=args.warmup, label_smoothing=args.label_smoothing, clip_norm=args.clip_norm,
                           seed=args.seed, vocab_size=args.vocab_size, log_every=args.log_every,
                           eval_every=args.eval_every, save_every=args.save_every, keep=args.keep,
                           betas=defaults.betas, adam_eps=defaults.adam_eps, pack=args.pack,
                           bucket_sides=args.bucket_sides)
    except ValueError as e:
        raise SystemExit(f"twin train: {e}") from None
    try:
        last = run(args.framework, args.data, args.out, model=args.config, tcfg=tcfg, resume=args.resume,
                   init_from=args.init_from, dtype=args.dtype, device=args.device, limit=args.limit,
                   show=args.show, test_limit=args.test_limit, progress=not args.no_progress,
                   dropout=args.dropout, arch=args.arch, mesh=args.mesh, fsdp=args.fsdp, hosts=hosts,
                   compile=args.compile)
    except TrainError as e:
        print(f"twin train: {e}", file=sys.stderr)
        return 1
    return 130 if last.get("interrupted") else 0


def _read_stdin() -> tuple[list[str], list[str]]:
    """Lines of stdin (surrounding whitespace stripped) and their names ("line N")."""
    from parity.translate import TranslateError

    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as e:
        raise TranslateError(f"stdin is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise TranslateError("no input: give TEXT arguments or lines on stdin (stdin is empty)")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines], [f"line {i}" for i in range(1, len(lines) + 1)]


def _decode_options(args: argparse.Namespace):
    """DecodeOptions of the command line (eval has no sampling arguments)."""
    from parity.translate import DecodeOptions, generation_config_options

    fields = dict(beam_size=args.beam, length_penalty=args.length_penalty, beam_rule=args.beam_rule,
                  forced_eos=args.forced_eos)
    if args.hf_generation:
        fields.update(generation_config_options(args.run_dir))
    return DecodeOptions(temperature=getattr(args, "temperature", 0.0), top_k=getattr(args, "top_k", 0),
                         top_p=getattr(args, "top_p", 1.0), seed=getattr(args, "seed", None),
                         max_new_tokens=args.max_new_tokens, **fields)


def _run_framework(command: str, args: argparse.Namespace) -> str:
    """--framework, or "ctranslate2" for a CTranslate2 model directory (which needs the deploy extra)."""
    from parity.formats.ctranslate2 import is_ct2_dir
    from parity.translate import CT2

    if is_ct2_dir(args.run_dir):
        extras.require(command, ["deploy"], why=f"{args.run_dir} is a CTranslate2 model")
        return args.framework or CT2
    return extras.framework(command, args.framework)


def cmd_translate(args: argparse.Namespace) -> int:
    from parity.translate import TranslateError, Translator, check_writable, plot_attention

    args.framework = _run_framework("twin translate", args)
    try:
        options = _decode_options(args)
        if args.batch_size < 1:
            raise TranslateError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.plot_attention and len(args.text) > 1:
            raise TranslateError(f"--plot-attention draws one sentence; got {len(args.text)} texts")
        if args.plot_attention:
            check_writable(args.plot_attention, "--plot-attention")
        translator = Translator.load(args.run_dir, args.framework, args.device, quantize=args.quantize)
        if args.text:
            texts, names = [t.strip() for t in args.text], [f"text {i}" for i in range(1, len(args.text) + 1)]
        else:
            texts, names = _read_stdin()
        if args.plot_attention and len(texts) > 1:
            raise TranslateError(f"--plot-attention draws one sentence; stdin has {len(texts)} lines")
        translator.encode(texts, names)  # every input checked before any output
        if args.plot_attention:
            found = translator.attention(texts[0], **asdict(options))
            outputs = [found.translation]
            plot_attention(args.plot_attention, found.src_tokens, found.out_tokens, found.weights,
                           heads=args.plot_heads, title=f"{texts[0]}  ->  {found.translation}")
        else:
            outputs = translator.translate(texts, names, batch_size=args.batch_size, **asdict(options))
    except TranslateError as e:
        print(f"twin translate: {e}", file=sys.stderr)
        return 1
    for line in outputs:
        print(line)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from parity.checkpoint import CheckpointError, read_json
    from parity.data import DataError, load_corpus
    from parity.translate import TranslateError, Translator, check_writable, write_file

    args.framework = _run_framework("twin eval", args)
    try:
        options = _decode_options(args)
        for name, value in (("--batch-size", args.batch_size), ("--limit", args.limit)):
            if value is not None and value < 1:
                raise TranslateError(f"{name} must be at least 1, got {value}")
        if args.json:
            check_writable(args.json, "--json")
        translator = Translator.load(args.run_dir, args.framework, args.device, quantize=args.quantize)
        data = args.data
        if data is None:
            path = Path(args.run_dir) / "train_config.json"
            try:
                data = read_json(path, "training config").get("data")
            except CheckpointError as e:
                raise TranslateError(f"{e}; pass --data") from None
            if not isinstance(data, str):
                raise TranslateError(f"{path}: no \"data\" naming the training data; pass --data")
        try:
            corpus = load_corpus(data)
        except DataError as e:
            raise TranslateError(f"{e}{'' if args.data else ' (the data the run was trained on; pass --data)'}") \
                from None
        pairs = corpus.test[:args.limit]
        scores = translator.evaluate(pairs, batch_size=args.batch_size, **asdict(options))
        if args.json:
            record = {"run_dir": str(args.run_dir), "data": str(data), "split": "test", **scores}
            write_file(args.json, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode(), "--json")
    except TranslateError as e:
        print(f"twin eval: {e}", file=sys.stderr)
        return 1
    skipped = f" ({scores['skipped']} longer than max_len skipped)" if scores["skipped"] else ""
    print(f"{args.run_dir}: test split of {data}, {args.framework}{' int8' if args.quantize else ''}, "
          f"{'greedy' if options.beam_size == 1 else f'beam {options.beam_size}'}")
    print(f"BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}  exact match {scores['exact_match']:.2%}")
    print(f"{scores['sentences']} sentences{skipped} in {scores['seconds']:.2f} s "
          f"({scores['sentences_per_s']:.1f} sentences/s)")
    return 0


def _convert_extras(args: argparse.Namespace, dst_container: str) -> None:
    """MissingExtra when reading SRC, writing DST or --verify needs a framework that is not installed."""
    from parity.formats import detect

    src_container, path = detect(args.src)
    if src_container in extras.CONTAINER_EXTRAS:
        extras.require("twin convert", [extras.CONTAINER_EXTRAS[src_container]], why=f"to read {path}")
    if dst_container in extras.CONTAINER_EXTRAS:
        instead = "give DST a .safetensors name" if args.to == "nn-transformer" else "pass --to safetensors"
        extras.require("twin convert", [extras.CONTAINER_EXTRAS[dst_container]],
                       why=f"to write --to {args.to} at {args.dst}", instead=instead)
    if args.verify and args.to == "ctranslate2":
        extras.require("twin convert", ["deploy"], why="--verify runs CTranslate2", instead="leave out --verify")
        extras.default_framework("twin convert --verify (the twin that CTranslate2 is compared with)")
    elif args.verify:
        extras.require("twin convert", TWINS, why="--verify runs both twins", instead="leave out --verify")


def cmd_convert(args: argparse.Namespace) -> int:
    import time

    from parity.convert import ConversionError
    from parity.formats import (FormatError, cast, check_destination, read_checkpoint, return_large_frees_to_os,
                                write_checkpoint)

    return_large_frees_to_os()
    start = time.perf_counter()
    try:
        dst_container, _ = check_destination(args.dst, args.to, args.force, src=args.src)
        if args.to == "ctranslate2" and args.dtype:
            raise FormatError(f"{args.dst}: --dtype does not apply to --to ctranslate2: pass --quantization "
                              f"(float32, float16, bfloat16, int8, ...)")
        _convert_extras(args, dst_container)
        loaded = read_checkpoint(args.src, config=args.config, allow_nonfinite=args.allow_nonfinite)
        weights = cast(loaded.weights, args.dtype)
        from parity.formats.hf_dir import companion_special_ids, special_ids

        special = (special_ids(args.src) if loaded.container in ("hf-marian", "fsmt")
                   else companion_special_ids(loaded.companions))
        write_checkpoint(args.dst, args.to, loaded.cfg, weights, force=args.force, companions=loaded.companions,
                         special_ids=special, quantization=args.quantization)
    except (FormatError, ConversionError) as e:
        print(f"twin convert: error: {e}", file=sys.stderr)
        return 1
    print(f"read  {loaded.describe()}")
    cast_to = args.dtype or args.quantization
    print(f"wrote {args.dst} ({args.to}{', ' + cast_to if cast_to else ''}) in "
          f"{time.perf_counter() - start:.2f} s")
    if not args.verify:
        return 0
    _setup_jax(args.device)
    from parity.verify import verify

    rows = verify(args.dst, args.to, loaded.cfg, weights, seed=args.seed, device=args.device)
    label = f"{args.dst} {config_label(loaded.cfg)}"
    return 1 if print_table([(label, r) for r in rows], f"twin convert --verify ({args.to}, {args.device})") else 0


BENCHES = {"train": "bench_train.py", "precision": "bench_precision.py", "lengths": "bench_lengths.py",
           "decode": "bench_decode.py", "convert": "bench_convert.py", "scaling": "bench_scaling.py",
           "hf": "bench_hf.py", "int8": "bench_int8.py", "race": "bench_race.py"}


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    extras.require("twin bench", TWINS, why="the benchmarks measure both twins")
    chosen = [flag for flag in BENCHES if getattr(args, flag)]
    if len(chosen) > 1:
        raise SystemExit(f"twin bench: choose one of {', '.join('--' + flag for flag in chosen)}")
    name = BENCHES[chosen[0]] if chosen else "bench_report.py"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    if not script.is_file():
        raise SystemExit(f"twin bench: benchmarks/{name} ships with the source repository; "
                         "run it from a clone (pip install -e .)")
    sys.argv = [str(script), *args.extra]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # the script's own sys.exit(status)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


FRAMEWORK_HELP = "the framework that runs the model (default: the installed one, torch when both are)"


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--framework", choices=extras.FRAMEWORKS, help=FRAMEWORK_HELP)
    p.add_argument("--beam", type=int, default=1, help="beam size (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, default=0.6, help="beam search length penalty alpha (GNMT; "
                   "default 0.6)")
    p.add_argument("--beam-rule", choices=("twin", "hf", "ctranslate2"), help="beam search scoring and stopping: "
                   "twin (GNMT penalty, exact stop; the twins' default), hf (transformers' generate: len ** alpha, "
                   "early_stopping=False; use --length-penalty 1.0 for its default) or ctranslate2 (CTranslate2's "
                   "translate_batch: len ** alpha, stop once beam-size hypotheses end; a CTranslate2 model's own "
                   "and only rule)")
    p.add_argument("--forced-eos", action="store_true", help="the last token is EOS where a sentence has not "
                   "ended (transformers' forced_eos_token_id, which opus-mt configs set)")
    p.add_argument("--hf-generation", action="store_true", help="decode as transformers' generate does under "
                   "RUN_DIR's generation_config.json (num_beams, length_penalty, forced EOS; --beam-rule hf): "
                   "replaces --beam, --length-penalty, --beam-rule and --forced-eos")
    p.add_argument("--max-new-tokens", type=int, help="output tokens at most (default min(max_len, 2 * padded "
                   "source length + 10))")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quantize", choices=("int8",), help="int8: decode with the torch twin's dynamic int8 Linears "
                   "(torch_tx.quantize; --framework torch on the CPU only; a CTranslate2 model is quantized when "
                   "converted, twin convert --quantization)")


def build_parser() -> argparse.ArgumentParser:
    from parity.train import TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="twin", description="One Transformer, two frameworks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="check that the PyTorch and Flax twins compute the same function",
                       description="Run both twins on the same weights and inputs and compare outputs and gradients: "
                       "on CHECKPOINT (any arch: seq2seq, encoder, decoder), or on random configs of all three archs.")
    p.add_argument("run_dir", nargs="?", metavar="CHECKPOINT", help="a run directory, or any checkpoint twin "
                   "convert reads (safetensors, .pt, orbax, msgpack, nn.Transformer); random configs when omitted")
    p.add_argument("--config", metavar="CONFIG", help="config.json for a CHECKPOINT that carries none")
    p.add_argument("--configs", type=int, default=4, help="number of random configs, each of a random arch "
                   "(default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated: float32,float64,bfloat16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--length", type=int, default=7, help="source and target length (capped at max_len)")
    p.set_defaults(func=cmd_parity)
    t = sub.add_parser("train", help="train (or resume) a translator, classifier or language model in PyTorch or "
                       "JAX", description="Train a model (--arch: the seq2seq Transformer on sentence pairs, the "
                       "encoder as a classifier of labelled texts, the decoder as a language model of texts); the "
                       "run directory holds the canonical checkpoint, the tokenizer, the training state for "
                       "--resume, metrics.jsonl and loss.png. Ctrl-C saves a checkpoint and stops.")
    t.add_argument("--framework", choices=extras.FRAMEWORKS, help=FRAMEWORK_HELP)
    t.add_argument("--arch", choices=("seq2seq", "encoder", "decoder"), help="model family (default seq2seq; "
                   "--resume and --init-from keep the checkpoint's)")
    t.add_argument("--data", default="builtin", help="'builtin' (number names: English -> French pairs for "
                   "seq2seq, English and French names labelled with their leading digit for the encoder, "
                   "'English = French' lines for the decoder), a file (seq2seq: .tsv source<TAB>target or .jsonl "
                   "src/tgt; encoder: .tsv text<TAB>label or .jsonl text/label; decoder: .txt one text per line "
                   "or .jsonl text), or a directory with train/valid/test files (default builtin)")
    t.add_argument("--pack", action="store_true", help="pack several examples into each row of max_len positions "
                   "(segment ids, per-example positions) instead of length buckets; the padding saved is "
                   "printed")
    t.add_argument("--bucket-sides", choices=("shared", "separate"), default=defaults.bucket_sides,
                   help="seq2seq length buckets: 'shared' pads source and target to one length (fewer batch "
                   "shapes, so fewer JAX compilations), 'separate' buckets each side on its own "
                   f"(default {defaults.bucket_sides})")
    t.add_argument("--out", required=True, help="run directory (new, or an existing run with --resume)")
    t.add_argument("--steps", type=int, default=defaults.steps, help=f"total updates (default {defaults.steps})")
    t.add_argument("--config", default="small", help="model preset (tiny, small, base, marian) or a JSON file of "
                   "TransformerConfig fields (default small)")
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(in either framework)")
    t.add_argument("--init-from", metavar="CHECKPOINT", help="start from the weights (and tokenizer) of a "
                   "checkpoint directory written by either framework")
    t.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="token budget per batch")
    t.add_argument("--lr-factor", type=float, default=defaults.lr_factor)
    t.add_argument("--warmup", type=int, default=defaults.warmup_steps, help="warmup steps of the schedule")
    t.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    t.add_argument("--clip-norm", type=float, default=defaults.clip_norm)
    t.add_argument("--dropout", type=float, help="override the config's dropout")
    t.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="BPE vocabulary size (at most)")
    t.add_argument("--log-every", type=int, default=defaults.log_every)
    t.add_argument("--eval-every", type=int, default=defaults.eval_every)
    t.add_argument("--save-every", type=int, default=defaults.save_every)
    t.add_argument("--keep", type=int, default=defaults.keep, help="checkpoints kept")
    t.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32",
                   help="float32 or float64 throughout, or bfloat16: mixed precision, float32 weights and Adam "
                   "moments (and checkpoints), the matmuls in bfloat16 and embeddings, layer norms and the loss in "
                   "float32 (torch.autocast's rule, in both twins); default float32")
    t.add_argument("--compile", action="store_true", help="torch: torch.compile the model for the training steps "
                   "(compiles on the first step and on new batch shapes; evaluation and decoding stay eager); the "
                   "JAX trainer has no such option, its step is always jitted")
    t.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    t.add_argument("--limit", type=int, help="use only the first N training examples")
    t.add_argument("--test-limit", type=int, help="test only the first N test examples at the end (0: skip the "
                   "test)")
    t.add_argument("--show", type=int, default=5, help="translations, predictions or continuations printed at "
                   "the end")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--mesh", metavar="data=N,fsdp=M", help="JAX: shard each batch over N*M devices, and the "
                   "parameters and Adam moments over the fsdp axis (on CPU, N*M simulated devices)")
    t.add_argument("--fsdp", action="store_true", help="torch under torchrun: FSDP2 (fully_shard: parameters, "
                   "gradients and Adam moments sharded over the processes) instead of DDP")
    t.add_argument("--coordinator", metavar="HOST:PORT", help="JAX on several hosts: process 0's address, passed "
                   "to jax.distributed.initialize with --num-processes and --process-id; --mesh spans all their "
                   "devices")
    t.add_argument("--num-processes", type=int, help="JAX on several hosts: how many processes (one per host)")
    t.add_argument("--process-id", type=int, help="JAX on several hosts: this process's index, 0 to "
                   "--num-processes - 1")
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("translate", help="translate text with a trained run (one output line per input)",
                       description="Translate each TEXT, or each line of stdin, with the model of RUN_DIR; prints "
                       "one translation per line, in input order. Greedy unless --beam > 1 (beam search) or "
                       "--temperature > 0 (sampling).")
    c.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by twin train")
    c.add_argument("text", nargs="*", metavar="TEXT", help="source sentences (default: the lines of stdin)")
    _add_decoding_args(c)
    c.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: no "
                   "sampling)")
    c.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: all)")
    c.add_argument("--top-p", type=float, default=1.0, help="sample from the fewest tokens with probability >= p "
                   "(nucleus; default 1)")
    c.add_argument("--seed", type=int, help="sampling seed")
    c.add_argument("--plot-attention", metavar="FILE.png", help="draw the cross-attention maps of one sentence")
    c.add_argument("--plot-heads", action="store_true", help="with --plot-attention: one panel per layer and head "
                   "(default: one per layer, heads averaged)")
    c.set_defaults(func=cmd_translate)
    e = sub.add_parser("eval", help="BLEU, chrF and exact match of a trained run on a test split",
                       description="Translate the test split of the run's data (or --data) and print corpus BLEU "
                       "and chrF (sacrebleu), exact match and speed.")
    e.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by twin train")
    e.add_argument("--data", help="'builtin', a .tsv/.jsonl file or a directory with train/valid/test files "
                   "(default: the run's training data, from train_config.json)")
    e.add_argument("--limit", type=int, help="only the first N test sentences")
    e.add_argument("--json", metavar="FILE", help="also write the scores and translations as JSON")
    _add_decoding_args(e)
    e.set_defaults(func=cmd_eval)
    v = sub.add_parser("convert", help="convert a checkpoint between safetensors, PyTorch, Flax (orbax/msgpack) and "
                       "torch.nn.Transformer", description="Read SRC (detected: a canonical .safetensors, a PyTorch "
                       ".pt/.bin state dict, flax msgpack, an orbax checkpoint directory, a torch.nn.Transformer "
                       "or nn.TransformerEncoder state dict, or a directory with config.json and one of these) of "
                       "any arch (seq2seq, encoder, decoder: the config's arch) and write it as --to. DST "
                       "ending in .safetensors/.pt/.pth/.bin/.msgpack is a file; otherwise a directory with "
                       "config.json (for flax: an orbax checkpoint). Pickles are read with "
                       "torch.load(weights_only=True) only; writes are atomic.")
    v.add_argument("src", metavar="SRC")
    v.add_argument("dst", metavar="DST")
    v.add_argument("--to", required=True, choices=("torch", "flax", "safetensors", "nn-transformer", "hf-marian",
                                                    "ctranslate2"),
                   help="nn-transformer: torch.nn.Transformer names (nn.TransformerEncoder's for an encoder; "
                   "not for a decoder-only model); hf-marian: a directory transformers loads (MarianMTModel, "
                   "its tokenizer, generation_config.json), for configs in Marian's layout (--config marian); "
                   "ctranslate2: a CTranslate2 model directory (Translator, Generator or Encoder by the arch) with "
                   "SRC's tokenizer, which twin translate and twin eval run")
    v.add_argument("--quantization", choices=QUANTIZATIONS, help="--to ctranslate2: the weight type (default: the "
                   "checkpoint's own, float32 or float16)")
    v.add_argument("--verify", action="store_true", help="load DST with the target framework and run the parity "
                   "checks of twin parity on it")
    v.add_argument("--force", action="store_true", help="replace an existing DST")
    v.add_argument("--dtype", choices=("float16", "bfloat16", "float32", "float64"),
                   help="cast the weights (default: keep each tensor's dtype)")
    v.add_argument("--config", metavar="CONFIG", help="config.json (or a directory holding one) for a SRC that "
                   "carries none (.pt, .msgpack, nn.Transformer); overrides one SRC carries")
    v.add_argument("--allow-nonfinite", action="store_true", help="convert weights that hold NaN or Inf")
    v.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where --verify runs")
    v.add_argument("--seed", type=int, default=0, help="inputs of --verify")
    v.set_defaults(func=cmd_convert)
    b = sub.add_parser("bench", help="training, decoding and conversion speed and memory of the twins against "
                       "their peers, one report (benchmarks/bench_report.py; arguments are passed on, e.g. --quick)")
    b.add_argument("--train", action="store_true", help="training-step throughput only: each twin and trainer "
                   "against torch.nn.Transformer / flax.linen layers, model FLOP/s against the matmul ceiling, "
                   "--memory for peak memory (benchmarks/bench_train.py)")
    b.add_argument("--precision", action="store_true", help="the trainers in float32, bfloat16 mixed precision "
                   "and (torch) under torch.compile (benchmarks/bench_precision.py)")
    b.add_argument("--lengths", action="store_true", help="step time and peak memory as the sequence length "
                   "(64..1024) and d_model grow, the attention's quadratic term fitted, a plot "
                   "(benchmarks/bench_lengths.py)")
    b.add_argument("--decode", action="store_true", help="decoding throughput instead: greedy, beam and sampling "
                   "with the KV cache against torch.nn.Transformer's prefix-recomputing loop "
                   "(benchmarks/bench_decode.py)")
    b.add_argument("--convert", action="store_true", help="time and peak RSS of twin convert on a >= 1 GB checkpoint "
                   "between every format, against reading the file once (benchmarks/bench_convert.py)")
    b.add_argument("--scaling", action="store_true", help="step time and per-device memory of JAX meshes and "
                   "torchrun DDP/FSDP2 over 1, 2, 4, 8 devices or processes (benchmarks/bench_scaling.py)")
    b.add_argument("--hf", action="store_true", help="the twins against transformers' MarianMTModel on one set of "
                   "opus-mt-size weights: decoding (greedy, beam 4) and training-step throughput, twin convert's "
                   "time and peak RSS against from_pretrained + save_pretrained (benchmarks/bench_hf.py)")
    b.add_argument("--int8", action="store_true", help="int8 decoding against float32 on a trained run: the torch "
                   "twin's --quantize int8 and CTranslate2 int8, identical sentences, BLEU and exact match "
                   "(benchmarks/bench_int8.py)")
    b.add_argument("--race", action="store_true", help="issue 21's table in one run: decoding against CTranslate2 "
                   "and transformers, training steps against MarianMTModel, torch.nn.Transformer and flax, and "
                   "make demo's time to its exact match (benchmarks/bench_race.py)")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "translate" and extra and not any(e.startswith("-") for e in extra):
        args.text, extra = args.text + extra, []  # TEXTs after an option: argparse leaves them over, in order
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args)
    except extras.MissingExtra as e:
        print(e, file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:  # a path no check above foresaw: still one line naming the extra
        extra = extras.extra_of_module(e.name)
        if extra is None or extras.installed(extra):
            raise
        print(extras.MissingExtra(f"twin {args.command}", [extra]), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
