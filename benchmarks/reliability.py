"""Reliability, measured (issue 15): every figure of the README's "Reliability, measured" section.

    flock /tmp/charlstm-bench.lock env PYTHONPATH=src python benchmarks/reliability.py [--kills 50]

1. Crashes: a seeded CPU training run killed with SIGKILL ``--kills`` times at random moments
   (a share of the kills waits for a checkpoint's temporary file, so they land mid-write), each
   followed by ``--resume``; its per-epoch validation losses against the uninterrupted run's;
   work lost per kill; SIGTERM and start-up signals; a full disk (a small tmpfs where this
   process may mount one, else a writer that fails after N bytes); two trainings in one folder;
   disk use with ``--keep``.
2. Hostile files: crafted and truncated checkpoints, bit flips, Keras files, text inputs: how
   many were refused in one line naming the file, and the peak memory of refusing the ones whose
   headers claim terabytes.
3. Fuzzing: the Hypothesis targets of ``tests/fuzzing.py`` for ``--fuzz-cases`` cases in all,
   by outcome class.
4. The server: ``benchmarks/reliability_server.py``'s ``main()``.

The checks reuse the test suite's generators (``tests/crashes.py``, ``tests/hostile.py``,
``tests/fuzzing.py``), so the tests are small versions of exactly these runs.
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks"), str(REPO / "src")]

import crashes  # noqa: E402
import hostile  # noqa: E402
from machine_probe import cpu_name  # noqa: E402

SHARED = Path(os.environ.get("CHARLSTM_SHARED", REPO.parent / "shared"))


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(headers: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    print()


def training_text(folder: Path, chars: int) -> Path:
    from charlstm.corpus import Corpus

    path = folder / "alice-start.txt"
    path.write_text(Corpus.from_files(SHARED / "corpora" / "pg11.txt").text[:chars], encoding="utf-8")
    return path


# --------------------------------------------------------------------------- 1. crashes


def crash_section(work: Path, text: Path, kills: int, epochs: int) -> None:
    print("## 1. Crashes during training\n")
    reference, per_epoch = crashes.reference_run(text, work / "reference", epochs)
    started = time.monotonic()
    report = crashes.kill_loop(text, work / "killed", epochs, kills, seed=15, during_write_share=0.4,
                               max_delay=1.2 * per_epoch, reference=reference)
    lost = report.lost_seconds
    table(["kill -9 trials (seeded CPU run, %d epochs, %.1f s per epoch with start-up, 128 units)"
           % (epochs, per_epoch), "value"], [
        ["kills", report.kills],
        ["… of them while a checkpoint was being written (its temporary file existed)", report.kills_during_writes],
        ["runs started (first + resumes)", report.starts],
        ["resumes from last.safetensors that loaded and continued", f"{report.resumes_ok} of {report.resumes}"],
        ["errors or tracebacks", len(report.errors)],
        ["runs that reached the end through their kills, with every epoch's validation loss equal to the "
         "uninterrupted run's", f"{report.trials_equal} of {report.trials}"],
        ["work lost per kill: median / max seconds since the last save or the process start (start-up "
         "included; one epoch: %.1f s)" % per_epoch,
         f"{statistics.median(lost):.1f} / {max(lost):.1f}" if lost else "-"],
        ["temporary files left in the folder at the end", report.stale_temporaries_left],
        ["wall time of the trials", f"{time.monotonic() - started:.0f} s"],
    ])
    for error in report.errors[:5]:
        print(f"    error: {error}")
    signal_section(work, text)
    full_disk_section(work, text)
    lock_section(work, text)
    keep_section(work, text)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "charlstm", *map(str, args)], env=crashes.child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


TINY = ["--units", "32", "--layers", "1", "--embedding-dim", "8", "--batch-size", "8", "--bptt", "40",
        "--no-progress", "--seed", "1", "--threads", "1", "--precision", "fp32"]


def signal_section(work: Path, text: Path, trials: int = 4) -> None:
    rows = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(signum).name
        clean = saved = 0
        for trial in range(trials):
            out = work / f"sig-{name}-{trial}"
            process = _start(["train", "--text", text, "-o", out, *TINY, "--epochs", "1000"])
            deadline = time.monotonic() + 300
            while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3 * trial)
            process.send_signal(signum)
            _, err = process.communicate(timeout=300)
            expected = 143 if signum == signal.SIGTERM else 130
            clean += process.returncode == expected and "Traceback" not in err
            saved += (out / "last.safetensors").is_file()
        rows.append([f"{name} during training (exit {143 if signum == signal.SIGTERM else 130}, no traceback)",
                     f"{clean} of {trials}", f"{saved} of {trials}"])
        quiet = 0
        delays = (0.0, 0.1, 0.3, 0.6, 1.0, 1.5)
        for delay in delays:
            process = _start(["train", "--text", text, "-o", work / f"early-{name}", *TINY])
            crashes.wait_for_torch(process.pid)
            time.sleep(delay)
            process.send_signal(signum)
            _, err = process.communicate(timeout=300)
            quiet += "Traceback" not in err and process.returncode in (128 + signum, -signum)
        rows.append([f"{name} during start-up, 0-1.5 s after torch began loading (no traceback, status "
                     f"{128 + signum})", f"{quiet} of {len(delays)}", "-"])
    # a second signal stops at once
    out = work / "twice"
    process = _start(["train", "--text", text, "-o", out, *TINY, "--epochs", "1000"])
    while not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    rows.append(["SIGTERM twice (stops at once, no traceback)", "yes" if process.returncode in (130, 143)
                 and "Traceback" not in err else f"NO ({process.returncode})", "-"])
    table(["signal trials", "clean exits", "last.safetensors written"], rows)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return done.returncode == 0


def full_disk_section(work: Path, text: Path) -> None:
    """Train into a 1 MiB tmpfs: the checkpoints outgrow it within a few epochs."""
    from charlstm import checkpoint

    folder = work / "small-disk"
    mounted = _mount_tmpfs(folder, "1m")
    try:
        if mounted:
            done = subprocess.run([sys.executable, "-m", "charlstm", "train", "--text", str(text), "-o", str(folder),
                                   *TINY, "--units", "96", "--epochs", "20", "--keep", "0"],
                                  env=crashes.child_env(), capture_output=True, text=True, timeout=900)
            lines = done.stderr.strip().splitlines()
            loads = all(_loads(p) for p in folder.glob("*.safetensors"))
            temporaries = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
            how = "a 1 MiB tmpfs (mounted for this run)"
            rows = [["exit status", done.returncode], ["stderr lines", len(lines)],
                    ["the message", lines[-1][:110] if lines else "-"],
                    ["checkpoints left, all loading", f"{len(list(folder.glob('*.safetensors')))}, "
                                                      f"{'yes' if loads else 'NO'}"],
                    ["temporary files left", len(temporaries)]]
        else:
            how, rows = _failing_writer(work, checkpoint)
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True)
    table([f"full disk: {how}", "value"], rows)


def _loads(path: Path) -> bool:
    from charlstm import checkpoint
    from charlstm.errors import CharLSTMError

    try:
        checkpoint.load(path)
        return True
    except CharLSTMError:
        return False


def _failing_writer(work: Path, checkpoint) -> tuple[str, list]:
    from charlstm import fileio
    from charlstm.errors import CharLSTMError

    folder = work / "failing-writer"
    folder.mkdir()
    path = checkpoint.save(folder / "last.safetensors", hostile.tiny_trained())
    before = path.read_bytes()
    original = fileio.write_chunk
    refusals = 0
    for limit in (0, 100, 1000, 5000):
        written = [0]

        def fail_after(fd, chunk, limit=limit, written=written):
            if written[0] + len(chunk) > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            written[0] += len(chunk)
            return os.write(fd, chunk)

        fileio.write_chunk = fail_after
        try:
            checkpoint.save(path, hostile.tiny_trained(units=64))
        except CharLSTMError:
            refusals += 1
        finally:
            fileio.write_chunk = original
    intact = path.read_bytes() == before
    left = [p.name for p in folder.iterdir() if p.name != "last.safetensors"]
    return "a writer that fails after 0, 100, 1,000 and 5,000 bytes (no tmpfs could be mounted)", [
        ["writes refused in one line", f"{refusals} of 4"], ["previous checkpoint intact", intact],
        ["temporary files left", len(left)]]


def lock_section(work: Path, text: Path) -> None:
    out = work / "shared-folder"
    first = _start(["train", "--text", text, "-o", out, *TINY, "--epochs", "1000"])
    while not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "charlstm", "train", "--text", str(text), "-o", str(out), *TINY],
                            env=crashes.child_env(), capture_output=True, text=True, timeout=300)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    third = subprocess.run([sys.executable, "-m", "charlstm", "train", "--resume", str(out / "last.safetensors"),
                            "--text", str(text), "-o", str(out), "--epochs", "2", "--no-progress"],
                           env=crashes.child_env(), capture_output=True, text=True, timeout=600)
    import json

    run_ids = {json.loads(line).get("run_id") for line in (out / "metrics.jsonl").read_text().splitlines()}
    table(["two trainings, one -o folder", "value"], [
        ["second training while the first runs", f"exit {second.returncode}: {second.stderr.strip()[:100]}"],
        ["after kill -9 of the first, a resume in the folder", f"exit {third.returncode} (the lock died with it)"],
        ["run ids in metrics.jsonl", len(run_ids)],
    ])


def keep_section(work: Path, text: Path) -> None:
    rows = []
    for label, extra in (("default recipe (--keep 3)", []), ("--keep 0 (every file, the tutorial presets' way)",
                                                             ["--keep", "0"])):
        out = work / f"keep-{len(extra)}"
        done = subprocess.run([sys.executable, "-m", "charlstm", "train", "--text", str(text), "-o", str(out),
                               *TINY, "--units", "128", "--epochs", "12", "--monitor", "loss", *extra],
                              env=crashes.child_env(), capture_output=True, text=True, timeout=900)
        files = list(out.glob("*.safetensors"))
        improvements = [p for p in files if p.name.startswith("weights-improvement")]
        removed = done.stdout.count("removed weights-improvement")
        rows.append([label, len(improvements) + removed, len(improvements), removed,
                     f"{sum(p.stat().st_size for p in files) / 1e6:.1f} MB"])
    table(["12 epochs, 128 units", "improvement files written", "kept", "removed (logged)",
           "checkpoints on disk"], rows)


# --------------------------------------------------------------------------- 2. hostile files


def hostile_section(work: Path) -> None:
    from charlstm import checkpoint
    from charlstm.keras_import import import_keras

    print("## 2. Hostile and broken files\n")
    base = hostile.checkpoint_bytes(hostile.tiny_trained(with_resume=True))
    groups = {
        f"checkpoint truncated at every length (0-{len(base) - 1} bytes)": (hostile.truncations(base), "c"),
        "checkpoint with 2,000 random bit flips (one each)": (hostile.bit_flips(base, 2000, seed=2), "c"),
        "crafted checkpoints (container and metadata attacks)": (hostile.crafted_checkpoints(base), "c"),
        "Keras files (truncated, foreign, crafted HDF5)": (hostile.hostile_keras_files(
            (SHARED / "keras" / "weights-improvement-19-1.9465.hdf5").read_bytes()), "k"),
    }
    keras_text = SHARED / "keras" / "wonderland.txt"
    loaders = {"c": (checkpoint.load, "c.safetensors"), "k": (lambda p: import_keras(p, keras_text), "k.hdf5")}
    rows = []
    for label, (cases, kind) in groups.items():
        load, name = loaders[kind]
        outcomes = Counter()
        crashes_seen = []
        for case_label, data in cases:
            path = work / name
            path.write_bytes(data)
            outcome, message = hostile.load_outcome(load, path)
            outcomes[outcome] += 1
            if outcome == "crash":
                crashes_seen.append(f"{case_label}: {message[:120]}")
        rows.append([label, sum(outcomes.values()), outcomes["refused"], outcomes["loaded"], outcomes["crash"]])
        for line in crashes_seen[:5]:
            print(f"    CRASH {line}")
    rows.append(text_row(work))
    table(["files", "cases", "refused in one line naming the file", "loaded", "anything else"], rows)
    peak_memory(work, base)


def text_row(work: Path) -> list:
    from charlstm.cli import main
    import contextlib
    import io

    outcomes = Counter()
    for index, (label, data) in enumerate(hostile.hostile_texts()):
        path = work / f"text-{index}.txt"
        path.write_bytes(data)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(["train", "--text", str(path), "--units", "8", "--layers", "1", "--embedding-dim", "4",
                         "--batch-size", "2", "--bptt", "8", "--epochs", "1", "--no-progress", "--threads", "1",
                         "--time-budget", "5", "-o", str(work / f"text-out-{index}")])
        one_line = err.getvalue().count("\n") == 1 and err.getvalue().startswith("charlstm: error:")
        outcomes["trained" if code == 0 else "refused" if code == 2 and one_line else "crash"] += 1
    specials = _special_inputs(work)
    outcomes["refused"] += specials
    total = sum(outcomes.values())
    return ["text inputs (bytes, categories, NUL, surrogates, 1 byte; folder, FIFO, symlink loop, "
            "over-long name, missing)", total, outcomes["refused"], outcomes["trained"], outcomes["crash"]]


def _special_inputs(work: Path) -> int:
    from charlstm.cli import main
    import contextlib
    import io

    loop = work / "loop.txt"
    loop.symlink_to(loop)
    fifo = work / "fifo.txt"
    os.mkfifo(fifo)
    refused = 0
    for path in (work, fifo, loop, work / ("x" * 300), work / "missing.txt"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["train", "--text", str(path)])
        refused += code == 2 and err.getvalue().count("\n") == 1
    return refused


def peak_memory(work: Path, base: bytes) -> None:
    cases = dict(hostile.crafted_checkpoints(base))
    rows = []
    probe = ("import resource, sys; from charlstm.cli import main; code = main(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)")
    baseline = subprocess.run([sys.executable, "-c", "import resource, torch, charlstm.cli; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              capture_output=True, text=True, env=crashes.child_env())
    rows.append(["(importing charlstm and torch, for comparison)", "-", f"{int(baseline.stdout) / 1024:.0f} MB"])
    for label in ("2^60-byte header claimed", "a 10^12-element tensor claimed", "100 MB of metadata",
                  "offsets past the end"):
        path = work / "evil.safetensors"
        path.write_bytes(cases[label])
        done = subprocess.run([sys.executable, "-c", probe, "info", str(path)], capture_output=True, text=True,
                              env=crashes.child_env(), timeout=300)
        lines = done.stderr.splitlines()
        rows.append([label, f"exit {done.returncode}, {len(lines) - 1} line", f"{int(lines[-1]) / 1024:.0f} MB"])
    keras = subprocess.run([sys.executable, "-c", probe, "import-keras",
                            str(SHARED / "keras" / "weights-improvement-19-1.9465.hdf5"), "--text",
                            str(SHARED / "keras" / "wonderland.txt"), "--window", "100000", "-o",
                            str(work / "window.safetensors")], capture_output=True, text=True,
                           env=crashes.child_env(), timeout=900)
    rows.append(["import-keras --window 100000 (was 105 GB)", f"exit {keras.returncode}",
                 f"{int(keras.stderr.splitlines()[-1]) / 1024:.0f} MB"])
    table(["charlstm info on …", "outcome", "peak memory (RSS)"], rows)


# --------------------------------------------------------------------------- 3. fuzzing


def fuzz_section(work: Path, text: Path, cases: int) -> None:
    import fuzzing

    print("## 3. Property-based fuzzing (Hypothesis)\n")
    tests = fuzzing.target_tests(text)
    per_target = cases // len(tests) + 1
    failures = []
    started = time.monotonic()
    for name, test in tests.items():
        try:
            fuzzing.benchmark_settings(per_target)(test)()
        except Exception as err:  # noqa: BLE001 - a falsified property is the finding
            failures.append(f"{name}: {str(err)[:300]}")
    rows = [[target, outcome, count] for target, outcome, count in fuzzing.describe()]
    total = sum(row[2] for row in rows)
    rows.append(["**all targets**", "**any**", f"**{total:,}**"])
    table(["target", "outcome", "cases"], rows)
    print(f"{total:,} cases in {time.monotonic() - started:.0f} s; properties falsified: {len(failures)}")
    for failure in failures:
        print(f"    FALSIFIED {failure}")
    print()
    fuzzing.cleanup()


# --------------------------------------------------------------------------- 4. the server


def server_section() -> None:
    print("## 4. The server\n")
    try:
        import reliability_server
    except ImportError as err:
        print(f"(benchmarks/reliability_server.py is not available: {err})\n")
        return
    reliability_server.main([])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--fuzz-cases", type=int, default=10_000)
    parser.add_argument("--sections", default="1,2,3,4", help="which sections, in this order")
    args = parser.parse_args()
    print(f"# Reliability, measured\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_name()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}; load average at start {load_average()}\n")
    with tempfile.TemporaryDirectory(prefix="charlstm-reliability-") as folder:
        work = Path(folder)
        text = training_text(work, 30_000)
        runs = {"1": lambda: crash_section(work, text, args.kills, args.epochs),
                "2": lambda: hostile_section(work / "hostile"),
                "3": lambda: fuzz_section(work, text, args.fuzz_cases),
                "4": server_section}
        (work / "hostile").mkdir()
        for section in args.sections.split(","):  # in the order given
            runs[section.strip()]()
            sys.stdout.flush()
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
