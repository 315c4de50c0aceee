"""Training throughput: packed native-length batches against padded fixed-length batches.

    python benchmarks/train.py                    # ElasticAST-small, 24 clips of 1-10 s, 2 rounds
    python benchmarks/train.py --depth 4 --clips 16 --repeat 1   # quicker

One training step = forward + BCE loss + backward + Adam step, as in ``astcli.train.trainer``. Both modes
train the same model on the same clips (random features: throughput does not depend on content):

* packed: each clip at its native length (frames cut to a multiple of 16), batches filled up to
  ``--batch-tokens`` by ``batch_clips``, clips sharing rows under block-diagonal attention (``pack_clips``);
* padded: every clip zero-padded to the longest length (``--max-frames``), as a fixed-length model is trained,
  ``batch_tokens // tokens(max_frames)`` clips per batch, one clip per row (no attention mask).

Reported per mode: useful tokens (the clips' own patches) per second, the share of computed tokens that
is padding, and clips per second. A last line compares the optimizer update alone: the fused Adam kernel
``make_optimizer`` uses against torch's default per-tensor Adam, on the same parameters and gradients. The
modes take turns for ``--repeat`` rounds and the best round counts, so load from other processes hits both
alike; by default time is this process's CPU time on one thread (``--clock cpu --threads 1``), which other
jobs on the machine barely disturb.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from astcli.model import AudioTransformer, batch_clips, elastic_config, pack_clips, patchify
from astcli.train.optimization import make_optimizer
from astcli.train.recipes import Recipe


def clip_frames(n: int, max_frames: int, seed: int = 0) -> list[int]:
    """Lengths in frames (10 ms) uniform over 1-10 s, cut to a multiple of 16 and to ``max_frames``."""
    gen = torch.Generator().manual_seed(seed)
    seconds = 1.0 + 9.0 * torch.rand(n, generator=gen)
    return [min(max_frames, int(s * 100) // 16 * 16) for s in seconds.tolist()]


def epoch(model, optimizer, batches, classes: int, clock) -> tuple[float, int, int]:
    """Train over ``batches`` once; returns (seconds on ``clock``, useful tokens, computed tokens)."""
    useful = computed = 0
    start = clock()
    for batch_clips_, useful_tokens in batches:
        batch = pack_clips(batch_clips_, 0)
        targets = torch.zeros(batch.num_clips, classes)
        loss = F.binary_cross_entropy_with_logits(model(batch), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        useful += useful_tokens
        computed += batch.clip_ids.numel()
    return clock() - start, useful, computed


def optimizer_seconds(model, fused: bool, steps: int, clock) -> float:
    """Seconds on ``clock`` per Adam step over ``model``'s parameters (random gradients), fused or torch's
    default per-tensor kernels."""
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.Adam(params, lr=1e-5, fused=fused) if fused else torch.optim.Adam(params, lr=1e-5)
    optimizer.step()
    start = clock()
    for _ in range(steps):
        optimizer.step()
    return (clock() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--max-frames", type=int, default=1024)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                        help="cpu: this process's CPU time (steady when other jobs share the machine); wall")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    torch.manual_seed(0)
    config = elastic_config(args.size, depth=args.depth, max_frames=args.max_frames, num_classes=527, attn_scale=True)
    model = AudioTransformer(config).train()
    optimizer = make_optimizer(model.parameters(), Recipe(lr=1e-5))
    frames = clip_frames(args.clips, args.max_frames)
    gen = torch.Generator().manual_seed(1)
    features = [torch.randn(f, config.num_mel_bins, generator=gen) * 0.5 for f in frames]

    native = [patchify(x, config) for x in features]
    lengths = [len(c) for c in native]
    groups = batch_clips(lengths, args.batch_tokens)
    packed = [([native[i] for i in idx], sum(lengths[i] for i in idx)) for idx in groups]

    full = config.tokens(args.max_frames)
    padded_clips = [patchify(F.pad(x, (0, 0, 0, args.max_frames - x.shape[0])), config) for x in features]
    per_batch = max(1, args.batch_tokens // full)
    padded = [(padded_clips[i : i + per_batch], sum(lengths[i : i + per_batch]))
              for i in range(0, len(padded_clips), per_batch)]

    modes = {"packed native length": packed, "padded to max length": padded}
    epoch(model, optimizer, packed[:1], config.num_classes, clock)  # warm-up (allocator, kernels)
    epoch(model, optimizer, padded[:1], config.num_classes, clock)
    best: dict[str, tuple[float, int, int]] = {}
    for _ in range(args.repeat):
        for name, batches in modes.items():
            result = epoch(model, optimizer, batches, config.num_classes, clock)
            if name not in best or result[0] < best[name][0]:
                best[name] = result

    audio = sum(frames) / 100
    print(f"ElasticAST-{args.size} depth {args.depth} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"params), {args.clips} clips of 1-10 s ({audio:.0f} s audio), budget {args.batch_tokens} tokens, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {args.clock} clock")
    print(f"{'mode':<22} {'batches':>7} {'seconds':>8} {'useful tok/s':>12} {'padding':>8} {'clips/s':>8}")
    for name, (seconds, useful, computed) in best.items():
        print(f"{name:<22} {len(modes[name]):>7} {seconds:>8.2f} {useful / seconds:>12.0f} "
              f"{1 - useful / computed:>8.1%} {args.clips / seconds:>8.2f}")
    speedup = best["packed native length"][0] and best["padded to max length"][0] / best["packed native length"][0]
    print(f"packed / padded useful-token throughput: {speedup:.2f}x")
    plain, fused = (min(optimizer_seconds(model, f, 20, clock) for _ in range(args.repeat)) for f in (False, True))
    print(f"Adam step: per-tensor {plain * 1e3:.1f} ms, fused {fused * 1e3:.1f} ms: fused {plain / fused:.2f}x")


if __name__ == "__main__":
    main()
