"""Property-based fuzzing targets (issue 15, part 3), shared by ``tests/test_fuzz.py`` (a fast
profile) and ``benchmarks/reliability.py`` (10,000+ cases).

Each target takes values drawn by Hypothesis and returns an outcome class; the only classes
allowed are success and the documented one-line error (exit status 2 from the CLI, a
``CharLSTMError`` from the API). Anything else raises ``AssertionError``, which Hypothesis
shrinks to a minimal example.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections import Counter
from pathlib import Path

import torch
from hypothesis import strategies as st

from charlstm import checkpoint
from charlstm.checkpoint import TrainedModel
from charlstm.cli import build_parser, main
from charlstm.corpus import Corpus, Normalization
from charlstm.errors import CharLSTMError
from charlstm.generate import Generator, SamplingConfig
from charlstm.model import CharLSTM, ModelConfig
from charlstm.vocab import Vocab

OUTCOMES: Counter = Counter()
FOLDER = Path(tempfile.mkdtemp(prefix="charlstm-fuzz-"))
VOCAB_TEXT = "abcdefghijklmnopqrstuvwxyz .,'\n’“”"


def record(target: str, outcome: str) -> str:
    OUTCOMES[(target, outcome)] += 1
    return outcome


def tiny_model(target: str = "all") -> TrainedModel:
    vocab = Vocab.from_text(VOCAB_TEXT)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(vocab), units=16, embedding_dim=8, layers=1, target=target, window=12)
    return TrainedModel(CharLSTM(config).eval(), vocab, Normalization(), seed_windows=["alice was be"])


_MODEL = tiny_model()
_GENERATOR = Generator(_MODEL)
_CHECKPOINT = checkpoint.save(FOLDER / "tiny.safetensors", _MODEL)
_CHECKPOINT_BYTES = _CHECKPOINT.read_bytes()


# --------------------------------------------------------------------------- corpora


def corpus_bytes(data: bytes) -> str:
    """Arbitrary bytes as a text file: read, cleaned, encoded; decode(encode(text)) == text."""
    path = FOLDER / "corpus.txt"
    path.write_bytes(data)
    try:
        corpus = Corpus.from_files(path, Normalization(lowercase=False))
    except CharLSTMError as err:
        assert "\n" not in str(err) and str(path) in str(err), str(err)
        return record("corpus bytes", "refused")
    vocab = Vocab.from_text(corpus.text)
    ids = vocab.encode(corpus.text)
    assert vocab.decode(ids) == corpus.text
    assert len(ids) == len(corpus.text)
    return record("corpus bytes", "read")


# --------------------------------------------------------------------------- prime and stop strings


def prime_and_stops(prime: str, stops: list[str], temperature: float, skip_unknown: bool) -> str:
    """Arbitrary prime text and stop strings: text that contains no stop string, or a one-line error."""
    try:
        pieces = list(_GENERATOR.stream(prime, 24, sampling=SamplingConfig(temperature), seed=1,
                                        prime_unknown="skip" if skip_unknown else "error", stop=stops))
    except CharLSTMError as err:
        assert "\n" not in str(err), str(err)
        return record("prime and stop strings", "refused")
    text = "".join(pieces)
    assert len(text) <= 24
    assert not any(stop and stop in text for stop in stops), (text, stops)
    return record("prime and stop strings", "generated")


# --------------------------------------------------------------------------- CLI options


def _value_strategy() -> st.SearchStrategy[str]:
    numbers = st.one_of(st.integers(-2**70, 2**70).map(str),
                        st.floats(allow_nan=True, allow_infinity=True).map(repr),
                        st.sampled_from(["nan", "inf", "-inf", "-0", "0", "1e-320", "1e308", "0x10", "1_000",
                                         "", " ", "\x00", "1,2", "0.5,nan", "cuda", "meta", "xpu", "auto"]))
    return st.one_of(numbers, st.integers(0, 40).map(str), st.text(max_size=12))


def _options(command: str) -> list[tuple[str, bool]]:
    """(flag, takes a value) for every option of a subcommand: the parser is the one source."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    found = []
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            found.append((action.option_strings[-1], action.nargs != 0))
    return found


GENERATE_OPTIONS = _options("generate")
TRAIN_OPTIONS = _options("train")
SAFE_GENERATE = ["--length", "16", "--threads", "1"]  # given first; fuzzed values may override


@st.composite
def option_lists(draw, options: list[tuple[str, bool]]) -> list[str]:
    argv = []
    for flag, takes_value in draw(st.lists(st.sampled_from(options), max_size=5)):
        argv.append(flag)
        if takes_value:
            argv.append(draw(_value_strategy()))
    return argv


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def _classify_cli(target: str, argv: list[str], code: int, err: str) -> str:
    assert code in (0, 2), (argv, code, err)
    if code == 0:
        return record(target, "ran")
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("charlstm"), (argv, err)
    kind = "usage error" if "usage" in err or "(see --help)" in err else "one-line error"
    return record(target, kind)


def generate_options(argv: list[str]) -> str:
    """``charlstm generate tiny.safetensors`` with arbitrary options: it runs or refuses in one line."""
    full = ["generate", str(_CHECKPOINT), *SAFE_GENERATE, *_capped_lengths(argv)]
    code, _, err = _run_cli(full)
    return _classify_cli("generate options", full, code, err)


def _capped_lengths(argv: list[str], cap: int = 2000) -> list[str]:
    """Long but valid lengths (up to 10^7) are only slow, so they become ``cap``."""
    argv = list(argv)
    for index in range(len(argv) - 1):
        if argv[index] == "--length":
            try:
                if cap < int(argv[index + 1]) <= 10**7:
                    argv[index + 1] = str(cap)
            except ValueError:
                pass
    return argv


def train_options(argv: list[str], text: Path) -> str:
    """``charlstm train`` with arbitrary options, up to the point where training would start:
    everything the CLI checks before the first step runs (the preflight); nothing trains."""
    from charlstm.cli import prepare_training

    full = ["train", "--text", str(text), "-o", str(FOLDER / "train-out"), *argv]
    threads = torch.get_num_threads()
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                args = build_parser().parse_args(full)
                prepare_training(args)
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 2
            except CharLSTMError as error:
                print(f"charlstm: error: {error}", file=err)
                code = 2
    finally:
        torch.set_num_threads(threads)
    return _classify_cli("train options", full, code, err.getvalue())


# --------------------------------------------------------------------------- checkpoint bytes


@st.composite
def checkpoint_mutations(draw) -> bytes:
    """A real checkpoint with bytes changed, cut, or inserted; or arbitrary bytes."""
    data = bytearray(_CHECKPOINT_BYTES)
    kind = draw(st.sampled_from(["flip", "cut", "splice", "arbitrary", "header"]))
    if kind == "arbitrary":
        return draw(st.binary(max_size=4096))
    if kind == "cut":
        return bytes(data[:draw(st.integers(0, len(data)))])
    if kind == "header":  # the part a parser trusts most
        position = draw(st.integers(0, min(len(data) - 1, 2048)))
    else:
        position = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    insert = draw(st.binary(min_size=1, max_size=64))
    return bytes(data[:position] + insert + data[position + (len(insert) if kind == "header" else 0):])


def checkpoint_bytes(data: bytes) -> str:
    path = FOLDER / "fuzzed.safetensors"
    path.write_bytes(data)
    try:
        checkpoint.load(path)
    except CharLSTMError as err:
        assert "\n" not in str(err) and str(path) in str(err), str(err)
        return record("checkpoint bytes", "refused")
    return record("checkpoint bytes", "loaded")


def cleanup() -> None:
    import shutil

    shutil.rmtree(FOLDER, ignore_errors=True)


def describe(outcomes: Counter | None = None) -> list[tuple[str, str, int]]:
    outcomes = OUTCOMES if outcomes is None else outcomes
    return sorted((target, outcome, count) for (target, outcome), count in outcomes.items())



# --------------------------------------------------------------------------- profiles

from hypothesis import HealthCheck, settings  # noqa: E402

CI = settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def benchmark_settings(examples: int) -> settings:
    return settings(CI, max_examples=examples, derandomize=False)


def target_tests(text_file: Path) -> dict:
    """The fuzz targets as Hypothesis tests (the tests and the benchmark run these same ones)."""
    from hypothesis import given

    @given(st.binary(max_size=2048) | st.text(max_size=512).map(lambda t: t.encode("utf-8", "surrogatepass")))
    def fuzz_corpus(data):
        corpus_bytes(data)

    @given(st.text(max_size=40), st.lists(st.text(max_size=4), max_size=6),
           st.sampled_from([0.0, 0.5, 1.0]), st.booleans())
    def fuzz_prime(prime, stops, temperature, skip):
        prime_and_stops(prime, stops, temperature, skip)

    @given(option_lists(GENERATE_OPTIONS))
    def fuzz_generate_options(argv):
        generate_options(argv)

    @given(option_lists(TRAIN_OPTIONS))
    def fuzz_train_options(argv):
        train_options(argv, text_file)

    @given(checkpoint_mutations())
    def fuzz_checkpoint(data):
        checkpoint_bytes(data)

    return {"corpus bytes": fuzz_corpus, "prime and stop strings": fuzz_prime,
            "generate options": fuzz_generate_options, "train options": fuzz_train_options,
            "checkpoint bytes": fuzz_checkpoint}
