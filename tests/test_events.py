"""Event detection: the activity grid, hysteresis, gaps, minimum length, block boundaries, threshold files."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from astcli.errors import ParameterError
from astcli.events import ActivityGrid, Event, EventDetector, EventOptions, detect_events, read_class_thresholds


def naive_grid(windows: list[tuple[int, int, np.ndarray]], step: int, total: int, rule: str = "mean") -> np.ndarray:
    """Oracle: for each cell, the mean of the windows whose span holds the cell's centre, or with ``"centre"``
    of those among them whose centre is nearest to the cell's (float arithmetic); the cells after the last
    one a window covers take the last window's scores."""
    cells = -(-total // step)
    out = np.zeros((cells, len(windows[0][2]) if windows else 1))
    last_covered = -1
    for k in range(cells):
        centre = (k + 0.5) * step
        covering = [(abs(start + length / 2 - centre), s) for start, length, s in windows
                    if start <= centre < start + length]
        if rule == "centre" and covering:
            nearest = min(d for d, _ in covering)
            covering = [(d, s) for d, s in covering if d == nearest]
        if covering:
            out[k] = np.mean([s for _, s in covering], axis=0)
            last_covered = k
    if windows:
        out[last_covered + 1 :] = windows[-1][2]
    return out


def naive_events(track: np.ndarray, cell: float, on: float, off: float, min_cells: int, gap_cells: int,
                 duration: float | None = None) -> list[tuple[float, float, float]]:
    """Oracle for one class: a cell-by-cell state machine whose onsets and offsets are placed where the line
    between two cell centres crosses the threshold, then gap merging, then the minimum length."""

    def crossing(t: int, threshold: float) -> float:
        if t == 0:
            return 0.0
        return (t - 0.5 + (threshold - track[t - 1]) / (track[t] - track[t - 1])) * cell

    segments, active = [], False
    for t, a in enumerate(track):
        if not active and a >= on:
            active, begin, onset = True, t, crossing(t, on)
        elif active and a < off:
            active = False
            segments.append([onset, crossing(t, off), begin, t])
    if active:
        segments.append([onset, len(track) * cell, begin, len(track)])
    merged: list[list] = []
    for segment in segments:
        if merged and segment[0] - merged[-1][1] <= gap_cells * cell + 1e-9:
            merged[-1][1], merged[-1][3] = segment[1], segment[3]
        else:
            merged.append(segment)
    out = []
    for start, end, first, last in merged:
        if duration is not None:
            end = min(end, duration)
        if end > start and end - start >= min_cells * cell - 1e-9:
            out.append((round(start, 6), round(end, 6), round(float(track[first:last].max()), 6)))
    return out


def stream(activity: np.ndarray, cell: float, options: EventOptions, blocks: list[int],
           duration: float | None = None) -> list[Event]:
    detector = EventDetector(activity.shape[1], cell, options)
    out, at = [], 0
    for size in blocks:
        out += detector.push(activity[at : at + size])
        at += size
    out += detector.push(activity[at:])
    return out + detector.finish(duration)


# -- the activity grid ----------------------------------------------------------------------------------------

def test_grid_means_the_windows_covering_each_cell_centre():
    grid = ActivityGrid(step=2, num_classes=1)
    assert grid.add(0, 8, np.array([1.0]))[1].shape == (0, 1)  # nothing final before the next window starts
    first, cells = grid.add(2, 8, np.array([0.0]))
    assert first == 0 and cells.tolist() == [[1.0]]
    first, cells = grid.finish(12)
    # cells 1-3 lie in both windows, cell 4 only in the second; cell 5's centre (11) is past the second
    # window's end (10), at the end of the audio: it takes the last window's scores
    assert first == 1 and cells[:, 0].tolist() == [0.5, 0.5, 0.5, 0.0, 0.0]
    grid = ActivityGrid(step=2, num_classes=1)
    grid.add(0, 8, np.array([1.0]))
    grid.add(2, 8, np.array([0.6]))
    assert grid.finish(12)[1][:, 0].tolist() == [0.8, 0.8, 0.8, 0.6, 0.6]  # cells 1-5 (cell 0 came out before)
    # audio shorter than half a cell: the one window covers no cell centre, and the cell takes its scores
    grid = ActivityGrid(step=10, num_classes=1)
    grid.add(0, 3, np.array([0.7]))
    assert grid.finish(3)[1][:, 0].tolist() == [0.7]


def test_the_centre_rule_takes_the_window_centred_on_each_cell():
    # 6-frame windows every 2 frames, cells of 2 frames: window j (centre 2j + 3) is centred on cell j + 1
    grid = ActivityGrid(step=2, num_classes=1, rule="centre")
    parts = [grid.add(2 * j, 6, np.array([float(j)])) for j in range(4)] + [grid.finish(12)]
    cells = np.concatenate([c for _, c in parts])[:, 0]
    # cell 0 (centre 1) is covered by window 0 only; cell 5 (centre 11) by window 3 only
    assert cells.tolist() == [0.0, 0.0, 1.0, 2.0, 3.0, 3.0]
    # an even number of hops per window: two windows are equally near, and their mean is taken
    grid = ActivityGrid(step=2, num_classes=1, rule="centre")
    parts = [grid.add(2 * j, 8, np.array([float(j)])) for j in range(3)] + [grid.finish(12)]
    assert np.concatenate([c for _, c in parts])[:, 0].tolist() == [0.0, 0.0, 0.5, 1.5, 2.0, 2.0]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 7), st.integers(1, 30), st.integers(1, 12), st.integers(0, 80), st.integers(0, 2**31),
       st.sampled_from(["mean", "centre"]))
def test_grid_matches_the_oracle(step, size, hop, extra, seed, rule):
    rng = np.random.default_rng(seed)
    total = size + extra
    hop = min(hop, size)  # windows touch or overlap, as the pipeline makes them for events
    starts = list(range(0, max(1, total - size + 1), hop))
    windows = [(s, min(size, total - s), rng.random(3)) for s in starts]
    grid = ActivityGrid(step, 3, rule)
    parts = [grid.add(s, n, scores) for s, n, scores in windows] + [grid.finish(total)]
    firsts = [f for f, _ in parts]
    got = np.concatenate([c for _, c in parts])
    assert firsts == [sum(len(c) for _, c in parts[:i]) for i in range(len(parts))]  # contiguous, in order
    np.testing.assert_allclose(got, naive_grid(windows, step, total, rule), atol=1e-12)


def test_grid_rejects_windows_out_of_order():
    grid = ActivityGrid(step=1, num_classes=1)
    grid.add(5, 4, np.array([1.0]))
    with pytest.raises(ParameterError, match="start order"):
        grid.add(0, 4, np.array([1.0]))


# -- the detector ------------------------------------------------------------------------------------------

TRACK = np.array([0.0, 0.6, 0.4, 0.2, 0.1, 0.7, 0.9, 0.2, 0.0, 0.0])[:, None]


# Cell k's activity sits at its centre, 0.1 * (k + 0.5) s. Onsets and offsets by hand, thresholds 0.5 / 0.25:
# up 0.0 -> 0.6 (cells 0-1): 0.05 + 0.1 * 0.5/0.6 = 0.13333; down 0.4 -> 0.2 (cells 2-3): 0.25 + 0.1 * 0.75 = 0.325
# up 0.1 -> 0.7 (cells 4-5): 0.45 + 0.1 * 0.4/0.6 = 0.51667; down 0.9 -> 0.2 (cells 6-7): 0.65 + 0.1 * 0.65/0.7
FIRST, SECOND = (0.133333, 0.325, 0.6), (0.516667, 0.742857, 0.9)


def spans(events: list[Event]) -> list[tuple[float, float, float]]:
    return [(e.start, e.end, e.score) for e in events]


def test_hysteresis_holds_an_event_between_the_thresholds():
    # 0.4 is below the onset (0.5) but not below the offset (0.25): the first event lasts past cell 2
    assert spans(detect_events(TRACK, 0.1)) == [FIRST, SECOND]
    # a plain threshold (offset = onset) ends it between cells 1 and 2: 0.15 + 0.1 * 0.1/0.2 = 0.2
    assert spans(detect_events(TRACK, 0.1, EventOptions(0.5, 0.5))) == [(0.133333, 0.2, 0.6),
                                                                         (0.516667, 0.707143, 0.9)]


def test_gap_merging_and_minimum_duration():
    # the gap is 0.51667 - 0.325 = 0.19 s; the events last 0.19 s and 0.23 s
    assert spans(detect_events(TRACK, 0.1, EventOptions(max_gap=0.15))) == [FIRST, SECOND]
    assert spans(detect_events(TRACK, 0.1, EventOptions(max_gap=0.2))) == [(0.133333, 0.742857, 0.9)]
    assert detect_events(TRACK, 0.1, EventOptions(min_duration=0.25)) == []
    assert spans(detect_events(TRACK, 0.1, EventOptions(min_duration=0.25, max_gap=0.2))) == [(0.133333, 0.742857,
                                                                                                0.9)]


def test_onsets_lie_between_cell_centres_where_the_activity_crosses():
    # a ramp over several cells puts the onset between the grid's lines: 0.5 is crossed 1/4 of the way
    # from the centre of cell 2 (0.4) to the centre of cell 3 (0.8), at 1 s cells: 2.5 + 0.25 = 2.75 s
    track = np.array([0.0, 0.2, 0.4, 0.8, 0.8, 0.0])[:, None]
    assert spans(detect_events(track, 1.0)) == [(2.75, 5.0 - 0.5 + 0.55 / 0.8, 0.8)]
    # an event already on in the first cell starts at 0
    assert spans(detect_events(np.array([[0.9], [0.0]]), 1.0)) == [(0.0, round(0.5 + 0.65 / 0.9, 6), 0.9)]


def test_a_nan_score_holds_the_state_and_leaves_times_and_scores_finite():
    # NaN decides nothing (the state holds); an onset right after it is placed at its cell's centre
    assert detect_events(np.array([[0.0], [np.nan], [0.9], [0.9], [0.0]]), 1.0) == [Event(0, 2.5, 4.222222, 0.9)]
    assert detect_events(np.array([[0.0], [0.9], [np.nan], [0.0]]), 1.0) == [Event(0, 1.055556, 3.5, 0.9)]


def test_an_event_open_at_the_end_closes_at_the_duration():
    track = np.array([0.0, 0.0, 0.8, 0.9])[:, None]
    # onset 0.75 + 0.5 * 0.5/0.8; the event is on after the last cell, so it ends at the audio's end
    assert detect_events(track, 0.5, duration=1.8) == [Event(0, 1.0625, 1.8, 0.9)]


def test_an_event_across_block_boundaries_is_one_event():
    track = np.zeros((100, 2))
    track[10:90, 0] = 0.9
    track[50, 0] = 0.3  # between the thresholds: no offset
    track[60:62, 1] = 0.8
    track[64:66, 1] = 0.8  # a 2-cell gap, merged with max_gap 0.2
    options = EventOptions(max_gap=0.2)
    # class 0: up 0 -> 0.9 at cell 10, down 0.9 -> 0 at cell 90; class 1: 6.0125-6.21875 and 6.4125-6.61875
    expected = [Event(0, round(0.95 + 0.1 * 0.5 / 0.9, 6), round(8.95 + 0.1 * 0.65 / 0.9, 6), 0.9),
                Event(1, 6.0125, 6.61875, 0.8)]
    for block in (1, 3, 7, 50, 100):
        assert sorted(stream(track, 0.1, options, [block] * (100 // block)), key=lambda e: (e.start, e.index)) \
            == expected


def test_events_come_out_once_they_can_no_longer_change():
    detector = EventDetector(1, 1.0, EventOptions(max_gap=2.0))
    # closed at 0.5 + 0.65/0.9 = 1.22 s, but an onset in cell 2 (after 1.5 s) could merge
    assert detector.push(np.array([[0.9], [0.0]])) == []
    assert detector.push(np.array([[0.0]])) == []  # ... and one in cell 3 (after 2.5 s) too
    # an onset in cell 4 lies after 3.5 s, more than 2 s after: final
    assert detector.push(np.array([[0.0]])) == [Event(0, 0.0, 1.222222, 0.9)]


@st.composite
def tracks(draw):
    cells = draw(st.integers(1, 60))
    classes = draw(st.integers(1, 3))
    levels = st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45, 0.5, 0.55, 0.7, 0.9, 1.0])
    values = draw(st.lists(levels, min_size=cells * classes, max_size=cells * classes))
    return np.array(values).reshape(cells, classes)


@settings(max_examples=150, deadline=None)
@given(tracks(), st.sampled_from([0.01, 0.1, 0.25, 0.32]), st.sampled_from([0.3, 0.5, 0.7]),
       st.sampled_from([0.0, 0.5, 1.0]), st.integers(0, 4), st.integers(0, 4),
       st.lists(st.integers(1, 9), max_size=20), st.booleans())
def test_streaming_matches_the_oracle_and_keeps_the_rules(activity, cell, on, off_share, min_cells, gap_cells,
                                                            blocks, clip):
    off = round(on * off_share, 6)
    options = EventOptions(on, off, min_duration=min_cells * cell, max_gap=gap_cells * cell)
    duration = (len(activity) - 0.5) * cell if clip else None
    streamed = stream(activity, cell, options, blocks, duration)
    whole = detect_events(activity, cell, options, duration)
    assert sorted(streamed, key=lambda e: (e.start, e.index)) == whole  # any blocks == all at once
    for cls in range(activity.shape[1]):
        mine = [(e.start, e.end, e.score) for e in whole if e.index == cls]
        assert mine == naive_events(activity[:, cls], cell, on, off, min_cells, gap_cells, duration)
        end_of_audio = duration if clip else len(activity) * cell
        for e in mine:
            assert 0 <= e[0] < e[1] <= end_of_audio + 1e-9
            assert e[1] - e[0] >= options.min_duration - 1e-6
        for (_, end, _), (start, _, _) in itertools.pairwise(mine):
            assert start - end > options.max_gap - 1e-6  # no overlap, and gaps larger than max_gap


# -- options and threshold files ------------------------------------------------------------------------------

def test_a_json_threshold_must_be_a_number(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"Dog": true}', encoding="utf-8")
    with pytest.raises(ParameterError, match="expected a number"):
        read_class_thresholds(path, ["Dog"])


def test_cells_must_have_a_length():
    with pytest.raises(ParameterError, match="cell_seconds"):
        EventDetector(1, 0.0)


def test_options_reject_impossible_values():
    with pytest.raises(ParameterError, match="onset_threshold"):
        EventOptions(onset_threshold=0.0)
    with pytest.raises(ParameterError, match="offset_threshold"):
        EventOptions(onset_threshold=0.4, offset_threshold=0.6)
    with pytest.raises(ParameterError, match="min_duration"):
        EventOptions(min_duration=-1)
    with pytest.raises(ParameterError, match="max_gap"):
        EventOptions(max_gap=float("nan"))
    with pytest.raises(ParameterError, match="activity"):
        EventOptions(activity="median")
    assert EventOptions(0.6).offset == 0.3


def test_class_thresholds_from_csv_and_json(tmp_path):
    labels = ["Dog", "Cat", "Speech"]
    (tmp_path / "t.csv").write_text("label,onset,offset\nCat,0.8,0.6\nSpeech,0.4,\n2,0.3,0.1\n", encoding="utf-8")
    assert read_class_thresholds(tmp_path / "t.csv", labels) == {1: (0.8, 0.6), 2: (0.3, 0.1)}
    (tmp_path / "t.json").write_text(json.dumps({"Dog": 0.9, "Cat": [0.7, 0.2]}), encoding="utf-8")
    assert read_class_thresholds(tmp_path / "t.json", labels) == {0: (0.9, 0.45), 1: (0.7, 0.2)}


def test_per_class_thresholds_apply_to_their_class_only():
    track = np.array([[0.0, 0.0], [0.6, 0.6], [0.0, 0.0]])
    options = EventOptions(0.5, class_thresholds={1: (0.7, 0.3)})
    # class 0 crosses 0.5 at 0.5 + 0.5/0.6 s and 0.25 at 1.5 + 0.35/0.6 s; class 1 never reaches 0.7
    assert detect_events(track, 1.0, options) == [Event(0, 1.333333, 2.083333, 0.6)]


@pytest.mark.parametrize(("text", "problem"), [
    ("label,onset\nBird,0.5\n", "unknown class 'Bird'"),
    ("label,onset,offset\nDog,0.5,0.7\n", "0 <= offset <= onset <= 1"),
    ("name,value\nDog,0.5\n", "header label,onset"),
    ("label,onset\nDog,high\n", "could not convert"),
    ("label,onset\n\u00b2,0.5\n", "unknown class '\u00b2'"),  # a digit to isdigit(), not to int()
    ("label,onset\n" + "9" * 5000 + ",0.5\n", "unknown class"),  # past int()'s digit limit
])
def test_bad_threshold_files_name_the_problem(tmp_path, text, problem):
    path = tmp_path / "t.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ParameterError, match="class_thresholds") as info:
        read_class_thresholds(path, ["Dog"])
    assert problem in str(info.value)
    with pytest.raises(ParameterError, match="cannot read"):
        read_class_thresholds(tmp_path / "missing.csv", ["Dog"])
