"""Logs of a training run: one record per epoch as ``log.jsonl`` and ``log.csv``, loss and metric curves as
``curves.png`` (with the optional matplotlib), the epoch summary line, and the JSON-safe form of every record."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from astcli.files import write_text

METRIC_KEYS = ("top1", "top5", "mAP", "mAUC", "d_prime")
TIMING_KEYS = ("seconds", "clips_per_s", "tokens_per_s")


def json_safe(value):
    """A copy of ``value`` that strict JSON can hold: non-finite floats become None, tuples lists, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def metrics_of(record: dict) -> dict:
    """The evaluation metrics (:data:`METRIC_KEYS`) among a record's fields."""
    return {k: record[k] for k in METRIC_KEYS if k in record}


def epoch_line(record: dict) -> str:
    """One line that sums up an epoch record: fold, epoch, training loss, finite metrics, time and speed."""
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics_of(record).items() if v is not None and math.isfinite(v))
    label = f"fold {record['fold']} " if record.get("fold") is not None else ""
    return (f"{label}epoch {record['epoch']}: loss {record['train_loss']:.4f}  {shown}  "
            f"({record['seconds']:.1f} s, {record['clips_per_s']:.1f} clips/s)")


def write_logs(directory: Path, history: list[dict]) -> None:
    """``log.jsonl`` and ``log.csv`` (one row per epoch) and ``curves.png`` when matplotlib is installed."""
    write_text(directory / "log.jsonl", "".join(json.dumps(json_safe(r)) + "\n" for r in history))
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in json_safe(r).items()} for r in history)
    write_text(directory / "log.csv", table.getvalue())
    plot_curves(history, directory / "curves.png")


def plot_curves(history: list[dict], path: Path) -> bool:
    """Loss and metric curves as a PNG (the optional ``plot`` extra); False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    if not history:
        return False
    epochs = [r["epoch"] for r in history]
    skip = {"fold", "epoch", "lr", "train_loss", "val_loss", "steps", "bad", *TIMING_KEYS}
    metrics = [k for k in history[-1] if k not in skip and isinstance(history[-1][k], (int, float))]
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for key in ("train_loss", "val_loss"):
        values = [r.get(key) for r in history]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    ax_loss.legend()
    for key in metrics:
        values = [r.get(key) for r in history]
        ax_metric.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=key)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title("validation")
    if metrics:
        ax_metric.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True
