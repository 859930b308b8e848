"""The ``charlstm`` command's entry point and the parts of the CLI that need no PyTorch.

``charlstm prepare`` is parsed and run from here without importing torch (about 1.5 s of
start-up, more than prepare's own work on a 126 MB folder); every other command goes on to
``cli``, which builds the full parser with this module's prepare options and error handling.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from .corpus import MIRROR_ENV, Normalization
from .errors import CharLSTMError
from .prepare import PrepareConfig, prepare

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143   # 128 + SIGTERM, what a shell reports for a terminated job

PREPARE_HELP = "files, folders or books -> memory-mapped ids for train --data"


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training (which handles it like Ctrl-C): stop now, quietly."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line, like every other error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def new_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The top-level parser and its subcommand list, still empty."""
    parser = _Parser(prog="charlstm", description="Character-level LSTM language models.")
    return parser, parser.add_subparsers(dest="command", required=True, parser_class=_Parser)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def add_encoding_arg(g) -> None:
    g.add_argument("--encoding", default="utf-8", metavar="NAME",
                   help="the text files' encoding (default utf-8; e.g. cp1252, latin-1, utf-16, gb18030)")


# ----------------------------------------------------------------------- charlstm prepare


def add_prepare_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help=PREPARE_HELP)
    _add_prepare_args(p)
    p.set_defaults(func=cmd_prepare)


def _add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="text files, folders (searched recursively, see --glob) or - for stdin")
    p.add_argument("-o", "--output-dir", type=Path, required=True, metavar="DATA_DIR",
                   help="folder for train.npy, val.npy, vocab.json and manifest.json")
    p.add_argument("--glob", default="*.txt", help="file names to take from folders (default *.txt)")
    g = p.add_argument_group("text")
    g.add_argument("--gutenberg", type=int, action="append", default=[], metavar="ID",
                   help="add Project Gutenberg book ID (repeatable)")
    g.add_argument("--mirror", metavar="DIR|URL", help=f"offline copy of Gutenberg books; env {MIRROR_ENV}")
    g.add_argument("--cache-dir", type=Path, help="where downloaded books are kept")
    g.add_argument("--offline", action="store_true", help="never download; use the cache or mirror")
    g.add_argument("--keep-case", action="store_true", help="do not lowercase the text")
    g.add_argument("--strip-punctuation", action="store_true",
                   help="keep only letters, digits, marks, spaces and newlines")
    g.add_argument("--keep-gutenberg-boilerplate", action="store_true",
                   help="do not cut Gutenberg headers and footers")
    add_encoding_arg(g)
    g = p.add_argument_group("split and vocabulary")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="the last share of every document held out for validation (default 0.1)")
    g.add_argument("--min-count", type=positive_int, default=1, metavar="N",
                   help="characters seen fewer times become one unknown symbol (U+FFFD)")
    g.add_argument("--max-vocab", type=positive_int, metavar="N",
                   help="keep at most N symbols, the most frequent; the rest become the unknown symbol")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="processes for corpora of many files (default: up to 2, one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_prepare(args: argparse.Namespace) -> int:
    norm = Normalization(lowercase=not args.keep_case, strip_punctuation=args.strip_punctuation,
                         strip_gutenberg=not args.keep_gutenberg_boilerplate)
    config = PrepareConfig(inputs=tuple(args.inputs), output_dir=args.output_dir, gutenberg=tuple(args.gutenberg),
                           glob=args.glob, normalization=norm, encoding=args.encoding,
                           val_fraction=args.val_fraction, min_count=args.min_count, max_vocab=args.max_vocab,
                           mirror=args.mirror, cache_dir=args.cache_dir, offline=args.offline,
                           workers=args.workers or 0)
    result = prepare(config, progress=not args.no_progress)
    for line in result.summary_lines():
        print(line)
    return 0


def _prepare_only_parser() -> argparse.ArgumentParser:
    parser, sub = new_parser()
    add_prepare_command(sub)
    return parser


# ----------------------------------------------------------------------- running a command


def main(argv: list[str] | None = None) -> int:
    """``charlstm``: prepare without PyTorch, everything else through ``cli.main``."""
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["prepare"]:
        return run_command(_prepare_only_parser, argv)
    from .cli import main as full_main  # imports torch, still with the quiet Ctrl-C of start-up

    return full_main(argv)


def run_command(build_parser: Callable[[], argparse.ArgumentParser], argv: list[str] | None) -> int:
    """Parse and run one command: one line on stderr and status 2 for anything a user can
    cause, 130 after Ctrl-C, 143 after SIGTERM; never a traceback."""
    previous = _prepare_process()
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()
        return code
    except CharLSTMError as err:
        return _fail(str(err))
    except Terminated:
        print("\nterminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (| head): nothing left to say
        _silence_stdout()
        return 0
    except MemoryError:
        return _fail("out of memory: try a smaller model, batch or --num-samples")
    except OSError as err:
        _silence_stdout()
        where = f"{err.filename}: " if err.filename else "writing the output: " if err.errno in _WRITE_ERRORS else ""
        return _fail(f"{where}{err.strerror or err}")
    except RuntimeError as err:
        if "alloc" in str(err).lower() or "out of memory" in str(err).lower():
            return _fail(f"out of memory ({str(err).splitlines()[0][:160]})")
        raise
    finally:
        for signum, handler in previous.items():  # main() called from Python leaves no trace
            signal.signal(signum, handler)


_WRITE_ERRORS = (errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT, errno.EPIPE)


def _fail(message: str) -> int:
    print(f"charlstm: error: {' '.join(message.split(chr(10)))}", file=sys.stderr)
    return EXIT_USAGE


def _prepare_process() -> dict:
    """Streams that cannot fail on a character (a C locale or PYTHONIOENCODING=ascii escapes
    what it cannot encode), a closed stdout treated as /dev/null, SIGTERM as a quiet stop."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    if previous[signal.SIGINT] == signal.SIG_DFL:  # __init__ made start-up quiet; now Ctrl-C is handled
        previous[signal.SIGINT] = signal.default_int_handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    return {k: v for k, v in previous.items() if v is not None}


def _terminate(signum, frame):
    raise Terminated


def _silence_stdout() -> None:
    """After a failed write, point stdout at /dev/null so the exit flush fails no more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
