"""Pictures: bounded time pooling, the time axis, which classes are shown, and the PNG itself."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from astcli.errors import UsageError
from astcli.plot import Pooled, clock, draw, require_matplotlib, tick_step, top_classes


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.integers(0, 300), st.lists(st.integers(1, 40), min_size=1, max_size=30),
       st.sampled_from(["mean", "max"]), st.integers(0, 2**31))
def test_pooling_matches_the_oracle_and_stays_bounded(limit, rows, blocks, reduce, seed):
    x = np.random.default_rng(seed).random((rows, 3))
    pooled = Pooled(3, limit, reduce)
    at, i = 0, 0
    while at < rows:
        size = blocks[i % len(blocks)]
        pooled.push(x[at : at + size])
        at, i = at + size, i + 1
    columns, factor = pooled.values()
    assert len(columns) <= 2 * limit
    expected = [getattr(x[j : j + factor], reduce)(0) for j in range(0, rows, factor)]
    np.testing.assert_allclose(columns, np.array(expected).reshape(-1, 3))
    assert factor == 1 or -(-rows // (factor // 2)) >= 2 * limit  # the factor only grows when it must


@pytest.mark.parametrize(("seconds", "text"), [(0, "0:00"), (9.6, "0:10"), (75, "1:15"), (3599, "59:59"),
                                               (3600, "1:00:00"), (3 * 3600 + 62, "3:01:02")])
def test_clock(seconds, text):
    assert clock(seconds) == text


def test_ticks_fit_short_and_long_files():
    assert tick_step(10) == 1 and tick_step(60) == 10 and tick_step(3600) == 600 and tick_step(3 * 3600) == 1800


def test_classes_with_events_come_first():
    activity = np.array([[0.1, 0.9, 0.2, 0.3]])
    events = [{"index": 2, "score": 0.6}, {"index": 3, "score": 0.8}, {"index": 2, "score": 0.7}]
    assert top_classes(activity, events, 3) == [3, 2, 1]


def picture(tmp_path, name, seconds, seed):
    rng = np.random.default_rng(seed)
    spectrogram, activity = Pooled(128), Pooled(4, reduce="max")
    spectrogram.push(rng.normal(size=(int(seconds * 100), 128)))
    activity.push(rng.random((int(seconds * 4), 4)))
    events = [{"label": "b", "index": 1, "start": 1.0, "end": 1.5, "score": 0.9}]
    return draw(tmp_path / name, title=name, duration=seconds, spectrogram=spectrogram, frame_seconds=0.01,
                activity=activity, cell_seconds=0.25, events=events, labels=["a", "b", "c", "d"])


def test_pictures_have_the_documented_size_and_differ(tmp_path):
    import matplotlib.image

    first, second = picture(tmp_path, "a.png", 10.0, 0), picture(tmp_path, "b.png", 3600.0, 1)
    a, b = matplotlib.image.imread(first), matplotlib.image.imread(second)
    assert a.shape[:2] == (round((3.2 + 0.32 * 4) * 100), 1200) == b.shape[:2]
    assert np.abs(a - b).mean() > 0.01


def test_missing_matplotlib_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError, match=r"pip install 'astcli\[plot\]'"):
        require_matplotlib()
