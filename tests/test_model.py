"""The packed transformer against transformers' AST, packing invariance, and the packing primitives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ast_window, hf_logits, make_hf_ast, perturb_, save_hf_ast
from hypothesis import given, settings
from hypothesis import strategies as st

from astcli.backends import TorchBackend
from astcli.model import (
    AudioTransformer,
    Clip,
    ast_config,
    batch_clips,
    drop_tokens,
    elastic_config,
    fit_frames,
    load_checkpoint,
    pack_clips,
    packing,
    patchify,
    transformer,
)
from astcli.model.checkpoints import build_model
from astcli.model.packing import CLS, DIST, PAD, PATCH
from astcli.tagger import Tagger, load_model

STRIDES = [(10, 10), (12, 8), (16, 16)]


def raw_fbank(frames: int, seed: int, mel: int = 128) -> torch.Tensor:
    """Log-mel-like raw features (around AudioSet's mean and spread)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(frames, mel, generator=gen) * 4.0 - 4.0


@pytest.fixture(scope="module", params=STRIDES, ids=lambda s: f"f{s[0]}t{s[1]}")
def hf_model_dir(request, tmp_path_factory):
    """(transformers model, saved directory) for a tiny AST at the given (frequency, time) strides."""
    fs, ts = request.param
    model = make_hf_ast(frequency_stride=fs, time_stride=ts, seed=fs * 100 + ts)
    directory = save_hf_ast(model, tmp_path_factory.mktemp(f"hf_f{fs}t{ts}"))
    return model, directory


# -- parity with transformers ---------------------------------------------------------------------------


def test_hf_parity_packed_batch(hf_model_dir):
    hf, directory = hf_model_dir
    tagger = load_model(directory)
    config = tagger.config
    assert (config.freq_stride, config.time_stride) == (hf.config.frequency_stride, hf.config.time_stride)
    assert config.labels == tuple(f"class {i}" for i in range(5))
    inputs = torch.stack([ast_window(raw_fbank(200, seed), 200) for seed in range(5)])
    expected = hf_logits(hf, inputs)
    assert expected.std() > 0.1  # the oracle is not degenerate
    # One batch holding every clip.
    got = tagger.logits([patchify(x, config) for x in inputs])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # The lower-level path: load_checkpoint + AudioTransformer on one PackedBatch.
    config2, state = load_checkpoint(directory)
    model = build_model(config2, state)
    with torch.inference_mode():
        direct = model(pack_clips([patchify(x, config2) for x in inputs], config2.prefix_tokens))
    torch.testing.assert_close(direct, expected, atol=1e-4, rtol=0)


def test_hf_parity_score_windows(hf_model_dir):
    """Raw windows shorter (zero-padded before normalisation) and longer (truncated) than max_length."""
    hf, directory = hf_model_dir
    tagger = load_model(directory)
    windows = [raw_fbank(n, seed) for seed, n in enumerate((37, 120, 200, 260, 1000))]
    inputs = torch.stack([ast_window(w, hf.config.max_length) for w in windows])
    expected = hf_logits(hf, inputs).softmax(-1)  # 5 classes, no problem_type: single-label
    assert not tagger.config.multi_label
    got = tagger.score_windows(windows)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # Tiny token budget: every window in its own forward pass, same answer.
    torch.testing.assert_close(tagger.score_windows(windows, batch_tokens=1), expected, atol=1e-4, rtol=0)


def test_hf_parity_multi_label(tmp_path):
    """A multi-label problem_type gives sigmoid scores."""
    hf = make_hf_ast(seed=7, problem_type="multi_label_classification")
    tagger = load_model(save_hf_ast(hf, tmp_path / "m"))
    assert tagger.config.multi_label
    windows = [raw_fbank(150, 1), raw_fbank(230, 2)]
    expected = hf_logits(hf, torch.stack([ast_window(w, 200) for w in windows])).sigmoid()
    torch.testing.assert_close(tagger.score_windows(windows), expected, atol=1e-4, rtol=0)


def test_bf16_close_to_fp32(hf_model_dir):
    _, directory = hf_model_dir
    windows = [raw_fbank(n, seed) for seed, n in enumerate((90, 200, 240))]
    fp32 = load_model(directory).score_windows(windows)
    bf16_tagger = load_model(directory, dtype="bfloat16")
    assert bf16_tagger.backends[0].model.head.weight.dtype == torch.bfloat16
    bf16 = bf16_tagger.score_windows(windows)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() <= 2e-2



@pytest.mark.parametrize("kind", ["elastic", "ast-cls"])
def test_bf16_close_to_fp32_packed(kind):
    """bf16 through both attention paths: shared rows (masked SDPA) and one-clip rows (per head)."""
    model = tiny_model(kind)
    config = model.config
    lengths = (400, 48, 333, 160, 64) if kind == "elastic" else (200, 120, 48)
    clips = [patchify(fit_frames(raw_fbank(n, i), config) if kind == "elastic" else raw_fbank(n, i) / 9, config)
             for i, n in enumerate(lengths)]
    fp32 = Tagger(TorchBackend(model, device="cpu")).logits(clips).softmax(-1)
    bf16_tagger = Tagger(TorchBackend(tiny_model(kind), device="cpu", dtype="bfloat16"))
    for budget in (1, 10**6):  # one clip per forward, then everything in one packed batch
        bf16 = bf16_tagger.logits(clips, batch_tokens=budget).softmax(-1)
        assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max() <= 2e-2

# -- packing invariance ---------------------------------------------------------------------------------


def tiny_model(kind: str, seed: int = 0) -> AudioTransformer:
    """A perturbed random AudioTransformer: ast (cls_dist / cls / mean pooling) or elastic."""
    common = dict(dim=64, depth=2, heads=4, mlp_dim=128, num_classes=5)
    configs = {
        "ast": lambda: ast_config("tiny", max_frames=200, **common),
        "ast-cls": lambda: ast_config("tiny", max_frames=200, prefix_tokens=1, pooling="cls", **common),
        "ast-mean": lambda: ast_config("tiny", max_frames=200, prefix_tokens=0, pooling="mean", **common),
        "elastic": lambda: elastic_config("tiny", max_frames=400, **common),
        "elastic-mean": lambda: elastic_config("tiny", max_frames=400, pooling="mean", **common),
    }
    torch.manual_seed(seed)
    return perturb_(AudioTransformer(configs[kind]()), seed).eval()


@pytest.mark.parametrize("kind", ["ast", "ast-cls", "ast-mean", "elastic", "elastic-mean"])
def test_packing_invariance(kind):
    model = tiny_model(kind)
    config = model.config
    prefix = config.prefix_tokens
    lengths = (200, 16, 48, 120, 33, 160, 64) if kind.startswith("ast") else (400, 16, 48, 333, 160, 64, 250)
    clips = [patchify(fit_frames(raw_fbank(n, i), config) if kind.startswith("elastic") else raw_fbank(n, i) / 9,
                      config) for i, n in enumerate(lengths)]
    with torch.inference_mode():
        alone = torch.cat([model(pack_clips([c], prefix)) for c in clips])
        longest = max(len(c) for c in clips) + prefix
        for row_tokens in (None, longest + 40, 2 * longest, 10 * longest):
            batch = pack_clips(clips, prefix, row_tokens)
            if row_tokens and row_tokens >= 2 * longest:
                assert batch.clip_ids.shape[0] < len(clips)  # rows really are shared
            torch.testing.assert_close(model(batch), alone, atol=1e-5, rtol=0)
        # Reversed order: logits still come back in clip-id order.
        backwards = model(pack_clips(clips[::-1], prefix, 3 * longest))
        torch.testing.assert_close(backwards, alone.flip(0), atol=1e-5, rtol=0)
    tagger = Tagger(TorchBackend(model, device="cpu"))
    for budget in (1, 300, 700, 10**6):
        torch.testing.assert_close(tagger.logits(clips, batch_tokens=budget), alone, atol=1e-5, rtol=0)


def test_equal_length_rows_need_no_mask():
    model = tiny_model("ast")
    clips = [patchify(raw_fbank(200, i) / 9, model.config) for i in range(3)]
    assert pack_clips(clips, 2).one_clip_per_row
    assert not pack_clips(clips, 2, row_tokens=10_000).one_clip_per_row
    assert not pack_clips([*clips[:2], patchify(raw_fbank(100, 5) / 9, model.config)], 2).one_clip_per_row


@pytest.mark.parametrize("kind", ["ast", "ast-cls", "elastic"])
@pytest.mark.parametrize("frames", [10, 16, 77, 200, 530])
def test_traceable_packing_twin_matches_eager(kind, frames):
    """fit_batch + pack_rows (what the waveform graph runs) give the very tensors of fit_frames + patchify +
    pack_clips, for clips shorter than a patch, in between, at and beyond the window."""
    config = tiny_model(kind).config
    raw = torch.stack([raw_fbank(frames, seed) for seed in range(3)])
    fitted = packing.fit_batch(raw, config)
    assert torch.equal(fitted, torch.stack([fit_frames(r, config) for r in raw]))
    twin = packing.pack_rows(fitted / 9, config)
    eager = pack_clips([patchify(f / 9, config) for f in fitted], config.prefix_tokens)
    assert twin.num_clips == eager.num_clips == 3
    for name in ("patches", "freq_pos", "time_pos", "token_kind", "clip_ids"):
        assert torch.equal(getattr(twin, name), getattr(eager, name)), name


def full_forward(model: AudioTransformer, batch) -> torch.Tensor:
    """Logits the plain way: every block over every token, then the mean of each clip's CLS/DIST states."""
    mask = model.attention_mask(batch)
    x = model.embed(batch)
    for block in model.blocks:
        x = block(x, mask)
    states = model.norm(x)
    kinds = (CLS,) if model.config.pooling == "cls" else (CLS, DIST)
    pooled = []
    for clip in range(batch.num_clips):
        chosen = (batch.clip_ids == clip) & torch.isin(batch.token_kind, torch.tensor(kinds))
        pooled.append(states[chosen].mean(0))
    return model.head(model.head_norm(torch.stack(pooled)))


@pytest.mark.parametrize("kind", ["ast", "ast-cls"])
def test_last_block_computes_only_pooled_tokens(kind):
    """CLS pooling reads a few tokens, so the last block computes only those: same logits as all tokens."""
    model = tiny_model(kind)
    config = model.config
    clips = [patchify(raw_fbank(n, i) / 9, config) for i, n in enumerate((200, 48, 120, 16, 160))]
    with torch.inference_mode():
        for batch in (pack_clips(clips[:1] * 3, config.prefix_tokens),  # one clip per row: prefix slice
                      pack_clips(clips, config.prefix_tokens, 600)):  # shared rows: gathered tokens
            expected = full_forward(model, batch)
            assert expected.std() > 0.1
            torch.testing.assert_close(model(batch), expected, atol=1e-5, rtol=0)
    # Training (autograd) takes the same path: the loss gradient reaches every block.
    batch = pack_clips(clips, config.prefix_tokens, 600)
    model(batch).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks[0].parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_linear_matches_training_linear(dtype):
    """Inference takes oneDNN's linear where it can; it agrees with F.linear (what autograd uses)."""
    model = tiny_model("ast").to(dtype)
    clips = [patchify(raw_fbank(n, i) / 9, model.config) for i, n in enumerate((200, 64))]
    batch = pack_clips(clips, model.config.prefix_tokens)
    with torch.no_grad(), torch.profiler.profile() as prof:
        fast = model(batch).float()
    with torch.enable_grad():
        plain = model(batch).float()
    if dtype in transformer._ONEDNN_DTYPES and transformer._ONEDNN:
        assert any("linear_pointwise" in e.name for e in prof.events())
    tolerance = 1e-5 if dtype == torch.float32 else 0.05 * plain.abs().max().item()
    torch.testing.assert_close(fast, plain.detach(), atol=tolerance, rtol=0)
    # Evaluation under autocast (the training loop's validation) keeps autocast's dtype rules.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.float()(batch).dtype == torch.bfloat16


def test_fused_gelu_matches_linear_then_gelu():
    """Inference fuses the MLP's GELU into its first matrix product; the values are those of F.gelu(F.linear)."""
    torch.manual_seed(0)
    layer = transformer.Linear(24, 96)
    x = torch.randn(5, 7, 24) * 3
    with torch.no_grad(), torch.profiler.profile() as prof:
        fused = transformer.linear_gelu(x, layer)
    expected = F.gelu(F.linear(x, layer.weight, layer.bias)).detach()
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-6)
    if transformer._ONEDNN:
        assert any("linear_pointwise" in e.name for e in prof.events())
    with torch.enable_grad():  # training keeps the autograd ops
        assert transformer.linear_gelu(x, layer).grad_fn is not None


@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_attention_by_head_matches_sdpa(offset):
    """The bfloat16 CPU attention (one 2-D product per head) against float32 SDPA on the same inputs: as
    close as bfloat16 SDPA is, also when the keys share a large component (a key bias, say)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 50, 16, generator=gen) for _ in range(3))
    q, k, v = q.bfloat16(), (k + offset * torch.randn(16, generator=gen)).bfloat16(), v.bfloat16()
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    sdpa_error = (F.scaled_dot_product_attention(q, k, v).float() - expected).abs()
    got = transformer.attention_by_head(q, k, v, None)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    error = (got.float() - expected).abs()
    assert error.max() <= 3 * sdpa_error.max() and error.mean() <= 3 * sdpa_error.mean()
    unscaled = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=1.0)
    assert (transformer.attention_by_head(q, k, v, 1.0).float() - unscaled).abs().mean() < 0.02

# -- packing primitives ---------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=0, max_size=40), budget=st.integers(1, 600))
def test_batch_clips_budget_and_cover(lengths, budget):
    batches = batch_clips(lengths, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert b, "no empty batch"
        total = sum(lengths[i] for i in b)
        assert total <= budget or (len(b) == 1 and lengths[b[0]] > budget)


def numbered_clip(index: int, n: int, patch_dim: int = 4) -> Clip:
    """A clip whose every patch value encodes (clip index, token index), to check where tokens land."""
    values = (index * 1000 + torch.arange(n, dtype=torch.float32)).unsqueeze(1).expand(n, patch_dim)
    return Clip(values.clone(), torch.arange(n) % 7, torch.arange(n) // 7)


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=25), prefix=st.sampled_from([0, 1, 2]),
       row_tokens=st.one_of(st.none(), st.integers(1, 200)))
def test_pack_clips_rows_hold_whole_clips(lengths, prefix, row_tokens):
    clips = [numbered_clip(i, n) for i, n in enumerate(lengths)]
    batch = pack_clips(clips, prefix, row_tokens)
    capacity = max(max(lengths) + prefix, row_tokens or 0)
    ids = batch.clip_ids
    assert batch.num_clips == len(clips)
    assert batch.patches.shape[:2] == ids.shape == batch.token_kind.shape == batch.freq_pos.shape
    for row in ids:
        used = int((row != PAD).sum())
        assert used <= capacity
        assert (row[used:] == PAD).all(), "padding only at the end of a row"
    for i, clip in enumerate(clips):
        rows, cols = (ids == i).nonzero(as_tuple=True)
        assert rows.unique().numel() == 1, "a clip lies in one row"
        assert len(cols) == len(clip) + prefix
        assert (cols == torch.arange(cols[0], cols[0] + len(cols))).all(), "contiguous"
        r, start = int(rows[0]), int(cols[0])
        kinds = batch.token_kind[r, start : start + len(cols)]
        assert kinds[:prefix].tolist() == [CLS, DIST][:prefix]
        assert (kinds[prefix:] == PATCH).all()
        body = slice(start + prefix, start + len(cols))
        assert torch.equal(batch.patches[r, body], clip.patches)
        assert torch.equal(batch.freq_pos[r, body], clip.freq_pos)
        assert torch.equal(batch.time_pos[r, body], clip.time_pos)


def test_pack_clips_rejects_empty():
    with pytest.raises(ValueError):
        pack_clips([], 2)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_drop_tokens_keeps_valid_positions(rate):
    config = elastic_config("tiny", max_frames=400)
    clip = patchify(fit_frames(raw_fbank(333, 3), config), config)
    n = len(clip)
    kept = drop_tokens(clip, rate, torch.Generator().manual_seed(1))
    assert len(kept) == max(1, int(n * (1 - rate)))
    original = {(int(f), int(t)): p for f, t, p in zip(clip.freq_pos, clip.time_pos, clip.patches, strict=True)}
    pairs = list(zip(kept.freq_pos.tolist(), kept.time_pos.tolist(), strict=True))
    assert len(set(pairs)) == len(pairs), "no duplicates"
    assert pairs == sorted(pairs), "frequency-major order kept"
    for (f, t), p in zip(pairs, kept.patches, strict=True):
        assert torch.equal(original[(f, t)], p), "a kept patch keeps its own position"
    tiny = Clip(clip.patches[:3], clip.freq_pos[:3], clip.time_pos[:3])
    assert len(drop_tokens(tiny, 0.99)) == 1


def test_fit_frames_rules():
    ast = ast_config("tiny", max_frames=200)
    short = raw_fbank(50, 0)
    padded = fit_frames(short, ast)
    assert padded.shape == (200, 128) and torch.equal(padded[:50], short) and (padded[50:] == 0).all()
    assert torch.equal(fit_frames(raw_fbank(300, 1), ast), raw_fbank(300, 1)[:200])
    el = elastic_config("tiny", max_frames=320)
    assert fit_frames(raw_fbank(333, 2), el).shape[0] == 320
    assert fit_frames(raw_fbank(100, 2), el).shape[0] == 96
    assert fit_frames(raw_fbank(7, 2), el).shape[0] == 16


def test_patchify_matches_conv():
    """Patches flattened (freq, time), frequency-major: a Linear on them equals a Conv2d over [mel, time]."""
    config = ast_config("tiny", freq_stride=12, time_stride=8, max_frames=120)
    x = raw_fbank(120, 4)
    clip = patchify(x, config)
    conv = torch.nn.Conv2d(1, 8, 16, stride=(12, 8))
    expected = conv(x.T[None, None]).flatten(2)[0].T  # [F*T, 8], frequency-major
    got = clip.patches @ conv.weight.reshape(8, -1).T + conv.bias
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    nf, nt = config.grid_freq, config.time_patches(120)
    assert len(clip) == nf * nt
    assert clip.freq_pos.tolist() == [f for f in range(nf) for _ in range(nt)]
    assert clip.time_pos.tolist() == list(range(nt)) * nf
