"""Tagging throughput: ONNX Runtime (float32, int8) against PyTorch, on CPU, on the same clips.

    python benchmarks/export.py                       # AST-Base windows + ElasticAST-Base native lengths
    python benchmarks/export.py --family ast --size small --windows 8 --repeat 5

Random weights (no network): throughput does not depend on them, score deviations of int8 do (trained
models have larger activations; docs/export.md). Each backend scores the same clips through the same
``logits(clips, batch_tokens)`` call that ``ast tag`` makes; the best of ``--repeat`` runs counts, the
backends taking turns so that load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from astcli.backends import BATCH_TOKENS, OnnxBackend, TorchBackend
from astcli.export import export_onnx
from astcli.model import AudioTransformer, ast_config, elastic_config
from astcli.tagger import Tagger

ELASTIC_SECONDS = (10.24, 8.0, 6.5, 5.0, 4.0, 3.2, 2.5, 1.6, 1.0)  # native lengths, 42 s of audio


def signal(seconds: float, sample_rate: int, seed: int) -> torch.Tensor:
    """Tones, a sweep and noise: a waveform with some structure, in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(round(seconds * sample_rate)) / sample_rate
    x = 0.3 * torch.sin(2 * torch.pi * (200 + 300 * seed) * t) + 0.2 * torch.sin(2 * torch.pi * 3000 * t * t / 10)
    return (x + 0.05 * torch.randn(t.shape, generator=gen)).float()


def make_tagger(family: str, size: str) -> Tagger:
    torch.manual_seed(0)
    config = (ast_config if family == "ast" else elastic_config)(size, num_classes=527)
    return Tagger(TorchBackend(AudioTransformer(config), device="cpu", name=f"{family}-{size} (random)"))


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench(family: str, size: str, windows: int, repeat: int, opsets: list[int], batch_tokens: int,
          work: Path) -> None:
    tagger = make_tagger(family, size)
    rate = tagger.sample_rate
    seconds = [tagger.config.window_seconds] * windows if family == "ast" else list(ELASTIC_SECONDS)
    clips = [tagger.clip(tagger.features(signal(s, rate, i))) for i, s in enumerate(seconds)]
    audio = sum(seconds)
    tokens = sum(len(c) + tagger.config.prefix_tokens for c in clips)
    print(f"\n== {tagger.name}: {len(clips)} clips, {audio:.1f} s of audio, {tokens} tokens, "
          f"batch_tokens {batch_tokens}")

    backends = {"torch float32": tagger}
    variants = [("float32", o) for o in opsets] + [("int8", opsets[0])]
    for precision, opset in variants:
        start = time.perf_counter()
        report = export_onnx(tagger, work / f"{family}-{precision}-{opset}.onnx", opset=opset, precision=precision)
        print(f"export {precision} opset {opset}: {time.perf_counter() - start:.1f} s; " + report.lines()[-1])
        backends[f"ort {precision} op{opset}"] = Tagger(OnnxBackend(report.path, device="cpu"))

    for backend in backends.values():  # warm-up: allocations, ORT's first-run planning
        backend.logits(clips[:1], batch_tokens)
    times: dict[str, list[float]] = {name: [] for name in backends}
    results = {}
    for _ in range(repeat):
        for name, backend in backends.items():
            start = time.perf_counter()
            results[name] = backend.logits(clips, batch_tokens)
            times[name].append(time.perf_counter() - start)

    base = min(times["torch float32"])
    reference = tagger.probabilities(results["torch float32"])
    for name, spent in times.items():
        best = min(spent)
        deviation = (tagger.probabilities(results[name]) - reference).abs().max().item()
        print(f"{name:19} best {best:7.3f} s  (runs {', '.join(f'{t:.2f}' for t in spent)})  "
              f"{audio / best:7.1f} audio s/s  x{base / best:5.2f} vs torch  max |prob dev| {deviation:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("ast", "elastic", "both"), default="both")
    parser.add_argument("--size", choices=("tiny", "small", "base"), default="base")
    parser.add_argument("--windows", type=int, default=4, help="AST: full windows to score")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--opset", type=int, nargs="+", default=[18],
                        help="opsets to export float32 graphs at (int8 uses the first)")
    parser.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS["cpu"])
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__} "
          f"({cores} intra-op threads), {platform.processor() or platform.machine()}, {cores} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    families = ("ast", "elastic") if args.family == "both" else (args.family,)
    with tempfile.TemporaryDirectory() as work:
        for family in families:
            bench(family, args.size, args.windows, args.repeat, args.opset, args.batch_tokens, Path(work))


if __name__ == "__main__":
    main()
