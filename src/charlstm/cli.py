"""The ``charlstm`` command: a thin shell over the Python API.

Every mistake a user can make ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import torch

from . import checkpoint
from .corpus import DEFAULT_BOOK, MIRROR_ENV, Corpus, Normalization, check_encoding, read_text_file
from .data import split_train_val
from .dynamic_eval import DynamicConfig, dynamic_evaluate
from .checks import (check_device, check_float, check_int, check_output_dir, check_output_file, check_seed,
                     check_threads)
from .entry import (EXIT_INTERRUPTED, EXIT_TERMINATED, add_encoding_arg, add_prepare_command, new_parser, positive_int,
                    run_command)
from .errors import CharLSTMError
from .evaluate import LN2, score_text
from .fast_step import BACKENDS
from .finetune import resolve_init
from .generate import MAX_LENGTH, MAX_STREAMS, MODES, Generator, SamplingConfig
from .keras_import import CHECK_CHARS, KERAS_ACTIVATIONS, ImportOptions, TextReading, import_keras, keras_stem
from .metrics import plot_run
from .distributed import Distributed
from .model import INPUTS, TARGETS
from .native import PRECISIONS as STEP_PRECISIONS
from .prepare import PreparedData
from .recipes import (BATCHINGS, GRADIENT_SUMS, HEAD_CHOICES, MONITORS, OPTIMIZERS, OPTION_NAMES, PRECISIONS,
                      PRESETS, SCHEDULES, option_help, preset_configs)
from .train import fit


def _comma_list(convert, kind: str, example: str):
    """An argparse type: comma-separated values, each read by ``convert``."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(convert(part) for part in text.split(",") if part.strip())
        except ValueError:
            values = ()
        if not values:
            raise argparse.ArgumentTypeError(f"must be comma-separated {kind} such as {example}, not {text!r}")
        return values
    return parse


_temperatures = _comma_list(float, "numbers", "0.2,0.5,1.0")
_cutoffs = _comma_list(int, "whole numbers", "500,2000")
_step_sizes = _comma_list(float, "numbers", "3e-4,1e-3")
MAX_PRIME_CHARS = 1_000_000  # adapting reads ~2,000 characters/s per core: minutes, not hours
SHOWN_PRIME_CHARS = 500  # a longer prime is shown by its end, where the generated text joins it


# ----------------------------------------------------------------------- arguments


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("text")
    g.add_argument("--text", action="append", type=Path, metavar="FILE",
                   help="train on this UTF-8 text file (repeatable)")
    g.add_argument("--gutenberg", type=int, metavar="ID",
                   help=f"train on Project Gutenberg book ID (default {DEFAULT_BOOK}: Alice in Wonderland)")
    g.add_argument("--mirror", metavar="DIR|URL",
                   help=f"offline copy of Gutenberg books (folder or URL holding pgID.txt); env {MIRROR_ENV}")
    g.add_argument("--cache-dir", type=Path, help="where downloaded books are kept")
    g.add_argument("--offline", action="store_true", help="never download; use the cache or mirror")
    g.add_argument("--keep-case", action="store_true", help="do not lowercase the text")
    g.add_argument("--strip-punctuation", action="store_true",
                   help="keep only letters, digits, marks, spaces and newlines")
    add_encoding_arg(g)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training (defaults come from --preset)")
    g.add_argument("--preset", default="default", choices=list(PRESETS))

    def option(name: str, *flags: str, **kw) -> None:  # dest = the config field, help = its description
        g.add_argument(*flags, "--" + name.replace("_", "-"), dest=name, help=option_help(name), **kw)

    option("input", choices=INPUTS)
    option("embedding_dim", type=positive_int)
    option("layers", type=positive_int)
    option("units", type=positive_int)
    option("dropout", type=float)
    option("input_dropout", type=float)
    option("weight_drop", type=float)
    option("variational", action=argparse.BooleanOptionalAction, default=None)
    option("window", type=positive_int)
    option("head", choices=HEAD_CHOICES)
    option("head_cutoffs", type=_cutoffs, metavar="N[,N...]")
    option("epochs", type=positive_int)
    option("batch_size", type=positive_int)
    option("lr", type=float)
    option("weight_decay", type=float)
    option("optimizer", choices=OPTIMIZERS)
    option("schedule", choices=SCHEDULES)
    option("warmup_steps", type=int)
    option("final_lr_fraction", type=float)
    option("clip", type=float)
    option("batching", choices=BATCHINGS)
    option("stateful", action="store_true", default=None)
    option("target", choices=TARGETS)
    option("bptt", type=positive_int)
    option("random_offset", action=argparse.BooleanOptionalAction, default=None)
    option("val_fraction", type=float)
    option("monitor", choices=MONITORS)
    option("patience", type=int)
    option("time_budget", type=float, metavar="SECONDS")
    option("output_dir", "-o")
    option("checkpoint_template")
    option("seed", type=int)
    option("device")
    option("precision", choices=PRECISIONS)
    option("gradient_sum", choices=GRADIENT_SUMS)
    option("threads", type=int)
    option("keep", type=int, metavar="N")
    option("ignore_lock", action="store_true", default=None)
    g.add_argument("--resume", type=Path, metavar="CHECKPOINT",
                   help="continue from a checkpoint: last.safetensors exactly, any other one as fine-tuning")
    g.add_argument("--init", metavar="english|CHECKPOINT|none",
                   help="fine-tune a pretrained model on this text: 'english' (the shipped base) or a checkpoint; "
                        "'none' trains from scratch (charlstm run starts from 'english')")
    option("sample_every", type=int, metavar="N")
    option("sample_temperatures", type=_temperatures, metavar="T,T,...")
    option("sample_length", type=positive_int)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("prepared data and long runs (torchrun starts several processes: DDP)")
    g.add_argument("--data", type=Path, metavar="DATA_DIR",
                   help="train on a folder written by charlstm prepare (memory-mapped; instead of --text)")
    option("val_chars", type=int, metavar="N")
    option("eval_every", type=int, metavar="STEPS")
    option("save_every", type=int, metavar="STEPS")
    option("max_steps", type=int, metavar="N")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(text: str) -> str:
    """Shell-typed escapes, so that --stop "\\n\\n" means two newlines."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _add_generate_args(p: argparse.ArgumentParser, with_checkpoint: bool = True) -> None:
    if with_checkpoint:
        p.add_argument("checkpoint", type=Path)
    g = p.add_argument_group("generation")
    g.add_argument("--length", type=int, default=1000, help="characters to generate per sample (default 1000)")
    g.add_argument("--prime", help="start from this text instead of a random training window")
    g.add_argument("--prime-file", type=Path, metavar="FILE",
                   help="start from the text of this file (UTF-8), e.g. a chapter to continue")
    g.add_argument("--prime-unknown", choices=["error", "skip"], default="error",
                   help="prime characters the model does not know: stop with an error naming them, or skip them")
    g.add_argument("--temperature", type=_temperatures, default=[0.0], metavar="T[,T...]",
                   help="0 = greedy argmax (the tutorial); several, e.g. 0.2,0.5,1.0, print one sample "
                        "per temperature (the Keras example's diversity report)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="sample only among the k likeliest characters (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample only among the likeliest characters holding this probability mass (1 = off)")
    g.add_argument("--num-samples", type=positive_int, default=1, metavar="N",
                   help="samples per temperature, generated together as one batch")
    g.add_argument("--stop", action="append", type=_unescape, default=[], metavar="TEXT",
                   help="end a sample where this text appears, e.g. '\\n\\n' (repeatable; not printed)")
    g.add_argument("--mode", choices=MODES, default="auto",
                   help="stateful: prime once, one step per character; window: the tutorial's re-run of the "
                        "last window per character; auto: window for window-trained models")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="stateful step path: native (C kernel compiled on first use), torch, module; auto picks")
    g.add_argument("--sample-seed", type=int, dest="gen_seed", metavar="N",
                   help="seed for choosing the seed window and sampling; sample i of --num-samples uses N+i")
    if with_checkpoint:
        g.add_argument("--seed", type=int, dest="gen_seed", metavar="N", help="same as --sample-seed")
        g.add_argument("--adapt-to-prime", action="store_true",
                       help="read the prime with dynamic evaluation's weight updates first, so that the text "
                            "leans to its names and manner (worth it for a prime of thousands of characters)")
        g.add_argument("--device", default="cpu")
        g.add_argument("--precision", choices=STEP_PRECISIONS, default="fp32",
                       help="stateful step arithmetic: fp32 (exact, default) or bf16 (bf16 weights and "
                            "products, fp32 sums and state; faster; see the README for how close)")
        g.add_argument("--threads", type=positive_int,
                       help="CPU threads for PyTorch and for the native step, which they share by rows or by "
                            "panels as timed fastest (default: PyTorch's)")


def build_parser() -> argparse.ArgumentParser:
    parser, sub = new_parser()

    p = sub.add_parser("train", help="train a model on a text")
    _add_corpus_args(p)
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    add_prepare_command(sub)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    _add_generate_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="train on the default book, then generate (the quick start)")
    _add_corpus_args(p)
    _add_train_args(p)
    _add_generate_args(p, with_checkpoint=False)
    # The quick start samples at a moderate temperature: greedy decoding (generate's default, as in
    # the tutorial) loops on a model trained for minutes.
    # It fine-tunes the shipped English base: measured better than training from scratch at every
    # budget here (README, "Better text from a small book").
    p.set_defaults(func=cmd_run, time_budget=150.0, temperature=[0.6], init="english")

    p = sub.add_parser("evaluate", help="nats/char and bits/char of a checkpoint on a text, beside compressors")
    p.add_argument("checkpoint", type=Path)
    _add_corpus_args(p)
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="score only this last share of the text, the rest read as context (as training's "
                        "validation does); 0 = the whole text")
    p.add_argument("--unknown", choices=["error", "skip"], default="error",
                   help="characters the model does not know: stop with an error, or skip them")
    p.add_argument("--dynamic", action="store_true",
                   help="also score with dynamic evaluation: the weights adapt to the text already read")
    defaults = DynamicConfig()
    p.add_argument("--dynamic-lr", type=_step_sizes, default=list(defaults.step_sizes), metavar="LR[,LR...]",
                   help="RMS-normalised step sizes, one adapting copy each, their predictions mixed "
                        f"(default {','.join(f'{lr:g}' for lr in defaults.step_sizes)})")
    p.add_argument("--dynamic-static", action=argparse.BooleanOptionalAction, default=defaults.with_static,
                   help="mix the unadapted model's predictions in too")
    p.add_argument("--dynamic-context", type=int, default=defaults.context_chars, metavar="CHARS",
                   help="read and adapt to at most this much of the text before the scored part first "
                        "(with --val-fraction; 0 = adapt to the scored text only)")
    p.add_argument("--dynamic-segment", type=positive_int, default=defaults.segment,
                   help="characters scored between its updates")
    p.add_argument("--dynamic-decay", type=float, default=defaults.decay,
                   help="share of the way back to the original weights after each update")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="what a checkpoint holds")
    p.add_argument("checkpoint", type=Path)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("import-keras", help="convert a Keras checkpoint (the tutorial's .hdf5) to charlstm")
    _add_import_keras_args(p)
    p.set_defaults(func=cmd_import_keras)

    p = sub.add_parser("serve", help="serve checkpoints over HTTP: OpenAI-style API and a page (pip install "
                                     "'charlstm[serve]')")
    _add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("plot", help="PNG of training and validation loss per epoch of a run")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the training output folder (holds metrics.jsonl)")
    p.add_argument("-o", "--output", type=Path, help="PNG file (default RUN_DIR/loss.png)")
    p.set_defaults(func=cmd_plot)
    return parser


SERVE_LIMITS = (  # ServeConfig field, type, what it bounds
    ("max_length", positive_int, "default and ceiling of max_tokens, in characters"),
    ("max_concurrent", positive_int, "streams generated together per model"),
    ("max_queue", int, "streams waiting for a place; beyond that 429"),
    ("max_prompt", positive_int, "characters per prompt"),
    ("max_body", positive_int, "bytes per request body"),
    ("max_choices", positive_int, "n x prompts per request"),
    ("max_stop", positive_int, "stop strings per request"),
    ("max_logprobs", int, "alternatives per character in logprobs"),
    ("max_score_chars", positive_int, "characters per /v1/score text"),
    ("request_timeout", float, "seconds per request"),
)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from .serve import ServeConfig

    d = ServeConfig()
    p.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT|DIR",
                   help="checkpoint files, or folders whose *.safetensors are all served (named by file stem)")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("CHARLSTM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ routes (default: env CHARLSTM_API_KEY)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (repeatable; default: none)")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend, help="step path (as for generate)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for PyTorch and the native kernel")
    g = p.add_argument_group("limits")
    for name, kind, text in SERVE_LIMITS:
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                       help=f"{text} (default {getattr(d, name)})")



def _add_import_keras_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("keras_file", type=Path, metavar="FILE",
                   help="Keras .hdf5/.h5 model or weights file, Keras 3 .weights.h5 or .keras")
    p.add_argument("--text", type=Path, required=True, metavar="FILE",
                   help="the text the model was trained on (its vocabulary is rebuilt from it)")
    p.add_argument("-o", "--output", type=Path,
                   help="checkpoint to write (default: FILE's name with .safetensors, in this folder)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing the stored seed windows")
    p.add_argument("--no-check", action="store_true",
                   help="skip scoring a piece of the text (which refuses texts the model predicts worse than chance)")
    g = p.add_argument_group("reading the text as the training script did (default: UTF-8, a leading BOM "
                             "dropped, line ends kept, lowercased)")
    g.add_argument("--keep-case", action="store_true", help="the script did not lowercase the text")
    g.add_argument("--keep-bom", action="store_true", help="a leading byte-order mark counted as a character")
    g.add_argument("--universal-newlines", action="store_true", help="CRLF and CR were read as LF")
    g.add_argument("--bytes", action="store_true", help="one character per byte (Python 2)")
    add_encoding_arg(g)
    g = p.add_argument_group("what a weights-only file does not say (a full-model file's config wins "
                             "unless these are given)")
    g.add_argument("--window", type=positive_int, help="input length in characters (default 100)")
    g.add_argument("--activation", choices=KERAS_ACTIVATIONS, help="LSTM activation (default tanh)")
    g.add_argument("--recurrent-activation", choices=KERAS_ACTIVATIONS,
                   help="LSTM gate activation (default: that of the file's Keras version)")


# ----------------------------------------------------------------------- commands


def corpus_from_args(args: argparse.Namespace) -> Corpus:
    norm = Normalization(lowercase=not args.keep_case, strip_punctuation=args.strip_punctuation)
    if args.text and args.gutenberg is not None:
        raise CharLSTMError("give either --text or --gutenberg, not both")
    if args.text:
        return Corpus.from_files(args.text, norm, encoding=args.encoding)
    return Corpus.gutenberg(DEFAULT_BOOK if args.gutenberg is None else args.gutenberg, norm, mirror=args.mirror,
                            cache_dir=args.cache_dir, offline=args.offline, encoding=args.encoding)


def prepare_training(args: argparse.Namespace) -> dict:
    """Everything that can be checked before the text is read: every option's range, the
    checkpoint template, the output folder (created, proven writable), and for ``run`` the
    generation options. Returns the training overrides."""
    overrides = {name: value for name, value in vars(args).items() if name in OPTION_NAMES}
    if args.resume is None and args.init is None:
        # validates both configs with these values (the head's depend on the vocabulary: later)
        preset_configs(args.preset, 2, **{k: v for k, v in overrides.items() if k not in ("head", "head_cutoffs")})
    else:
        check_seed(args.seed)
        check_threads(args.threads)
    if hasattr(args, "temperature"):  # charlstm run generates afterwards
        check_generation_args(args)
    if args.output_dir is not None or args.resume is None:
        check_output_dir(args.output_dir or "checkpoints")
    return overrides


def check_generation_args(args: argparse.Namespace) -> None:
    """The generation options, before a model is loaded or trained (a batch is one allocation)."""
    check_int("length", args.length, 0, MAX_LENGTH)
    streams = len(args.temperature) * args.num_samples
    if streams > MAX_STREAMS:
        raise CharLSTMError(f"{len(args.temperature)} temperatures x --num-samples {args.num_samples} is "
                            f"{streams:,} streams; at most {MAX_STREAMS} are generated at once")
    for temperature in args.temperature:
        SamplingConfig(temperature, args.top_k, args.top_p).validate()
    if any(not stop for stop in args.stop):
        raise CharLSTMError("--stop must not be empty")
    check_seed(args.gen_seed, "seed")
    check_threads(getattr(args, "threads", None), allow_zero=False)
    if args.prime_file is not None:
        if args.prime is not None:
            raise CharLSTMError("give --prime or --prime-file, not both")
        args.prime = read_text_file(args.prime_file).lstrip("\ufeff").replace("\r\n", "\n")
        if len(args.prime) > MAX_PRIME_CHARS:
            raise CharLSTMError(f"--prime-file: {len(args.prime):,} characters; a prime may have at most "
                                f"{MAX_PRIME_CHARS:,}")
    if getattr(args, "adapt_to_prime", False) and args.prime is None:
        raise CharLSTMError("--adapt-to-prime needs a prime to read: --prime TEXT or --prime-file FILE")


def _train(args: argparse.Namespace):
    if args.init == "none":
        args.init = None
    prepare_training(args)
    if args.init is not None:
        resolve_init(args.init)  # a missing model is reported before the text is read
    data, resume = getattr(args, "data", None), None
    if data is not None:
        if args.text or args.gutenberg is not None:
            raise CharLSTMError("give either --data DIR or a text (--text/--gutenberg), not both")
        data = PreparedData.open(data)  # a bad folder is reported before any process group forms
    if args.resume is not None:
        resume = checkpoint.load(args.resume)
        if data is None:  # read the text the way the checkpoint's text was read
            norm = resume.normalization
            args.keep_case, args.strip_punctuation = not norm.lowercase, norm.strip_punctuation
    corpus = corpus_from_args(args) if data is None else None
    overrides = {name: value for name, value in vars(args).items() if name in OPTION_NAMES}
    dist = Distributed.from_env(args.device or "auto")
    try:
        result = fit(corpus, args.preset, progress=not args.no_progress, resume=resume, init=args.init,
                     data=data, dist=dist, **overrides)
    finally:
        dist.close()
    if result.best_path and dist.is_main:
        print(f"best checkpoint: {result.best_path}")
    return result


def _exit_status(result) -> int:
    if not result.interrupted:
        return 0
    return EXIT_TERMINATED if result.stop_signal == signal.SIGTERM else EXIT_INTERRUPTED


def cmd_train(args: argparse.Namespace) -> int:
    return _exit_status(_train(args))


def cmd_run(args: argparse.Namespace) -> int:
    result = _train(args)
    if result.best_path is None:
        raise CharLSTMError("training stopped before the first checkpoint; nothing to generate from")
    _print_generation(Generator(result.trained, device=result.trained.model.head.weight.device,
                                backend=args.backend), args)
    return _exit_status(result)


def cmd_generate(args: argparse.Namespace) -> int:
    check_generation_args(args)
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    trained = checkpoint.load(args.checkpoint, device=args.device)
    gen = Generator(trained, device=args.device, backend=args.backend, precision=args.precision)
    if args.adapt_to_prime:
        started = time.perf_counter()
        nats = gen.adapt(args.prime, unknown=args.prime_unknown)
        print(f"adapted to the prime's {len(args.prime):,} characters in {time.perf_counter() - started:.1f} s "
              f"(read at {nats:.4f} nats/char)", file=sys.stderr)
    _print_generation(gen, args)
    return 0


def _print_generation(gen: Generator, args: argparse.Namespace) -> None:
    """One sample streams as it is produced; several are one batch, printed one after another."""
    prime = args.prime if args.prime is not None else gen.random_seed_text(args.gen_seed)
    given_seed = args.gen_seed is not None
    base_seed = args.gen_seed if given_seed else random.SystemRandom().randrange(2**31)
    runs = [(t, i) for t in args.temperature for i in range(args.num_samples)]
    samplings = [SamplingConfig(t, args.top_k, args.top_p) for t, _ in runs]
    seeds = [base_seed + i for _, i in runs]
    options = dict(mode=args.mode, prime_unknown=args.prime_unknown, stop=args.stop)
    if len(runs) == 1:
        chars = gen.stream(prime, args.length, sampling=samplings[0], seed=seeds[0], **options)
        first = next(chars, "")  # validates the options before anything is printed
        _print_seed(prime)
        _write_flushed(first)
        for ch in chars:
            _write_flushed(ch)
    else:
        texts = gen.generate_batch(prime, args.length, samplings, seeds, **options)
        _print_seed(prime)
        for (temperature, index), seed, text in zip(runs, seeds, texts):
            label = f"----- temperature: {temperature:g}"
            if args.num_samples > 1:
                label += f", sample {index + 1}"
            if temperature > 0:
                label += f" (--seed {seed})"
            print(f"\n{label}")
            print(text)
    print("\nDone.")


def _print_seed(prime: str) -> None:
    print("Seed:")
    shown = prime if len(prime) <= SHOWN_PRIME_CHARS else "..." + prime[-SHOWN_PRIME_CHARS:]
    print(f'"{shown}"')


def _write_flushed(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_evaluate(args: argparse.Namespace) -> int:
    dynamic = DynamicConfig(step_sizes=tuple(args.dynamic_lr), segment=args.dynamic_segment, decay=args.dynamic_decay,
                            with_static=args.dynamic_static, context_chars=args.dynamic_context)
    dynamic.validate()
    check_threads(args.threads, allow_zero=False)
    check_float("val_fraction", args.val_fraction, 0.0, 1.0, high_open=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    trained = checkpoint.load(args.checkpoint)
    norm = trained.normalization
    args.keep_case, args.strip_punctuation = not norm.lowercase, norm.strip_punctuation
    corpus = corpus_from_args(args)
    ids = trained.vocab.encode(corpus.text, unknown=args.unknown)
    context, scored = split_train_val(ids, args.val_fraction) if args.val_fraction else (ids[:0], ids)
    _check_scorable(trained, context, scored, args)
    score = score_text(trained.model, trained.vocab, context, scored)
    where = f"the last {args.val_fraction:.0%} of the text" if args.val_fraction else "the whole text"
    print(f"scored: {score.characters:,} characters ({where})")
    for line in score.lines():
        print(line)
    if args.dynamic:
        result = dynamic_evaluate(trained.model, scored, context=context, config=dynamic)
        gain = 1 - result.nats_per_char / score.nats
        print(f"static: {score.nats:.4f} nats/char = {score.bits:.4f} bits/char in {score.seconds:.1f} s")
        print(f"dynamic: {result.nats_per_char:.4f} nats/char = {result.nats_per_char / LN2:.4f} bits/char "
              f"in {result.seconds:.1f} s ({result.seconds / max(score.seconds, 1e-9):.1f}x the static time; "
              f"{dynamic.describe()}; {result.what_was_read_first()}): "
              f"{gain:.1%} fewer nats/char than static")
    return 0


def _check_scorable(trained: checkpoint.TrainedModel, context, scored, args: argparse.Namespace) -> None:
    """A score needs characters to score: an empty selection would report 0 nats/char."""
    window = trained.config.window if trained.config.target == "last" else 1
    available = len(scored) - max(0, window - len(context))
    if available < 1:
        what = (f"--val-fraction {args.val_fraction:g} selects {len(scored)} characters"
                if args.val_fraction else f"the text has {len(scored)} characters the model knows")
        need = f" (a window model needs more than its window of {window})" if window > 1 else ""
        raise CharLSTMError(f"nothing to score: {what}{need}")


def cmd_info(args: argparse.Namespace) -> int:
    trained = checkpoint.load(args.checkpoint)
    for line in trained.info_lines(args.checkpoint):
        print(line)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeConfig, find_checkpoints, run_server

    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, cors_origins=tuple(args.cors_origin),
                         backend=args.backend, **{name: getattr(args, name) for name, _, _ in SERVE_LIMITS})
    config.validate()
    files = find_checkpoints(args.checkpoints)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_server(files, config)


def cmd_plot(args: argparse.Namespace) -> int:
    print(f"wrote {plot_run(args.run_dir, args.output)}")  # the name really written (.png added, say)
    return 0


def cmd_import_keras(args: argparse.Namespace) -> int:
    check_encoding(args.encoding)
    reading = TextReading(lowercase=not args.keep_case, keep_bom=args.keep_bom,
                          universal_newlines=args.universal_newlines, as_bytes=args.bytes, encoding=args.encoding)
    options = ImportOptions(reading=reading, window=args.window, activation=args.activation,
                            recurrent_activation=args.recurrent_activation, seed=args.seed,
                            check_chars=0 if args.no_check else CHECK_CHARS)
    output = check_output_file(args.output if args.output is not None
                               else Path(keras_stem(args.keras_file.name) + checkpoint.SUFFIX), "import-keras -o")
    result = import_keras(args.keras_file, args.text, options)
    checkpoint.save(output, result.trained)
    print(result.description)
    for note in result.notes:
        print(f"note: {note}")
    print(f"vocabulary: {len(result.trained.vocab)} characters of {args.text} ({reading.describe()})")
    if result.check_loss is not None:
        stated = result.trained.training.loss
        hint = f" (the file name says loss {stated})" if stated is not None else ""
        print(f"check: {result.check_loss:.4f} nats/char on {result.check_chars} characters of the text{hint}")
    print(f"wrote {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: one line on stderr and status 2 for anything a user can cause,
    130 after Ctrl-C, 143 after SIGTERM; never a traceback."""
    return run_command(build_parser, argv)
