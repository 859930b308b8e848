"""The command line end to end, and every error a user can cause."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from charlstm import checkpoint
from charlstm.cli import build_parser, main
from charlstm.metrics import read_metrics
from charlstm.recipes import OPTION_NAMES
from charlstm.train import Trainer

TINY = ["--units", "32", "--window", "20", "--batch-size", "32", "--no-progress", "--seed", "1"]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, small_text):
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--preset", "tutorial-small", "--epochs", "2", "--text", str(small_text),
                 "-o", str(out), *TINY])
    assert code == 0
    return out


def test_train_names_checkpoints_like_keras_by_their_epoch_and_loss(trained_dir):
    rows = {row["epoch"]: row for row in read_metrics(trained_dir)}
    assert sorted(rows) == [1, 2]
    names = sorted(p.name for p in trained_dir.glob("weights-improvement-*.safetensors"))
    assert names and names[0].startswith("weights-improvement-01-")  # the first epoch always improves
    for name in names:
        epoch, loss = re.fullmatch(r"weights-improvement-(\d\d)-(\d\.\d{4})\.safetensors", name).groups()
        assert loss == f"{rows[int(epoch)]['loss']:.4f}"  # the tutorial's recipe monitors the training loss
    best = checkpoint.load(trained_dir / "best.safetensors").training
    assert f"weights-improvement-{best.epoch:02d}-" in names[-1]


def test_summary_lines_are_printed(tmp_path, small_text, capsys):
    assert main(["train", "--preset", "tutorial-small", "--epochs", "1", "--text", str(small_text),
                 "-o", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "Total Characters: 6000" in out and "Total Vocab: " in out
    assert "Total Patterns: 5380" in out  # 5400 training characters - window of 20


def test_large_preset_names_checkpoints_bigger(tmp_path, small_text):
    assert main(["train", "--preset", "tutorial-large", "--epochs", "1", "--text", str(small_text),
                 "-o", str(tmp_path), *TINY]) == 0
    assert list(tmp_path.glob("weights-improvement-01-*-bigger.safetensors"))


def test_generate_needs_only_the_checkpoint(trained_dir, small_text, capsys):
    ckpt = next(trained_dir.glob("weights-improvement-*.safetensors"))
    small_text.rename(small_text.with_suffix(".moved"))  # the corpus is gone
    try:
        assert main(["generate", str(ckpt), "--seed", "7"]) == 0
    finally:
        small_text.with_suffix(".moved").rename(small_text)
    out = capsys.readouterr().out
    seed_line, rest = out.split("\n", 2)[1], out.split("\n", 2)[2]
    assert out.startswith("Seed:\n") and seed_line.startswith('"')
    generated = rest.rsplit("\nDone.", 1)[0]
    assert len(generated) == 1000
    assert out.rstrip().endswith("Done.")


def test_seed_makes_generation_reproducible(trained_dir, capsys):
    ckpt = str(trained_dir / "best.safetensors")
    assert main(["generate", ckpt, "--seed", "3", "--temperature", "1.0", "--length", "200"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", ckpt, "--seed", "3", "--temperature", "1.0", "--length", "200"]) == 0
    assert capsys.readouterr().out == first
    assert main(["generate", ckpt, "--seed", "4", "--temperature", "1.0", "--length", "200"]) == 0
    assert capsys.readouterr().out != first


def test_prime_and_length(trained_dir, capsys):
    assert main(["generate", str(trained_dir / "best.safetensors"), "--prime", "Alice was", "--length", "50"]) == 0
    out = capsys.readouterr().out
    assert '"Alice was"' in out  # shown as given, fed lowercased like the training text
    assert len(out.split("\n", 2)[2].rsplit("\nDone.", 1)[0]) == 50


def test_ctrl_c_keeps_the_last_good_checkpoint(tmp_path, small_text, monkeypatch, capsys):
    calls = {"n": 0}
    original = Trainer.train_step

    def interrupt_in_second_epoch(self, *args):
        calls["n"] += 1
        if self.history:  # one epoch done and saved
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupt_in_second_epoch)
    code = main(["train", "--preset", "tutorial-small", "--epochs", "5", "--text", str(small_text),
                 "-o", str(tmp_path), *TINY])
    assert code == 130
    saved = list(tmp_path.glob("weights-improvement-01-*.safetensors"))
    assert len(saved) == 1 and checkpoint.load(saved[0]).training.epoch == 1
    assert not list(tmp_path.glob(".*.tmp"))
    assert "interrupted" in capsys.readouterr().out


def _exit_code(args: list[str]) -> int:
    """main()'s status; argparse's own usage errors leave through SystemExit."""
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "empty"),
    (b"\x00\x01\x02binary\x00", "binary"),
    (b"\xff\xfe\xfa bad", "UTF-8"),
    (b"too short for a window", "too short"),
])
def test_bad_text_files(tmp_path, capsys, content, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    assert main(["train", "--text", str(path), "-o", str(tmp_path / "o"), "--preset", "tutorial-small"]) == 2
    assert message in _error_line(capsys)


def test_prime_with_unknown_characters_names_them(trained_dir, capsys):
    assert main(["generate", str(trained_dir / "best.safetensors"), "--prime", "zebra ✓ §"]) == 2
    line = _error_line(capsys)
    assert "'✓'" in line and "'§'" in line


@pytest.mark.parametrize("write, message", [
    (None, "no such checkpoint"),
    (b"\x08\x00", "too short"),
    (b"just some text that is long enough to have a header length", "not a charlstm checkpoint"),
])
def test_bad_checkpoints(tmp_path, capsys, write, message):
    path = tmp_path / "m.safetensors"
    if write is not None:
        path.write_bytes(write)
    assert main(["generate", str(path)]) == 2
    assert message in _error_line(capsys)


def test_truncated_checkpoint(trained_dir, tmp_path, capsys):
    data = (trained_dir / "best.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    assert main(["info", str(cut)]) == 2
    assert "truncated" in _error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--dropout", "1.5"], "dropout"),
    (["--lr", "-1"], "--lr"),
    (["--val-fraction", "2"], "val-fraction"),
    (["--epochs", "0"], "positive"),
    (["--preset", "huge"], "invalid choice"),
    (["--time-budget", "-5"], "time-budget"),
])
def test_out_of_range_training_options(small_text, tmp_path, capsys, args, message):
    assert _exit_code(["train", "--text", str(small_text), "-o", str(tmp_path), "--no-progress", *args]) == 2
    assert message in _error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--length", "-3"], "length"),
    (["--mode", "magic"], "invalid choice"),
])
def test_out_of_range_generation_options(trained_dir, capsys, args, message):
    assert _exit_code(["generate", str(trained_dir / "best.safetensors"), *args]) == 2
    assert message in _error_line(capsys)


def test_console_script_runs_as_a_process(trained_dir):
    proc = subprocess.run([sys.executable, "-m", "charlstm", "info", str(trained_dir / "best.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "parameters:" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "charlstm", "generate", "missing.safetensors"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_run_trains_then_generates(tmp_path, small_text, capsys):
    code = main(["run", "--text", str(small_text), "-o", str(tmp_path), "--time-budget", "5", "--units", "32",
                 "--layers", "1", "--batch-size", "8", "--no-progress", "--seed", "1", "--length", "80", "--prime", "alice"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Total Vocab:" in out and "best checkpoint:" in out
    generated = out.split('Seed:\n"alice"\n', 1)[1].rsplit("\nDone.", 1)[0]
    assert len(generated) == 80


def test_training_options_are_the_config_fields():
    """Each config field is an option of the same name, and no other option goes unused."""
    given = vars(build_parser().parse_args(["train"]))
    assert OPTION_NAMES & given.keys() == OPTION_NAMES - {"activation", "recurrent_activation"}  # Keras imports'
    cli_only = {"command", "func", "preset", "resume", "init", "no_progress", "text", "gutenberg", "mirror",
                "cache_dir", "offline", "keep_case", "strip_punctuation", "encoding", "data"}
    assert given.keys() - OPTION_NAMES == cli_only
