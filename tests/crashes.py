"""Crash trials for training (issue 15, part 1), shared by the tests (a few trials) and
``benchmarks/reliability.py`` (50+).

A seeded CPU training run in a child process is killed with SIGKILL at random moments (some on
purpose while a checkpoint is being written: the killer waits for the writer's temporary file
to appear) and resumed from ``last.safetensors`` until it finishes; its per-epoch validation
losses must equal those of the same run left alone.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".tmp"


def child_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONIOENCODING", None)
    return env


def train_command(text: Path, out: Path, epochs: int, units: int = 128, resume: bool = False,
                  extra: tuple[str, ...] = ()) -> list[str]:
    command = [sys.executable, "-m", "charlstm", "train", "--text", str(text), "-o", str(out)]
    if resume:
        return command + ["--resume", str(out / "last.safetensors"), "--no-progress", *extra]
    return command + ["--seed", "3", "--epochs", str(epochs), "--units", str(units), "--layers", "1",
                      "--embedding-dim", "16", "--batch-size", "8", "--bptt", "40", "--precision", "fp32",
                      "--threads", "1", "--no-progress", "--val-fraction", "0.1", *extra]


def wait_for_torch(pid: int, timeout: float = 120.0) -> bool:
    """Until the child has mapped libtorch: charlstm's package code is running by then (before it,
    only the interpreter's own start-up runs, whose Ctrl-C traceback no program can prevent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                return True
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return False
        time.sleep(0.005)
    return False


def val_losses(out: Path) -> dict[int, float]:
    """The validation loss of each epoch of the folder's last run (its rows carry its run id;
    a start killed before its first save left rows of a run nobody resumes), failing on an
    epoch logged twice."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses: dict[int, float] = {}
    for row in rows:
        if row.get("run_id") == rows[-1].get("run_id"):
            assert row["epoch"] not in losses, f"epoch {row['epoch']} logged twice"
            losses[row["epoch"]] = row["val_loss"]
    return losses


def reference_run(text: Path, out: Path, epochs: int, units: int = 128) -> tuple[dict[int, float], float]:
    """The uninterrupted run's losses and its seconds per epoch (the save interval)."""
    start = time.monotonic()
    done = subprocess.run(train_command(text, out, epochs, units), env=child_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    elapsed = time.monotonic() - start
    return val_losses(out), elapsed / epochs


@dataclass
class KillReport:
    kills: int = 0
    kills_during_writes: int = 0
    starts: int = 0
    resumes: int = 0
    resumes_ok: int = 0
    lost_seconds: list[float] = field(default_factory=list)
    stale_temporaries_left: int = 0
    errors: list[str] = field(default_factory=list)
    losses: dict[int, float] = field(default_factory=dict)
    trials: int = 0          # runs that went to the end (through their kills)
    trials_equal: int = 0    # ... whose validation losses equal the uninterrupted run's


def _temporaries(out: Path) -> list[Path]:
    try:
        return [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)
                and "probe" not in p.name]
    except FileNotFoundError:
        return []


def _wait_for_write(process: subprocess.Popen, out: Path, deadline: float, prefix: str = ".") -> bool:
    """Poll until a checkpoint's temporary file (``prefix``: whose) exists: the kill lands mid-write."""
    while time.monotonic() < deadline and process.poll() is None:
        if any(p.name.startswith(prefix) for p in _temporaries(out)):
            return True
        time.sleep(0.0005)
    return False


def _wait_for_file(process: subprocess.Popen, path: Path, deadline: float) -> None:
    while time.monotonic() < deadline and process.poll() is None and not path.is_file():
        time.sleep(0.01)


def kill_loop(text: Path, out: Path, epochs: int, kills: int, seed: int = 0, units: int = 128,
              during_write_share: float = 0.4, max_delay: float = 6.0,
              reference: dict[int, float] | None = None) -> KillReport:
    """Kill -9 the run ``kills`` times, resuming after each; a run that finishes before the kills
    are done is one completed trial (its losses checked against ``reference``), and the next
    trial starts in a fresh folder."""
    rng = random.Random(seed)
    report = KillReport()
    trial = 0
    folder = out / f"trial-{trial}"
    while True:
        resume = (folder / "last.safetensors").is_file()
        report.starts += 1
        report.resumes += resume
        started = time.monotonic()
        process = subprocess.Popen(train_command(text, folder, epochs, units, resume=resume), env=child_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if report.kills >= kills:
            _, err = process.communicate(timeout=900)
            report.resumes_ok += resume and process.returncode == 0
            if process.returncode != 0:
                report.errors.append(f"final run exit {process.returncode}: {err.strip()[-300:]}")
            else:
                _finish_trial(report, folder, reference)
            break
        # kills land after the run's first save (so most restarts are resumes): mid-write of
        # last.safetensors on purpose, or at a random moment of the next save interval
        _wait_for_file(process, folder / "last.safetensors", started + 300)
        if rng.random() < during_write_share:
            landed = _wait_for_write(process, folder, started + 300, prefix=".last.safetensors.")
        else:
            time.sleep(rng.uniform(0.0, max_delay))
            landed = bool(_temporaries(folder))
        if process.poll() is not None:  # it finished or failed before the kill
            _, err = process.communicate()
            report.resumes_ok += resume and process.returncode == 0
            if process.returncode != 0:
                report.errors.append(f"exit {process.returncode}: {err.strip()[-300:]}")
                break
            _finish_trial(report, folder, reference)
            trial += 1
            folder = out / f"trial-{trial}"
            continue
        killed_at = time.time()
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate()
        report.kills += 1
        report.kills_during_writes += landed
        last = folder / "last.safetensors"
        saved_at = last.stat().st_mtime if last.is_file() else 0.0
        report.lost_seconds.append(killed_at - max(saved_at, killed_at - (time.monotonic() - started)))
        report.resumes_ok += resume and "Traceback" not in err and "error" not in err
    report.stale_temporaries_left = len(_temporaries(folder))
    report.losses = val_losses(folder)
    return report


def _finish_trial(report: KillReport, folder: Path, reference: dict[int, float] | None) -> None:
    report.trials += 1
    report.stale_temporaries_left += len(_temporaries(folder))
    if reference is not None and val_losses(folder) == reference:
        report.trials_equal += 1
