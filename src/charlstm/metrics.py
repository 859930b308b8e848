"""The per-run metrics log (``metrics.jsonl`` and ``metrics.csv``) and its loss plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import CharLSTMError
from .evaluate import LN2

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
PLOT_NAME = "loss.png"


class MetricsLog:
    """Appends one row per evaluation to both files of a run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def append(self, row: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / JSONL_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        csv_path = self.run_dir / CSV_NAME
        new_file = not csv_path.exists() or csv_path.stat().st_size == 0
        with open(csv_path, "a", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row), extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` in a run directory (or the file itself)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / JSONL_NAME
    if not path.is_file():
        raise CharLSTMError(f"{path}: no metrics log here (train with -o {path.parent} first)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise CharLSTMError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(row, dict) or "epoch" not in row or "loss" not in row:
            raise CharLSTMError(f"{path}:{number}: not a charlstm metrics row")
        rows.append(row)
    if not rows:
        raise CharLSTMError(f"{path}: the metrics log is empty")
    return rows


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
    output = Path(output) if output else (run_dir if run_dir.is_dir() else run_dir.parent) / PLOT_NAME
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
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return output
