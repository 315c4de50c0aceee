"""Tagging speed of `ast tag` against transformers' audio-classification pipeline, measured in one run.

    python benchmarks/tag.py [--files 32] [--rounds 1] [--skip-rss]

1. AST-Base (random weights, transformers format) over a generated corpus of mixed-length clips (1-10 s,
   32 files: about three minutes of audio):
   transformers `pipeline("audio-classification")` file by file vs astcli's pipeline (packed batches,
   decoding in a worker thread), float32 and bfloat16, with the score deviation against transformers.
2. ElasticAST-Base at native length vs the same clips padded to 10.24 s: tokens and time.
3. Peak RSS of tagging a 1-hour file vs a 10-second file (small ElasticAST, separate processes), and
   time and peak RSS of a 10-minute file at several --batch-tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


def corpus(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Tones, chirps and noise bursts of 1-10 s, half at 16 kHz WAV, half at 44.1 kHz FLAC."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        rate = 16000 if i % 2 == 0 else 44100
        seconds = float(rng.uniform(1.0, 10.0))
        t = np.arange(int(seconds * rate)) / rate
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(t.size)
        path = folder / f"clip{i:03d}.{'wav' if rate == 16000 else 'flac'}"
        sf.write(path, x.astype(np.float32), rate)
        paths.append(str(path))
    return paths


def ast_base_dir(folder: Path) -> Path:
    from transformers import ASTConfig, ASTForAudioClassification

    torch.manual_seed(0)
    labels = {i: f"class {i}" for i in range(527)}
    config = ASTConfig(num_labels=527, id2label=labels, label2id={v: k for k, v in labels.items()},
                       problem_type="multi_label_classification")
    model = ASTForAudioClassification(config).eval()
    model.save_pretrained(folder)
    prep = {"feature_extractor_type": "ASTFeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
            "num_mel_bins": 128, "max_length": 1024, "do_normalize": True, "mean": -4.2677393, "std": 4.5689974,
            "padding_value": 0.0, "return_attention_mask": False}
    (folder / "preprocessor_config.json").write_text(json.dumps(prep))
    return folder


HF_SCRIPT = """
import json, sys
import numpy as np, soundfile as sf, soxr
from transformers import pipeline
classify = pipeline("audio-classification", model=sys.argv[1], device="cpu")
for path in sys.argv[2:]:
    audio, rate = sf.read(path, dtype="float32")
    if rate != 16000:
        audio = soxr.resample(audio, rate, 16000, quality="HQ")
    scores = [0.0] * 527
    for item in classify(audio, top_k=527):
        scores[int(item["label"].split()[-1])] = item["score"]
    print(json.dumps(scores), flush=True)
"""

# glibc keeps freed memory in its heap: what `ast` sets at start-up (astcli.keep_freed_memory)
KEEP_FREED = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"}


def run_command(cmd: list[str], env: dict | None = None) -> tuple[float, np.ndarray]:
    """Wall time of a whole command (start-up and model loading included) and the scores it printed."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    rows = []
    for line in done.stdout.splitlines():
        record = json.loads(line)
        if isinstance(record, list):
            rows.append(record)
        else:
            scores = [0.0] * 527
            for tag in record["tags"]:
                scores[tag["index"]] = tag["score"]
            rows.append(scores)
    return seconds, np.array(rows)


def run_transformers(model_dir: Path, paths: list[str], env: dict | None = None) -> tuple[float, np.ndarray]:
    return run_command([sys.executable, "-c", HF_SCRIPT, str(model_dir), *paths], env)


def run_astcli(model_dir: Path, paths: list[str], dtype: str) -> tuple[float, np.ndarray]:
    cmd = [sys.executable, "-m", "astcli", "tag", "-m", str(model_dir), "-k", "0", "-f", "jsonl", "--dtype", dtype]
    return run_command([*cmd, *paths])


def elastic_native_vs_padded(paths: list[str]) -> None:
    from astcli.audio import load_audio
    from astcli.backends import TorchBackend
    from astcli.model import AudioTransformer, elastic_config
    from astcli.tagger import Tagger

    torch.manual_seed(0)
    tagger = Tagger(TorchBackend(AudioTransformer(elastic_config("base", num_classes=527))))
    raw = [tagger.features(load_audio(p)) for p in paths]
    padded = [torch.nn.functional.pad(r, (0, 0, 0, 1024 - len(r))) for r in raw]
    for name, windows in (("native", raw), ("padded to 10.24 s", padded)):
        tokens = sum(len(tagger.clip(w)) for w in windows)
        tagger.score_windows(windows[:2])
        start = time.perf_counter()
        tagger.score_windows(windows)
        seconds = time.perf_counter() - start
        print(f"  ElasticAST-Base {name:18} {tokens:7d} tokens  {seconds:7.2f} s")


RSS_PROBE = (
    "import sys, time, torch, astcli; astcli.keep_freed_memory();"
    "from astcli.pipeline import TagOptions, tag_files; from astcli.tagger import Tagger;"
    "from astcli.backends import TorchBackend;"
    "from astcli.model import AudioTransformer, elastic_config; torch.manual_seed(0);"
    "t = Tagger(TorchBackend(AudioTransformer(elastic_config('small', num_classes=527))));"
    "start = time.perf_counter();"
    "r = list(tag_files(t, [sys.argv[1]], TagOptions(batch_tokens=int(sys.argv[2]) or None)));"
    "seconds = time.perf_counter() - start;"
    # VmHWM: this process's own peak (ru_maxrss would carry over the parent's after fork + exec)
    "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
    "print(r[0]['duration'], hwm, seconds)"
)


def probe(path: Path, batch_tokens: int = 0) -> tuple[float, float, float]:
    """(audio seconds, peak RSS in MiB, tagging seconds) of a fresh process tagging ``path``."""
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), str(batch_tokens)],
                         capture_output=True, text=True, check=True)
    duration, rss_kb, seconds = out.stdout.split()
    return float(duration), int(rss_kb) / 1024, float(seconds)


def noise_file(path: Path, seconds: int, rng: np.random.Generator) -> Path:
    """``seconds`` of 16 kHz noise, written a minute at a time."""
    with sf.SoundFile(path, "w", 16000, 1, "PCM_16") as f:
        for start in range(0, seconds, 60):
            f.write((0.1 * rng.standard_normal(16000 * min(60, seconds - start))).astype(np.float32))
    return path


def peak_rss(folder: Path) -> None:
    """Peak RSS of a 1-hour vs a 10-second file (small ElasticAST, default batch), then the batch size's
    effect on a 10-minute file's time and memory."""
    rng = np.random.default_rng(0)
    files = {"10 s": noise_file(folder / "ten.wav", 10, rng), "1 hour": noise_file(folder / "hour.wav", 3600, rng)}
    peaks = {}
    for name, path in files.items():
        duration, peaks[name], seconds = probe(path)
        print(f"  {name:7} file ({duration:7.1f} s audio): peak RSS {peaks[name]:7.1f} MiB, {seconds:6.1f} s tagging")
    print(f"  ratio 1 hour / 10 s: {peaks['1 hour'] / peaks['10 s']:.2f}x (target <= 1.3x)")
    minutes = noise_file(folder / "ten-minutes.wav", 600, rng)
    for tokens in (1024, 2048, 4096, 8192):
        _, peak, seconds = probe(minutes, tokens)
        print(f"  10-minute file, --batch-tokens {tokens:5d}: {seconds:6.1f} s tagging, peak RSS {peak:7.1f} MiB")


GLIBC_RUN = "transformers + ast's glibc setting"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="run every command this many times, in turn; "
                        "report each command's best and median, and the speed-up of each round")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = corpus(folder, args.files)
        audio = sum(sf.info(p).duration for p in paths)
        model_dir = ast_base_dir(folder / "ast-base")
        print(f"corpus: {len(paths)} files, {audio:.1f} s of audio; model: AST-Base, random weights")
        commands = {
            "transformers pipeline": lambda: run_transformers(model_dir, paths),
            "ast tag --dtype float32": lambda: run_astcli(model_dir, paths, "float32"),
            "ast tag --dtype bfloat16": lambda: run_astcli(model_dir, paths, "bfloat16"),
            GLIBC_RUN: lambda: run_transformers(model_dir, paths, KEEP_FREED),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        scores: dict[str, np.ndarray] = {}
        for _ in range(args.rounds):
            for name, command in commands.items():
                seconds, scores[name] = command()
                times[name].append(seconds)
        rounds = f", best and median of {args.rounds} rounds" if args.rounds > 1 else ""
        print(f"whole commands, start-up and model loading included{rounds}:")
        hf_times, hf_scores = np.array(times["transformers pipeline"]), scores["transformers pipeline"]
        for name, spent in times.items():
            spent = np.array(spent)
            line = (f"  {name:36} {spent.min():7.2f} s  median {np.median(spent):7.2f} s  "
                    f"({audio / spent.min():5.2f}x real time)")
            if name.startswith("ast"):
                paired = hf_times / spent  # each round's commands ran back to back
                line += (f"  speed-up {hf_times.min() / spent.min():4.2f}x (per round: median "
                         f"{np.median(paired):4.2f}x, {paired.min():4.2f}-{paired.max():4.2f}x)  "
                         f"max |score diff| {np.abs(scores[name] - hf_scores).max():.2e}")
            print(line)
        print(f"  (ast tag --dtype float32 vs transformers with the glibc setting: "
              f"{min(times[GLIBC_RUN]) / min(times['ast tag --dtype float32']):4.2f}x)")
        elastic_native_vs_padded(paths)
        if not args.skip_rss:
            peak_rss(folder)


if __name__ == "__main__":
    main()
