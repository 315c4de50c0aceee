"""Fbank speed: astcli.features vs transformers' ASTFeatureExtractor (numpy path), and one hour streamed.

Run: python benchmarks/features.py
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from astcli.features import StreamingFbank, fbank, fbank_batch

SR = 16000


def make_audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tones = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3150 * t)
    return (tones + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    from transformers import ASTFeatureExtractor
    from transformers.utils import is_speech_available

    threads = torch.get_num_threads()
    path = "torchaudio" if is_speech_available() else "numpy"
    print(f"torch {torch.__version__}, {threads} threads; ASTFeatureExtractor path: {path}")

    seconds = 60.0
    audio = make_audio(seconds, seed=0)
    wave = torch.from_numpy(audio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its "mel filter has all zero values" note
        extractor = ASTFeatureExtractor(max_length=len(fbank(wave)))
        theirs = best_of(5, lambda: extractor(audio, sampling_rate=SR))
    ours = best_of(10, lambda: fbank(wave))
    print(f"{seconds:.0f} s of audio, best of repeats:")
    print(f"  astcli fbank         {ours * 1000:7.1f} ms  -> {ours * 3600 / seconds:6.2f} s per hour")
    print(f"  ASTFeatureExtractor  {theirs * 1000:7.1f} ms  -> {theirs * 3600 / seconds:6.2f} s per hour")
    print(f"  speed-up             {theirs / ours:7.1f} x")

    clips = [torch.from_numpy(make_audio(1.0, seed=i)) for i in range(1000)]
    loop = best_of(3, lambda: [fbank(c) for c in clips])
    batch = best_of(3, lambda: fbank_batch(clips))
    print(f"1000 clips of 1 s: fbank loop {loop * 1000:.0f} ms, fbank_batch {batch * 1000:.0f} ms")

    stream, elapsed, frames = StreamingFbank(), 0.0, 0
    for i in range(3600 // 30):  # stream_audio's default 30 s blocks
        block = torch.from_numpy(make_audio(30.0, seed=i))
        start = time.perf_counter()
        frames += len(stream.push(block))
        elapsed += time.perf_counter() - start
    print(f"3600 s through StreamingFbank in 30 s blocks: {elapsed:.2f} s ({frames} frames)")


if __name__ == "__main__":
    main()
