import math

import pytest
import torch

from astcli.train.augment import (
    BalancedSampler,
    ShuffleSampler,
    add_noise,
    feature_noise,
    mixup,
    random_hop_ms,
    sample_mixup_lambda,
    spec_augment,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask_widths(out: torch.Tensor) -> tuple[int, int]:
    """(masked mel bins, masked frames) of an augmented all-positive input."""
    zero = out == 0
    return int(zero.all(dim=0).sum()), int(zero.all(dim=1).sum())


def test_spec_augment_mask_widths_are_bounded_and_scaled():
    features = torch.rand(256, 128) + 1
    widths = [
        _mask_widths(spec_augment(features, 48, 192, _gen(s), reference_frames=1024)) for s in range(200)
    ]
    freq, time = zip(*widths, strict=True)
    assert 40 <= max(freq) <= 47  # uniform in [0, 48)
    assert 35 <= max(time) <= 47  # 192 * 256 / 1024 = 48 -> uniform in [0, 48)
    assert min(freq) == 0 and min(time) == 0
    assert features.min() >= 1  # input untouched


def test_spec_augment_shapes_small_clips_and_reproducibility():
    features = torch.rand(100, 128) + 1
    out = spec_augment(features, 24, 1, _gen(3), reference_frames=1024)  # scaled time mask = max(1, 0) = 1
    assert out.shape == features.shape and _mask_widths(out)[1] == 0
    assert torch.equal(
        spec_augment(features, 24, 96, _gen(5), 512), spec_augment(features, 24, 96, _gen(5), 512)
    )
    assert torch.equal(spec_augment(features, 0, 0, _gen(5)), features)
    outs = {spec_augment(features, 24, 96, _gen(s), 128).eq(0).sum().item() for s in range(10)}
    assert len(outs) > 1


def test_mixup_pads_or_crops_b_and_mixes_labels():
    a, ya = torch.ones(100, 8), torch.tensor([1.0, 0.0, 0.0])
    short, yb = torch.full((60, 8), 3.0), torch.tensor([0.0, 0.0, 1.0])
    mixed, labels = mixup(a, short, ya, yb, 0.75)
    assert mixed.shape == (100, 8)
    assert torch.allclose(mixed[:60], torch.full((60, 8), 0.75 + 0.25 * 3))
    assert torch.allclose(mixed[60:], torch.full((40, 8), 0.75))  # zero padding beyond b's end
    assert torch.allclose(labels, torch.tensor([0.75, 0.0, 0.25])) and labels.sum() == pytest.approx(1.0)
    mixed, _ = mixup(a, torch.full((300, 8), 3.0), ya, yb, 0.5)
    assert mixed.shape == (100, 8) and torch.allclose(mixed, torch.full((100, 8), 2.0))
    wave, _ = mixup(torch.ones(16000), torch.ones(8000), ya, yb, 0.5)  # waveforms mix the same way
    assert wave.shape == (16000,) and wave[-1] == 0.5
    _, multi_hot = mixup(a, a, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]), 0.6)
    assert torch.allclose(multi_hot, torch.tensor([0.6, 1.0, 0.4]))


def test_sample_mixup_lambda_is_beta_and_reproducible():
    gen = _gen(1)
    lams = torch.tensor([sample_mixup_lambda(gen) for _ in range(2000)])
    assert ((lams > 0) & (lams < 1)).all()
    # Beta(10, 10): mean 0.5, variance 1 / (4 * 21)
    assert lams.mean().item() == pytest.approx(0.5, abs=0.01)
    assert lams.var().item() == pytest.approx(1 / 84, rel=0.15)
    assert sample_mixup_lambda(_gen(7), 0.5) == sample_mixup_lambda(_gen(7), 0.5)


@pytest.mark.parametrize(("snr_db", "noise_len"), [(20.0, 48000), (0.0, 16000), (-5.0, 5000)])
def test_add_noise_hits_the_requested_snr(snr_db, noise_len):
    gen = _gen(2)
    waveform = torch.sin(torch.arange(16000) * 2 * math.pi * 440 / 16000) * 0.3
    noise = torch.rand(noise_len, generator=gen) - 0.5
    out = add_noise(waveform, noise, snr_db, gen)
    assert out.shape == waveform.shape
    measured = 10 * math.log10(waveform.pow(2).mean() / (out - waveform).pow(2).mean())
    assert measured == pytest.approx(snr_db, abs=0.5)
    assert torch.equal(
        add_noise(waveform, noise, snr_db, _gen(4)), add_noise(waveform, noise, snr_db, _gen(4))
    )
    assert torch.equal(add_noise(waveform, torch.zeros(100), snr_db, gen), waveform)


def test_feature_noise_adds_small_noise_and_rolls():
    features = torch.arange(50.0)[:, None].repeat(1, 16)  # each frame holds its index
    out = feature_noise(features, _gen(0), reference_frames=50)
    assert out.shape == features.shape
    assert torch.equal(out, feature_noise(features, _gen(0), reference_frames=50))
    shifts = [s for s in range(-10, 11) if bool(((out - features.roll(s, 0)).abs() < 0.1).all())]
    assert len(shifts) == 1
    seen = set()
    for seed in range(200):
        out = feature_noise(features, _gen(seed), reference_frames=50)
        seen.add(next(s for s in range(-10, 11) if bool(((out - features.roll(s, 0)).abs() < 0.1).all())))
    assert seen == set(range(-10, 11))


def test_masks_and_roll_scale_to_short_clips_and_never_cover_half_of_one():
    clip = torch.rand(64, 128) + 1  # 0.64 s; the recipe's masks are meant for 128 frames
    time = [_mask_widths(spec_augment(clip, 0, 48, _gen(s), reference_frames=128))[1] for s in range(300)]
    assert 18 <= max(time) <= 23  # 48 * 64 / 128 = 24 -> uniform in [0, 24)
    short = torch.rand(20, 128) + 1
    for seed in range(300):  # masks asked for 120 bins and 60 frames: at most half of the clip
        freq, time = _mask_widths(spec_augment(short, 120, 48, _gen(seed), reference_frames=16))
        assert freq <= 64 and time <= 10
    frames = torch.arange(32.0)[:, None].repeat(1, 16)
    seen = set()
    for seed in range(100):  # AST's +-10-frame roll at 128 frames is +-2 frames on a 32-frame clip
        out = feature_noise(frames, _gen(seed), reference_frames=128)
        seen.add(next(s for s in range(-10, 11) if bool(((out - frames.roll(s, 0)).abs() < 0.1).all())))
    assert seen == set(range(-2, 3))


def test_random_hop_ms():
    gen = _gen(0)
    hops = [random_hop_ms(gen) for _ in range(200)]
    assert set(hops) == {10.0, 20.0, 30.0, 40.0}
    assert [random_hop_ms(_gen(9), (12.5, 25.0)) for _ in range(3)] == [
        random_hop_ms(_gen(9), (12.5, 25.0))
    ] * 3


def test_shuffle_sampler_is_a_function_of_seed_and_epoch():
    sampler = ShuffleSampler(50, seed=3)
    first = sampler.indices(0)
    assert sorted(first) == list(range(50)) and len(sampler) == 50
    assert sampler.indices(0) == first and sampler.indices(1) != first
    assert ShuffleSampler(50, seed=4).indices(0) != first
    resumed = ShuffleSampler(50, seed=99)
    resumed.load_state_dict(sampler.state_dict())
    assert [resumed.indices(e) for e in range(3)] == [sampler.indices(e) for e in range(3)]
    with pytest.raises(ValueError, match="50 examples"):
        ShuffleSampler(10).load_state_dict(sampler.state_dict())


def test_balanced_sampler_weights_and_resume():
    labels = [[0], [0], [0], [0], [0], [0], [1], [0, 1]]  # class 0: 7 examples, class 1: 2
    sampler = BalancedSampler.from_labels(labels, seed=1)
    expected = [1 / 7] * 6 + [1 / 2, 1 / 7 + 1 / 2]
    assert torch.allclose(sampler.weights, torch.tensor(expected, dtype=torch.float64))
    draws = [i for epoch in range(400) for i in sampler.indices(epoch)]
    assert len(sampler.indices(0)) == len(labels)
    share_of_rare = sum(i >= 6 for i in draws) / len(draws)
    assert share_of_rare == pytest.approx((1 / 2 + 1 / 7 + 1 / 2) / sum(expected), abs=0.03)
    resumed = BalancedSampler(sampler.weights, seed=0)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.indices(5) == sampler.indices(5) and resumed.indices(5) != resumed.indices(6)
    with pytest.raises(ValueError, match="non-negative"):
        BalancedSampler([0.0, 0.0])
