"""Training quality: the default from-scratch recipe against the linear probe, on real-sized small tasks.

    python benchmarks/train_quality.py                       # both sets, tiny ElasticAST, the default recipe
    python benchmarks/train_quality.py --sets spoken --epochs 5

Sets (built on first use under ``--data``): the espeak-ng spoken-digit set (``spoken_words.py``: 3,000 clips
of 0.3-1.5 s at 8 kHz, test fold = the usual 300-clip speaker-balanced split) and the synthetic ESC-like set
(``esc_like.py``: 400 5-s clips, 10 classes, fold 1 as the test). Each set runs ``ast train --arch elastic --size
tiny --init none --folds 1`` with the recipe's defaults (overridden only by ``--epochs`` when given), which also
fits the linear probe on the same split. Printed per set: the model's and the probe's test top-1, their ratio, the
wall time of the whole run and of the probe, and the CPU time of the run (all threads and workers), so a run on
a busy machine can be told from a quiet one (CPU time / wall time ~ the cores the run really had). Like the
``ast`` command, the script first asks glibc to keep freed memory (``astcli.keep_freed_memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import esc_like
import spoken_words

from astcli import keep_freed_memory
from astcli.train import experiment


def dataset(name: str, root: Path) -> Path:
    """The manifest of set ``name`` under ``root``, built when missing."""
    if name == "spoken":
        manifest = root / "spoken_words" / "spoken_words.csv"
        if not manifest.is_file():
            spoken_words.build(manifest.parent)
        return manifest
    manifest = root / "esc_like" / "esc_like.csv"
    if not manifest.is_file():
        esc_like.build(manifest.parent)
    return manifest


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (data workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(manifest: Path, out: Path, epochs: int | None) -> dict:
    """Train the default recipe on fold 1 of ``manifest`` into ``out``; the numbers of one run."""
    overrides = {"epochs": epochs} if epochs else {}
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = experiment.train(str(manifest), out, arch="elastic", size="tiny", init="none", folds=[1],
                              progress=False, **overrides)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    run = result.runs[0]
    history = [(r["epoch"], r.get("test_top1")) for r in run.history]
    return {"model_top1": run.test_metrics.get("top1"), "probe_top1": run.baseline["metrics"].get("top1"),
            "probe_s": run.baseline["seconds"], "wall_s": wall, "cpu_s": cpu, "epochs": len(run.history),
            "test_top1_by_epoch": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["spoken", "esc"], choices=["spoken", "esc"])
    parser.add_argument("--data", default="benchmark-data", help="where the sets are built / found")
    parser.add_argument("--out", default="benchmark-runs", help="training runs (one new folder per call)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    args = parser.parse_args()
    keep_freed_memory()  # as the `ast` command does at start-up, so the run costs what `ast train` costs
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(f"cores: {os.cpu_count()}  torch threads: default  load average at start: {os.getloadavg()[0]:.1f}")
    print(f"{'set':8} {'epochs':>6} {'model':>7} {'probe':>7} {'ratio':>6} {'wall s':>8} {'probe s':>8} {'cpu s':>8}")
    for name in args.sets:
        numbers = measure(dataset(name, Path(args.data)), Path(args.out) / f"{name}-{stamp}", args.epochs)
        ratio = numbers["model_top1"] / numbers["probe_top1"] if numbers["probe_top1"] else float("nan")
        print(f"{name:8} {numbers['epochs']:>6} {numbers['model_top1']:>7.4f} {numbers['probe_top1']:>7.4f} "
              f"{ratio:>6.3f} {numbers['wall_s']:>8.1f} {numbers['probe_s']:>8.1f} {numbers['cpu_s']:>8.1f}")
        print(json.dumps(numbers["test_top1_by_epoch"]))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
