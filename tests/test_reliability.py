"""Regression tests for issue 15's defects 1-9 and the crash machinery: each case a user hit is
now a one-line error with exit status 2, a refusal before any work, or correct behaviour."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import crashes
from charlstm import checkpoint, fileio
from charlstm.cli import main
from charlstm.errors import CharLSTMError
from charlstm.train import fit
from charlstm.corpus import Corpus

TINY = ["--units", "16", "--layers", "1", "--embedding-dim", "8", "--batch-size", "4", "--bptt", "20",
        "--no-progress", "--seed", "1", "--threads", "1", "--precision", "fp32"]


def one_line_error(capsys, argv, *fragments) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert err.startswith("charlstm: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_text):
    out = tmp_path_factory.mktemp("tiny-run")
    assert main(["train", "--text", str(small_text), "-o", str(out), "--epochs", "2", *TINY]) == 0
    return out


def _device_node(path, minor: int = 3):
    """A character device made in a tmp folder (the machine's own /dev is never touched)."""
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    return path


# ----------------------------------------------------------------- 1. overwriting devices and folders


def test_import_keras_never_replaces_a_device_or_folder(tmp_path, capsys, keras_checkpoint, keras_text):
    node = _device_node(tmp_path / "null")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target, fragment in ((node, "not a regular file"), (fifo, "not a regular file"),
                             (tmp_path, "is a folder"), ("", "not a file name"),
                             ("/proc/charlstm-test.safetensors", "cannot write")):
        one_line_error(capsys, ["import-keras", keras_checkpoint, "--text", keras_text, "-o", target], fragment)
    assert stat.S_ISCHR(node.stat().st_mode) and stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_checkpoint_is_never_written_over_a_device(tmp_path):
    import hostile

    node = _device_node(tmp_path / "best.safetensors")
    with pytest.raises(CharLSTMError, match="not a regular file"):
        checkpoint.save(node, hostile.tiny_trained())
    assert stat.S_ISCHR(node.stat().st_mode)


def test_a_symlink_to_a_regular_file_is_written_through(tmp_path):
    import hostile

    real = tmp_path / "real.safetensors"
    real.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    checkpoint.save(link, hostile.tiny_trained())
    assert link.is_symlink() and checkpoint.load(real).vocab


# ----------------------------------------------------------------- 2. checked before the first step


@pytest.mark.parametrize("output, fragment", [
    ("FILE", "not a folder"), ("FILE/sub", "cannot write"), ("/proc/charlstm-x", "cannot write"),
    ("/sys/charlstm-x", "cannot write")])
def test_unusable_output_folders_are_refused_before_training(tmp_path, capsys, small_text, output, fragment):
    output = output.replace("FILE", str(small_text))
    err = one_line_error(capsys, ["train", "--text", small_text, "-o", output, *TINY], fragment)
    assert "Epoch" not in capsys.readouterr().out + err


@pytest.mark.parametrize("template, fragment", [
    ("{epoch:5000}", "at most 255"), ("x" * 300, "at most 255"), ("a/{epoch}", "plain file name"),
    ("{nope}", "checkpoint-template"), ("{epoch:q}", "checkpoint-template")])
def test_bad_templates_are_refused_before_training(tmp_path, capsys, small_text, template, fragment):
    one_line_error(capsys, ["train", "--text", small_text, "-o", tmp_path, "--checkpoint-template", template,
                            *TINY], fragment)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_one_distinct_character_trains(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("a" * 3000)
    assert main(["train", "--text", str(text), "-o", str(tmp_path / "out"), "--epochs", "1", *TINY]) == 0
    assert "bits/char" in capsys.readouterr().out


def test_run_checks_generation_options_before_training(tmp_path, capsys, small_text):
    one_line_error(capsys, ["run", "--text", small_text, "-o", tmp_path, "--top-p", "0", *TINY], "--top-p")
    one_line_error(capsys, ["run", "--text", small_text, "-o", tmp_path, "--temperature", "nan", *TINY],
                   "--temperature")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_huge_top_k_keeps_every_character(tiny_run, capsys):
    assert main(["generate", str(tiny_run / "best.safetensors"), "--top-k", str(10**20), "--temperature", "1",
                 "--length", "30", "--seed", "1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("Done.")


# ----------------------------------------------------------------- 3. threads and seeds


@pytest.mark.parametrize("argv, fragment", [
    (["--threads", "100000"], "--threads"), (["--threads", str(2**63)], "--threads"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**64)], "--seed")])
def test_threads_and_seeds_out_of_range(tmp_path, capsys, small_text, argv, fragment):
    one_line_error(capsys, ["train", "--text", small_text, "-o", tmp_path, *TINY, *argv], fragment)


def test_generate_threads_out_of_range(tiny_run, capsys):
    one_line_error(capsys, ["generate", tiny_run / "best.safetensors", "--threads", "100000"], "--threads")


# ----------------------------------------------------------------- 4. memory before range checks


def test_too_many_streams_are_refused_before_loading(tmp_path, capsys):
    # the checkpoint does not even exist: the option is refused first, without allocating a batch
    one_line_error(capsys, ["generate", tmp_path / "none.safetensors", "--num-samples", "10000000"], "4096")
    one_line_error(capsys, ["generate", tmp_path / "none.safetensors", "--num-samples", str(10**12)], "4096")


def test_a_model_too_big_for_memory_is_refused_before_allocating(tmp_path, capsys, small_text):
    one_line_error(capsys, ["train", "--text", small_text, "-o", tmp_path, "--units", "16384", "--layers", "8"],
                   "GiB of memory")


@pytest.mark.slow
def test_import_keras_with_a_huge_window_stays_in_bounded_memory(tmp_path, keras_checkpoint, keras_text):
    probe = ("import resource, sys; from charlstm.cli import main; code = main(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, "import-keras", str(keras_checkpoint), "--text",
                           str(keras_text), "--window", "100000", "-o", str(tmp_path / "w.safetensors")],
                          capture_output=True, text=True, env=crashes.child_env(), timeout=900)
    assert done.returncode == 0, done.stderr
    assert int(done.stderr.splitlines()[-1]) < 3 * 1024 * 1024  # KiB: under 3 GiB, not 105 GB
    assert checkpoint.load(tmp_path / "w.safetensors").config.window == 100000


# ----------------------------------------------------------------- 5. NaN


@pytest.mark.parametrize("option", ["--clip", "--weight-decay", "--lr", "--dropout", "--val-fraction",
                                    "--final-lr-fraction", "--time-budget"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_options_are_refused(tmp_path, capsys, small_text, option, value):
    one_line_error(capsys, ["train", "--text", small_text, "-o", tmp_path, *TINY, option, value], option)


def test_a_loss_turning_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, small_text):
    """The weights are poisoned after epoch 1 has been saved: epoch 2's first step must stop the run."""
    trainer_box = {}

    def log(line: str) -> None:
        if line.startswith("Epoch 01:") and "saving" in line:
            with torch.no_grad():
                for parameter in trainer_box["model"].parameters():
                    parameter.fill_(float("nan"))

    from charlstm.train import Trainer

    original = Trainer.__init__

    def remember(self, model, *args, **kwargs):
        trainer_box["model"] = model
        original(self, model, *args, **kwargs)

    Trainer.__init__ = remember
    try:
        with pytest.raises(CharLSTMError, match="loss became nan at epoch 2.*last good checkpoint is kept"):
            fit(Corpus.from_files(small_text), epochs=3, units=16, layers=1, embedding_dim=8, batch_size=4,
                bptt=20, output_dir=str(tmp_path), progress=False, log=log, threads=1, precision="fp32")
    finally:
        Trainer.__init__ = original
    best = checkpoint.load(tmp_path / "best.safetensors")
    assert all(torch.isfinite(p).all() for p in best.model.parameters())
    assert not list(tmp_path.glob("*nan*"))


# ----------------------------------------------------------------- 6. wrong answers


def test_evaluate_refuses_to_score_nothing(tmp_path, capsys, tiny_run):
    best = tiny_run / "best.safetensors"
    one_char = tmp_path / "one.txt"
    one_char.write_text("a")
    one_line_error(capsys, ["evaluate", best, "--text", one_char], "nothing to score")
    one_line_error(capsys, ["evaluate", best, "--text", one_char, "--val-fraction", "1e-9"], "nothing to score")
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("ЖЖЖЖ ЖЖЖ")
    one_line_error(capsys, ["evaluate", best, "--text", unknown, "--unknown", "skip"], "nothing to score")


def test_evaluate_a_text_shorter_than_a_window_model_needs(tmp_path, capsys, small_text):
    out = tmp_path / "win"
    assert main(["train", "--preset", "tutorial-small", "--text", str(small_text), "-o", str(out), "--epochs", "1",
                 "--units", "8", "--window", "50", "--batch-size", "64", "--no-progress", "--threads", "1"]) == 0
    short = tmp_path / "short.txt"
    short.write_text("alice was ")
    capsys.readouterr()
    one_line_error(capsys, ["evaluate", out / "best.safetensors", "--text", short], "window of 50")


def test_tiny_temperatures_sample_as_greedy(tiny_run, capsys):
    """1/1e-320 overflowed to inf and printed one character forever; now it is the argmax."""
    outputs = []
    for temperature in ("0", "1e-320", "5e-324"):
        assert main(["generate", str(tiny_run / "best.safetensors"), "--temperature", temperature,
                     "--length", "60", "--seed", "3"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]


def test_gutenberg_zero_is_not_book_eleven(tmp_path, capsys):
    one_line_error(capsys, ["train", "--gutenberg", "0", "--offline", "-o", tmp_path], "not a book number")


def test_nul_bytes_anywhere_are_refused(tmp_path, capsys):
    text = tmp_path / "nul.txt"
    text.write_bytes(b"a" * 100_000 + b"\x00" + b"b" * 100)
    one_line_error(capsys, ["train", "--text", text, "-o", tmp_path / "o"], "NUL byte at offset 100,000")


def test_plot_writes_and_names_the_real_file(tiny_run, tmp_path, capsys):
    folder = tmp_path / "plots"
    folder.mkdir()
    assert main(["plot", str(tiny_run), "-o", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {folder / 'loss.png'}" and (folder / "loss.png").is_file()
    assert main(["plot", str(tiny_run), "-o", str(tmp_path / "curve")]) == 0
    assert capsys.readouterr().out.strip().endswith("curve.png") and (tmp_path / "curve.png").is_file()
    one_line_error(capsys, ["plot", tiny_run, "-o", tmp_path / "x.xyz"], ".png")
    one_line_error(capsys, ["plot", tiny_run, "-o", "/proc/charlstm-x.png"], "cannot write")


@pytest.mark.parametrize("content", [b'{"epoch": "one", "loss": 1}\n', b'{"epoch": 1, "loss": "x"}\n', b"[1]\n",
                                     "é".encode("latin-1") + b"\n", b'{"epoch": 1}\n'])
def test_plot_odd_metrics_rows(tmp_path, capsys, content):
    (tmp_path / "metrics.jsonl").write_bytes(content)
    one_line_error(capsys, ["plot", tmp_path], "metrics")


# ----------------------------------------------------------------- 7. one line, never a traceback


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "foo", "", "meta", "xpu", "hpu"])
def test_unusable_devices(tiny_run, capsys, small_text, tmp_path, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        device = "cuda:99"
    one_line_error(capsys, ["generate", tiny_run / "best.safetensors", "--device", device], "--device")
    one_line_error(capsys, ["train", "--text", small_text, "-o", tmp_path, *TINY, "--device", device], "--device")


def test_full_output_device_is_one_line(tiny_run, capsys, monkeypatch):
    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys, "stdout", Full())
    code = main(["generate", str(tiny_run / "best.safetensors"), "--length", "20", "--seed", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and err.count("\n") == 1


def _run_cli(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "charlstm", *map(str, args)], env={**crashes.child_env(),
                          **kwargs.pop("env", {})}, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.slow
def test_closed_stdout_and_ascii_terminals(tmp_path, modern11):
    """A model that knows curly quotes prints under PYTHONIOENCODING=ascii and with stdout closed."""
    text = tmp_path / "quotes.txt"
    text.write_text(modern11.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    out = tmp_path / "run"
    done = _run_cli(["train", "--text", text, "-o", out, "--epochs", "1", *TINY])
    assert done.returncode == 0, done.stderr
    best = out / "best.safetensors"
    ascii_run = _run_cli(["generate", best, "--prime", "alice\u2019s", "--length", "40", "--temperature", "1",
                          "--seed", "2"], env={"PYTHONIOENCODING": "ascii", "LC_ALL": "C"})
    assert ascii_run.returncode == 0 and "alice\\u2019s" in ascii_run.stdout, ascii_run.stderr
    closed = subprocess.run([sys.executable, "-m", "charlstm", "generate", str(best), "--length", "20"],
                            env=crashes.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, timeout=600, preexec_fn=lambda: os.close(1))
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr


# ----------------------------------------------------------------- 8. signals, temporary files, metrics rows


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "charlstm", *map(str, args)], env=crashes.child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_signals_during_start_up_are_quiet(tmp_path, small_text):
    """Signals while torch loads (charlstm's code already runs, the command is not ready yet)."""
    for signum, expected in ((signal.SIGINT, (130, -signal.SIGINT)), (signal.SIGTERM, (143, -signal.SIGTERM))):
        for extra_delay in (0.0, 0.5):
            process = _start(["train", "--text", small_text, "-o", tmp_path / "o", *TINY])
            assert crashes.wait_for_torch(process.pid), "torch never loaded"
            time.sleep(extra_delay)
            process.send_signal(signum)
            _, err = process.communicate(timeout=300)
            assert process.returncode in expected and "Traceback" not in err, (signum, extra_delay, err)


@pytest.mark.slow
def test_sigterm_saves_last_and_exits_143(tmp_path, small_text):
    out = tmp_path / "o"
    process = _start(["train", "--text", small_text, "-o", out, *TINY, "--epochs", "1000"])
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, err = process.communicate(timeout=300)
    assert process.returncode == 143 and "Traceback" not in err, err
    assert "resume with --resume" in stdout
    resumed = checkpoint.load(out / "last.safetensors").training.resume
    assert resumed.position.epoch >= 2 and resumed.run_id


@pytest.mark.slow
def test_kill_9_and_resume_equals_the_uninterrupted_run(tmp_path, small_text):
    """Three kills (one aimed at a checkpoint write); metrics rows are not repeated, leftover
    temporary files are removed, and the validation losses equal the uninterrupted run's."""
    reference, seconds_per_epoch = crashes.reference_run(small_text, tmp_path / "reference", epochs=4)
    report = crashes.kill_loop(small_text, tmp_path / "killed", epochs=4, kills=3, seed=5,
                               during_write_share=0.34, max_delay=seconds_per_epoch, reference=reference)
    assert not report.errors, report.errors
    assert report.kills == 3 and report.stale_temporaries_left == 0
    assert report.trials >= 1 and report.trials_equal == report.trials  # exact: seeded CPU runs are deterministic
    assert report.losses == reference


# ----------------------------------------------------------------- 9. one training per output folder


def test_second_training_in_a_locked_folder_is_refused(tmp_path, capsys, small_text):
    holder = fileio.RunLock(tmp_path, "other-run").acquire()
    try:
        one_line_error(capsys, ["train", "--text", small_text, "-o", tmp_path, *TINY, "--epochs", "1"],
                       "another training is writing here", "other-run")
        assert main(["train", "--text", str(small_text), "-o", str(tmp_path), *TINY, "--epochs", "1",
                     "--ignore-lock"]) == 0
    finally:
        holder.release()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(len(row["run_id"]) == 12 for row in rows)


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    code = (f"import os, sys; sys.path.insert(0, {str(crashes.REPO / 'src')!r}); from charlstm.fileio import RunLock; "
            f"RunLock({str(tmp_path)!r}, 'doomed').acquire(); print('locked', flush=True); "
            "import time; time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    with pytest.raises(CharLSTMError, match="doomed"):
        fileio.RunLock(tmp_path, "mine").acquire()
    process.kill()
    process.wait()
    fileio.RunLock(tmp_path, "mine").acquire().release()


# ----------------------------------------------------------------- durable, bounded, and a full disk


def test_file_and_folder_are_synced_before_publishing(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", None)), real_replace(a, b))[1])
    fileio.atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert events == [("fsync", False), ("rename", None), ("fsync", True)]


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import hostile

    path = checkpoint.save(tmp_path / "last.safetensors", hostile.tiny_trained())
    before = path.read_bytes()
    written = []

    def fail_after(fd, chunk):
        if sum(written) + len(chunk) > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(chunk))
        return os.write(fd, chunk)

    monkeypatch.setattr(fileio, "write_chunk", fail_after)
    monkeypatch.setattr(fileio, "CHUNK", 256)
    with pytest.raises(CharLSTMError, match="No space left on device.*unchanged"):
        checkpoint.save(path, hostile.tiny_trained(units=32))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.safetensors.{dead.stdout.strip()}.tmp"
    stale.write_bytes(b"x" * 100)
    live = tmp_path / f".best.safetensors.{os.getpid() + 0}.tmp"
    live.write_bytes(b"mine")
    assert fileio.remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists() and not stale.exists()


def test_keep_bounds_the_improvement_files(tmp_path, small_text):
    lines = []
    result = fit(Corpus.from_files(small_text), epochs=5, units=16, layers=1, embedding_dim=8, batch_size=4,
                 bptt=20, output_dir=str(tmp_path), progress=False, log=lines.append, keep=2, threads=1,
                 monitor="loss", precision="fp32", lr=3e-3)
    improvements = sorted(tmp_path.glob("weights-improvement-*.safetensors"))
    saved = [line for line in lines if "saving" in line]
    assert len(saved) >= 3 and len(improvements) == 2
    assert sum("removed weights-improvement" in line for line in lines) == len(saved) - 2
    assert result.best_path in improvements and (tmp_path / "best.safetensors").is_file()


def test_presets_keep_policy():
    from charlstm.recipes import DEFAULT_KEEP, preset_configs

    assert preset_configs("default", 10)[1].keep == DEFAULT_KEEP > 0
    assert preset_configs("tutorial-small", 10)[1].keep == 0 == preset_configs("tutorial-large", 10)[1].keep
    assert math.isfinite(DEFAULT_KEEP)
