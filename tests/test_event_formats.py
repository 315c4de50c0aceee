"""Event tracks: Audacity labels, WebVTT and SubRip, checked against the formats' rules and strict parsers."""

from __future__ import annotations

import io
import re

import pytest
import srt
import webvtt

from astcli.writers import EventTrackFolderWriter, EventTrackWriter, audacity_labels, subrip, timestamp
from astcli.writers import webvtt as vtt

RECORD = {
    "file": "walk.wav", "duration": 3725.5, "error": None, "tags": [],
    "events": [
        {"label": "Dog", "index": 74, "start": 12.4, "end": 19.0, "score": 0.912},
        {"label": "Speech", "index": 0, "start": 3.0005, "end": 3725.5, "score": 0.5},
        {"label": "a <b> & c --> d", "index": 9, "start": 12.4, "end": 13.0, "score": 0.61},
        {"label": "tab\tand\nline", "index": 3, "start": 3600.0, "end": 3601.25, "score": 0.7},
    ],
}
ORDER = [(3.0005, "Speech"), (12.4, "a <b> & c --> d"), (12.4, "Dog"), (3600.0, "tab\tand\nline")]

# WebVTT (W3C) reference rules for what we write: a "WEBVTT" line, a blank line, then cues of an identifier line
# (no "-->"), a timing line, text lines without "-->", each cue followed by a blank line.
VTT_TIME = r"\d{2,}:[0-5]\d:[0-5]\d\.\d{3}"
VTT_TIMING = re.compile(rf"^({VTT_TIME}) --> ({VTT_TIME})$")
SRT_TIMING = re.compile(r"^(\d{2,}):([0-5]\d):([0-5]\d),(\d{3}) --> (\d{2,}):([0-5]\d):([0-5]\d),(\d{3})$")


def seconds(stamp: str) -> float:
    h, m, s = re.split("[:]", stamp.replace(",", "."))
    return int(h) * 3600 + int(m) * 60 + float(s)


@pytest.mark.parametrize(("value", "vtt_stamp", "srt_stamp"), [
    (0.0, "00:00:00.000", "00:00:00,000"),
    (12.4, "00:00:12.400", "00:00:12,400"),
    (59.9996, "00:01:00.000", "00:01:00,000"),
    (3725.5, "01:02:05.500", "01:02:05,500"),
    (100 * 3600 + 0.001, "100:00:00.001", "100:00:00,001"),
])
def test_timestamps(value, vtt_stamp, srt_stamp):
    assert timestamp(value) == vtt_stamp
    assert timestamp(value, ",") == srt_stamp


def test_webvtt_follows_the_rules_and_parses():
    text = vtt(RECORD)
    lines = text.split("\n")
    assert lines[:2] == ["WEBVTT", ""]
    blocks = text[len("WEBVTT\n\n"):].split("\n\n")
    assert blocks[-1] == "" and all(blocks[:-1])
    cues = [b.split("\n") for b in blocks[:-1]]
    assert [c[0] for c in cues] == ["1", "2", "3", "4"]
    for (_, timing, *body), (start, _) in zip(cues, ORDER, strict=True):
        match = VTT_TIMING.match(timing)
        assert match and seconds(match[1]) == pytest.approx(round(start, 3)) and seconds(match[2]) > seconds(match[1])
        assert len(body) == 1 and "-->" not in body[0] and "<" not in body[0] and "\t" not in body[0]
    parsed = webvtt.from_buffer(io.StringIO(text))
    assert [c.text for c in parsed] == ["Speech (0.50)", "a &lt;b&gt; &amp; c --&gt; d (0.61)", "Dog (0.91)",
                                       "tab and line (0.70)"]
    assert [c.end for c in parsed] == ["01:02:05.500", "00:00:13.000", "00:00:19.000", "01:00:01.250"]


def test_subrip_follows_the_rules_and_round_trips():
    text = subrip(RECORD)
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    for number, (block, (start, _)) in enumerate(zip(blocks[:-1], ORDER, strict=True), 1):
        index, timing, *body = block.split("\n")
        assert index == str(number) and len(body) == 1 and "-->" not in body[0]
        match = SRT_TIMING.match(timing)
        assert match and seconds(timing.split(" --> ")[0]) == pytest.approx(round(start, 3))
    subs = list(srt.parse(text, ignore_errors=False))
    assert [s.content for s in subs] == ["Speech (0.50)", "a <b> & c -> d (0.61)", "Dog (0.91)", "tab and line (0.70)"]
    assert [s.start.total_seconds() for s in subs] == [3.001, 12.4, 12.4, 3600.0]
    assert srt.compose(subs, reindex=False) == text


def test_audacity_is_three_tab_separated_columns():
    lines = audacity_labels(RECORD).splitlines()
    rows = [line.split("\t") for line in lines]
    assert all(len(r) == 3 for r in rows)
    assert [(float(a), float(b), c) for a, b, c in rows] == [
        (3.0005, 3725.5, "Speech"), (12.4, 13.0, "a <b> & c --> d"), (12.4, 19.0, "Dog"),
        (3600.0, 3601.25, "tab and line")]
    assert lines[0] == "3.000500\t3725.500000\tSpeech"


def test_no_events_make_valid_empty_tracks():
    empty = {"file": "x.wav", "duration": 1.0, "tags": [], "events": [], "error": None}
    assert vtt(empty) == "WEBVTT\n\n"
    assert list(webvtt.from_buffer(io.StringIO(vtt(empty)))) == []
    assert subrip(empty) == "" and audacity_labels(empty) == ""


def test_one_track_per_input_in_a_folder(tmp_path):
    writer = EventTrackFolderWriter(tmp_path / "tracks", "srt")
    for name in ("a/rain.wav", "b/rain.flac", "wind.ogg"):
        writer.write({**RECORD, "file": name})
    writer.write({"file": "broken.wav", "error": "empty audio"})
    writer.close()
    assert sorted(p.name for p in (tmp_path / "tracks").iterdir()) == ["rain-2.srt", "rain.srt", "wind.srt"]
    assert (tmp_path / "tracks" / "rain-2.srt").read_text(encoding="utf-8") == subrip(RECORD)


def test_stream_writer_writes_the_one_input():
    out = io.StringIO()
    writer = EventTrackWriter(out, "audacity")
    writer.write(RECORD)
    writer.close()
    assert out.getvalue() == audacity_labels(RECORD)
