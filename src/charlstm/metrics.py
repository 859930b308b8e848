"""The per-run metrics log (``metrics.jsonl`` and ``metrics.csv``) and its loss plot."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .checks import check_no_nul, check_output_file
from .errors import CharLSTMError
from .fileio import atomic_write_bytes
from .evaluate import LN2

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
PLOT_NAME = "loss.png"


class MetricsLog:
    """Appends one row per evaluation to both files of a run directory. Rows carry the run's id,
    so runs sharing a folder stay apart, and a resumed run replaces the rows of the epochs it redoes."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def append(self, row: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / JSONL_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        csv_path = self.run_dir / CSV_NAME
        header = _csv_header(csv_path)
        with open(csv_path, "a", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header or list(row), extrasaction="ignore")
            if not header:
                writer.writeheader()
            writer.writerow({k: "" if v is None else v for k, v in row.items()})

    def forget(self, run_id: str, after_step: int) -> int:
        """Drop this run's rows logged after optimiser step ``after_step`` (a killed session logged
        them after its last save; the resumed one redoes them); returns how many went. Both files
        are rewritten atomically."""
        path = self.run_dir / JSONL_NAME
        if not path.is_file():
            return 0
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None  # a line cut by the kill
            if not isinstance(row, dict):
                dropped += 1
                continue
            same_run = row.get("run_id") in (run_id, None)
            if same_run and isinstance(row.get("step"), int) and row["step"] > after_step:
                dropped += 1
                continue
            kept.append(row)
        if dropped:
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))
            atomic_write_bytes(self.run_dir / CSV_NAME, _csv_bytes(kept))
        return dropped


def _csv_header(path: Path) -> list[str] | None:
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            return next(csv.reader(handle), None) or None
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _csv_bytes(rows: list[dict]) -> bytes:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue().encode("utf-8")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` in a run directory (or the file itself)."""
    check_no_nul(run_dir, "plot")
    path = Path(run_dir)
    if path.is_dir():
        path = path / JSONL_NAME
    if not path.is_file():
        raise CharLSTMError(f"{path}: no metrics log here (train with -o {path.parent} first)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CharLSTMError(f"{path}: not UTF-8 text (byte {err.start}), so not a charlstm metrics log") from None
    except OSError as err:
        raise CharLSTMError(f"{path}: cannot read ({err.strerror or err})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise CharLSTMError(f"{path}:{number}: not a JSON line") from None
        if not _is_metrics_row(row):
            raise CharLSTMError(f"{path}:{number}: not a charlstm metrics row (an epoch number and finite losses)")
        rows.append(row)
    if not rows:
        raise CharLSTMError(f"{path}: the metrics log is empty")
    return rows


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_metrics_row(row) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool)
            and abs(row["epoch"]) < 10**9 and _finite(row.get("loss"))
            and (row.get("val_loss") is None or _finite(row["val_loss"])))


PLOT_FORMATS = (".png", ".pdf", ".svg")


def plot_output(run_dir: str | Path, output: str | Path | None) -> Path:
    """Where the plot goes, checked before drawing: a file with a supported suffix (a folder
    gets loss.png inside it; no suffix gets .png), in a folder that takes files."""
    run_dir = Path(run_dir)
    if output is None:
        return check_output_file((run_dir if run_dir.is_dir() else run_dir.parent) / PLOT_NAME, "plot -o")
    output = Path(output)
    if output.is_dir():
        output = output / PLOT_NAME
    elif not output.suffix:
        output = output.with_name(output.name + ".png")
    if output.suffix.lower() not in PLOT_FORMATS:
        raise CharLSTMError(f"plot -o {output}: the suffix must be one of {', '.join(PLOT_FORMATS)}")
    return check_output_file(output, "plot -o")


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write a PNG of training and validation loss (nats/char) per epoch; returns its path."""
    rows = read_metrics(run_dir)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharLSTMError("plotting needs matplotlib: pip install 'charlstm[plot]'") from None
    run_dir = Path(run_dir)
    output = plot_output(run_dir, output)
    last_run = rows[-1].get("run_id")  # a folder may hold several runs: plot the latest
    rows = [r for r in rows if r.get("run_id") == last_run] if last_run else rows
    # a resumed run appends rows; the last row for an epoch is the one that counts
    by_epoch = {int(r["epoch"]): r for r in rows}
    epochs = sorted(by_epoch)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(epochs, [by_epoch[e]["loss"] for e in epochs], label="training loss", marker=".")
    val_epochs = [e for e in epochs if by_epoch[e].get("val_loss") is not None]
    if val_epochs:
        ax.plot(val_epochs, [by_epoch[e]["val_loss"] for e in val_epochs], label="validation loss", marker=".")
        best = min(val_epochs, key=lambda e: by_epoch[e]["val_loss"])
        value = by_epoch[best]["val_loss"]
        ax.annotate(f"best {value:.4f} ({value / LN2:.3f} bpc)", (best, value),
                    textcoords="offset points", xytext=(0, 12), ha="center", fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=output.suffix.lower().lstrip("."))
    plt.close(fig)
    return atomic_write_bytes(output, buffer.getvalue())
