"""Model forward speed on this machine, against its own measured matmul peak.

    python benchmarks/model.py              # full run (AST-Base 4 x 1024 frames, ElasticAST-Base 2-10 s clips)
    python benchmarks/model.py --quick      # smaller shapes, a smoke test of the script
    python benchmarks/model.py --profile    # also a torch.profiler table of one AST-Base fp32 forward
    python benchmarks/model.py --threads 1 --clock cpu   # per-core numbers, robust on a busy machine
    python benchmarks/model.py --keep-memory             # glibc keeps freed memory (see keep_freed_memory)

Prints (a) the fp32 / bf16 matmul peak (square products, torch.matmul or oneDNN, best of N), (b) AST-Base
fp32 forward time, its analytic FLOP count, achieved GFLOP/s and fraction of the fp32 peak, (c) the same in
bfloat16, and
(d) ElasticAST-Base on mixed-length clips at native length vs the same clips padded to 10 s, and (e) the
CPU kernels inference picks (oneDNN linear, bf16 attention per head) against PyTorch's defaults.
Random weights: speed does not depend on their values. Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import astcli
from astcli.model import AudioTransformer, ast_config, elastic_config, fit_frames, pack_clips, patchify
from astcli.model.config import ModelConfig
from astcli.model.packing import PAD, PackedBatch
from astcli.model.transformer import attention_by_head, linear

CLOCK = time.perf_counter  # or time.process_time (--clock cpu): CPU seconds of this process, all threads


def best_time(fn, repeats: int, warmup: int = 1) -> float:
    """Best time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (seconds, on ``CLOCK``)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times)


def matmul_peak(dtype: torch.dtype, n: int, repeats: int) -> float:
    """GFLOP/s of an ``n x n @ n x n`` product in ``dtype`` (2 n^3 FLOPs), best of ``repeats``, the better of
    ``torch.matmul`` and the model's own inference ``linear`` (oneDNN on x86-64)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    with torch.inference_mode():
        seconds = min(best_time(lambda: torch.matmul(a, b, out=out), repeats, warmup=2),
                      best_time(lambda: linear(a, b, None), repeats, warmup=2))
    return 2 * n**3 / seconds / 1e9


def forward_flops(config: ModelConfig, batch: PackedBatch) -> float:
    """Analytic FLOPs (2 per multiply-add) of one forward over ``batch``: every linear layer on every token
    of every row (padding included: it is computed), attention matmuls over each full row (QK^T and AV),
    attention pooling and the head; for CLS pooling the last block's keys and values on every token and the
    rest on the pooled tokens only (what the model computes). LayerNorm, GELU, softmax and additions are
    left out (O(n d))."""
    rows, length = batch.clip_ids.shape
    d, m, p2 = config.dim, config.mlp_dim, config.patch_size**2
    tokens = rows * length
    per_token_layer = 2 * d * (3 * d + d + 2 * m)  # qkv, proj, fc1, fc2
    attention_layer = rows * 2 * 2 * length * length * d  # QK^T and AV over the row
    patches = int((batch.token_kind == 0).logical_and(batch.clip_ids != PAD).sum())
    total = config.depth * (tokens * per_token_layer + attention_layer) + patches * 2 * p2 * d
    if config.pooling in ("cls", "cls_dist"):  # the last block computes queries onwards for the pooled tokens
        read = rows * (1 if config.pooling == "cls" else config.prefix_tokens)
        last = tokens * 2 * d * 2 * d + read * 2 * d * (d + d + 2 * m) + read * 2 * 2 * length * d
        total += last - (tokens * per_token_layer + attention_layer)
    if config.pooling == "attention":
        total += tokens * 2 * d * 2 * d + batch.num_clips * (2 * 2 * d * tokens + 2 * d * d)
    total += batch.num_clips * 2 * d * config.num_classes
    return float(total)


def random_model(config: ModelConfig, dtype: torch.dtype) -> AudioTransformer:
    torch.manual_seed(0)
    return AudioTransformer(config).to(dtype).eval()


def features(frames: int, seed: int) -> torch.Tensor:
    """Normalised-looking features ``[frames, 128]``."""
    return torch.randn(frames, 128, generator=torch.Generator().manual_seed(seed)) * 0.5


def time_forward(model: AudioTransformer, batch: PackedBatch, repeats: int) -> float:
    with torch.inference_mode():
        return best_time(lambda: model(batch), repeats)


def report_forward(name: str, config: ModelConfig, batch: PackedBatch, seconds: float, peak: float) -> float:
    flops = forward_flops(config, batch)
    rate = flops / seconds / 1e9
    rows, length = batch.clip_ids.shape
    print(f"{name}: {batch.num_clips} clips, {rows} rows x {length} tokens, {flops / 1e9:.1f} GFLOP, "
          f"{seconds * 1000:.0f} ms -> {rate:.0f} GFLOP/s = {rate / peak:.0%} of the fp32 matmul peak")
    return rate


def profile_forward(model: AudioTransformer, batch: PackedBatch, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test of the script")
    parser.add_argument("--batch", type=int, default=4, help="AST windows per forward (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed runs (default 3)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table (AST fp32)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or CPU time of the process (fair on a busy machine with --threads 1)")
    parser.add_argument("--keep-memory", action="store_true", help="glibc keeps freed memory (no re-faulting)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = astcli.keep_freed_memory() if args.keep_memory else False

    size = "tiny" if args.quick else "base"
    frames = 256 if args.quick else 1024
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}, {args.clock} clock, freed memory kept: {kept}")

    # (a) matmul peaks
    n = 512 if args.quick else args.matmul_size
    peak32 = matmul_peak(torch.float32, n, 5)
    peak16 = matmul_peak(torch.bfloat16, n, 5)
    print(f"matmul peak ({n}^3, best of 5): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s "
          f"({peak16 / peak32:.2f}x)")

    # (b) AST-Base fp32, stride 10, 1024 frames: 12 x 101 = 1212 patches + 2 tokens per window
    config = ast_config(size, max_frames=frames)
    clips = [patchify(fit_frames(features(frames, i), config), config) for i in range(args.batch)]
    batch = pack_clips(clips, config.prefix_tokens)
    assert batch.one_clip_per_row
    model32 = random_model(config, torch.float32)
    t32 = time_forward(model32, batch, args.repeats)
    rate32 = report_forward(f"AST-{size} fp32", config, batch, t32, peak32)

    # (c) the same in bfloat16
    model16 = random_model(config, torch.bfloat16)
    t16 = time_forward(model16, batch, args.repeats)
    report_forward(f"AST-{size} bf16", config, batch, t16, peak32)
    print(f"bf16 speed-up over fp32: {t32 / t16:.2f}x "
          f"({forward_flops(config, batch) / t16 / 1e9 / peak16:.0%} of the bf16 matmul peak)")
    if args.profile or rate32 < 0.75 * peak32:
        print(f"AST-{size} fp32 below 75% of peak or --profile: where one forward spends its time")
        profile_forward(model32, batch)
    del model16

    # (d) ElasticAST-Base: native length vs padded to 10 s
    el = elastic_config(size, max_frames=1024)
    seconds = [2, 3, 4, 5, 6, 7, 8, 10] if not args.quick else [1, 2]
    raw = [features(100 * s - 2, i) for i, s in enumerate(seconds)]  # 25 ms frames every 10 ms: 100 s - 2
    native = [patchify(fit_frames(x, el), el) for x in raw]
    padded_frames = 998 if not args.quick else 198
    padded = [patchify(fit_frames(torch.nn.functional.pad(x, (0, 0, 0, padded_frames - x.shape[0])), el), el)
              for x in raw]
    model_el = random_model(el, torch.float32)
    results = {}
    for name, clips_el in (("native", native), ("padded to 10 s" if not args.quick else "padded", padded)):
        b = pack_clips(clips_el, 0)
        t = time_forward(model_el, b, args.repeats)
        tokens = sum(len(c) for c in clips_el)
        results[name] = (tokens, t)
        rows, length = b.clip_ids.shape
        rate = forward_flops(el, b) / t / 1e9
        print(f"ElasticAST-{size} fp32 {name}: {len(clips_el)} clips ({'/'.join(map(str, seconds))} s), "
              f"{tokens} tokens in {rows} rows x {length}, {t * 1000:.0f} ms, {rate:.0f} GFLOP/s")
    (tn, tt), (pn, pt) = results.values()
    print(f"ElasticAST native vs padded: {tn / pn:.2f}x the tokens, {tt / pt:.2f}x the time "
          f"({pt / tt:.2f}x faster)")

    # (e) the two CPU kernels the model picks for inference, against PyTorch's defaults, on AST's shapes
    components(config, frames, args.repeats)


def components(config: ModelConfig, frames: int, repeats: int) -> None:
    """F.linear vs the model's inference ``linear`` on one window's layer shapes, and SDPA vs
    ``attention_by_head`` in bfloat16 on one window's heads."""
    tokens = config.tokens(frames)
    d, m = config.dim, config.mlp_dim
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            flops, default, ours = 0.0, 0.0, 0.0
            for n_in, n_out in ((d, 3 * d), (d, d), (d, m), (m, d)):  # qkv, proj, fc1, fc2
                x = torch.randn(tokens, n_in, generator=gen).to(dtype)
                w = (0.02 * torch.randn(n_out, n_in, generator=gen)).to(dtype)
                b = torch.zeros(n_out, dtype=dtype)
                flops += 2 * tokens * n_in * n_out
                args = (x, w, b)
                default += best_time(lambda a=args: torch.nn.functional.linear(*a), repeats, warmup=2)
                ours += best_time(lambda a=args: linear(*a), repeats, warmup=2)
            print(f"one block's linear layers, {tokens} tokens, {str(dtype)[6:]}: F.linear "
                  f"{flops / default / 1e9:.0f} GFLOP/s, astcli linear {flops / ours / 1e9:.0f} GFLOP/s "
                  f"({default / ours:.2f}x)")
        heads = config.heads
        q, k, v = (torch.randn(1, tokens, heads, d // heads, generator=gen).bfloat16().transpose(1, 2)
                   for _ in range(3))
        sdpa = best_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats, warmup=2)
        by_head = best_time(lambda: attention_by_head(q, k, v, None), repeats, warmup=2)
        flops = 4 * tokens * tokens * d
        print(f"one block's attention, {tokens} tokens, bfloat16: SDPA {flops / sdpa / 1e9:.0f} GFLOP/s, "
              f"attention_by_head {flops / by_head / 1e9:.0f} GFLOP/s ({sdpa / by_head:.2f}x)")


if __name__ == "__main__":
    main()
