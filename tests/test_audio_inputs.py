"""Audio inputs from real archives: pipes and named pipes, truncated files, absurd samples, odd names."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

import astcli.audio
from astcli.audio import AudioStream, load_audio, read_path_list, require_frame, stream_audio
from astcli.errors import AudioError, AudioWarning, UsageError

TONE = (0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32)


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    paths = {}
    for ext, kwargs in (("wav", {"subtype": "PCM_16"}), ("flac", {}), ("ogg", {"subtype": "VORBIS"}),
                        ("aiff", {"subtype": "PCM_16"}), ("mp3", {"format": "MP3"})):
        paths[ext] = folder / f"tone.{ext}"
        sf.write(paths[ext], TONE, 16000, **kwargs)
    return paths


def _decode_in_child(path_arg: str, stdin_file=None, shell: str | None = None) -> subprocess.CompletedProcess:
    """Decode ``path_arg`` in a fresh process (pipes are per process): prints samples, declared, notice."""
    code = ("import sys; from astcli.audio import AudioStream\n"
            "s = AudioStream(sys.argv[1]); n = sum(len(b) for b in s)\n"
            "print(n, s.declared_frames, s.notice)")
    if shell:
        return subprocess.run(["bash", "-c", shell.format(py=f"{sys.executable} -c '{code}'")], capture_output=True,
                              text=True, timeout=60)
    return subprocess.run([sys.executable, "-c", code, path_arg], stdin=stdin_file, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("ext", ["wav", "aiff", "ogg"])
def test_streamable_formats_decode_from_stdin_pipes(wavs, ext):
    with open(wavs[ext], "rb") as source:
        cat = subprocess.Popen(["cat"], stdin=source, stdout=subprocess.PIPE)
        done = _decode_in_child("/dev/stdin", cat.stdout)
        cat.wait()
    assert done.returncode == 0, done.stderr
    samples, _, notice = done.stdout.split()
    assert abs(int(samples) - 32000) <= (0 if ext != "ogg" else 16) and notice == "None"


def test_process_substitution_decodes(wavs):
    done = _decode_in_child("", shell=f"{{py}} <(cat {wavs['wav']})")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["32000", "32000", "None"]


@pytest.mark.parametrize("ext", ["flac", "mp3"])
def test_seeking_formats_in_a_pipe_are_one_clear_line(wavs, ext):
    with open(wavs[ext], "rb") as source:
        cat = subprocess.Popen(["cat"], stdin=source, stdout=subprocess.PIPE)
        done = _decode_in_child("/dev/stdin", cat.stdout)
        cat.stdout.close()
        cat.wait()
    last = done.stderr.strip().splitlines()[-1]
    assert "AudioError: /dev/stdin: cannot be decoded from a pipe" in last and "save it to a file" in last


def test_named_pipe_with_a_writer_decodes(wavs, tmp_path):
    fifo = tmp_path / "live.wav"
    os.mkfifo(fifo)
    data = wavs["wav"].read_bytes()

    def feed():
        with open(fifo, "wb") as w:
            w.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    decoded = load_audio(fifo)
    writer.join()
    np.testing.assert_allclose(decoded.numpy(), TONE, atol=2**-15)


def test_named_pipe_without_a_writer_is_an_error_not_a_hang(tmp_path, monkeypatch):
    fifo = tmp_path / "nobody.wav"
    os.mkfifo(fifo)
    monkeypatch.setattr(astcli.audio, "PIPE_WAIT_SECONDS", 0.2)
    with pytest.raises(AudioError, match=r"nobody.wav: no data from the pipe within 0.2 s"):
        AudioStream(fifo)


def test_devices_are_refused(monkeypatch):
    with pytest.raises(AudioError, match="not a file or pipe"):
        AudioStream("/dev/null")


def _truncate(path, tmp_path, keep: float):
    data = path.read_bytes()
    out = tmp_path / f"cut_{path.name}"
    out.write_bytes(data[: int(len(data) * keep)])
    return out


@pytest.mark.parametrize(("ext", "pattern"), [
    ("wav", r"truncated: the header declares 2\.000 s, the file holds 0\.6\d\d s"),
    ("aiff", r"truncated: the header declares 1\.99\d s, the file holds 0\.6\d\d s"),
    ("mp3", r"truncated: the header declares 2\.000 s, the file holds 0\.\d+ s"),
    ("flac", r"decoding stopped after 0\.\d+ s of the 2\.000 s the header declares \(corrupt or truncated data\)"),
])
def test_truncated_files_keep_their_audio_and_say_so(wavs, tmp_path, ext, pattern):
    cut = _truncate(wavs[ext], tmp_path, 1 / 3)
    stream = stream_audio(cut, 16000, block_seconds=0.25)
    decoded = torch.cat(list(stream))
    assert stream.notice is not None and __import__("re").fullmatch(pattern, stream.notice), stream.notice
    assert 0 < len(decoded) < 32000 and stream.decoded_frames == len(decoded)
    n = len(decoded) - 2000  # the start is the file's own audio (lossy codecs: close to it)
    assert np.corrcoef(decoded[:n].numpy(), TONE[:n])[0, 1] > 0.9
    with pytest.warns(AudioWarning, match=pattern):
        load_audio(cut)


def test_truncated_wav_in_a_pipe_says_so_too(wavs, tmp_path):
    cut = _truncate(wavs["wav"], tmp_path, 1 / 3)
    with open(cut, "rb") as source:
        cat = subprocess.Popen(["cat"], stdin=source, stdout=subprocess.PIPE)
        done = _decode_in_child("/dev/stdin", cat.stdout)
        cat.wait()
    assert done.stdout.startswith("10652 32000 truncated: the header declares 2.000 s, the file holds 0.666 s")


def test_streamed_wav_of_unknown_length_is_not_truncated(tmp_path):
    """ffmpeg writing to a pipe leaves the WAV size fields at 0xFFFFFFFF: unknown, not a lie."""
    path = tmp_path / "streamed.wav"
    sf.write(path, TONE, 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    stream = AudioStream(path)
    assert sum(len(b) for b in stream) == 32000 and stream.declared_frames is None and stream.notice is None


def _float_wav(tmp_path, name, values):
    path = tmp_path / name
    sf.write(path, np.asarray(values, np.float32), 16000, subtype="FLOAT")
    return path


@pytest.mark.parametrize(("values", "message"), [
    (np.frombuffer(np.random.default_rng(0).bytes(4 * 8000), np.float32), r"NaN or Inf|samples reach"),
    (np.r_[np.zeros(7000), 1e19, np.zeros(1000)], r"samples reach 1e\+19, outside the accepted range \+-1000"),
    (np.r_[np.zeros(7000), -1e30, np.zeros(1000)], r"samples reach 1e\+30"),
    (np.r_[np.zeros(7000), 3.0e38, np.zeros(1000)], r"samples reach 3e\+38"),
])
def test_absurd_samples_are_errors(tmp_path, values, message):
    path = _float_wav(tmp_path, "absurd.wav", values)
    with pytest.raises(AudioError, match=message):
        load_audio(path)
    with pytest.raises(AudioError, match=message):
        list(stream_audio(path, 16000, block_seconds=0.1))


def test_loud_but_plausible_float_audio_is_accepted(tmp_path):
    loud = np.r_[TONE * 3000, -1000.0]  # peaks at 900 and -1000: within the range
    assert load_audio(_float_wav(tmp_path, "hot.wav", loud)).abs().max() == 1000.0
    with pytest.raises(AudioError, match=r"samples reach 1e\+03"):
        load_audio(_float_wav(tmp_path, "hotter.wav", np.r_[TONE, 1000.5]))


@pytest.mark.parametrize(("samples", "rate", "ok"), [(399, 16000, False), (400, 16000, True), (0, 16000, False),
                                                     (1101, 44100, False), (1102, 44100, True)])
def test_one_frame_minimum(samples, rate, ok):
    if ok:
        require_frame(samples, rate, "clip")
    else:
        pattern = rf"clip: too short: {samples} samples .* at {rate} Hz; at least one 25 ms"
        with pytest.raises(AudioError, match=pattern):
            require_frame(samples, rate, "clip")


def test_names_that_are_not_utf8(tmp_path):
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9\n\t-x.wav")
    sf.write(os.fsencode(name), TONE, 16000)
    assert len(load_audio(name)) == 32000
    with pytest.raises(AudioError) as caught:
        load_audio(name + ".missing")
    assert "\n" not in str(caught.value) and str(caught.value).endswith("no such file")


def test_path_lists_with_bom_crlf_and_raw_bytes():
    data = b"\xef\xbb\xbfa.wav\r\n\r\nsub dir/b.flac\r\ncaf\xe9.wav\n  \nlast.ogg"
    assert read_path_list(data) == ["a.wav", "sub dir/b.flac", os.fsdecode(b"caf\xe9.wav"), "last.ogg"]


@pytest.mark.parametrize("head", [b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC\x00\x00", b"OggS\x00\x02", b"ID3\x04",
                                  b"ok.wav\nbinary\x00junk"])
def test_audio_on_stdin_instead_of_paths_is_a_usage_error(head):
    with pytest.raises(UsageError, match=r"not a list of paths.*/dev/stdin"):
        read_path_list(head + b"\x00" * 40)


def test_finish_checks_the_length_at_the_target_rate(tmp_path, wavs):
    one = _write_tmp(tmp_path, "one44.wav", np.array([0.5], np.float32), 44100)
    stream = stream_audio(one, 16000)
    assert sum(len(b) for b in stream) == stream.samples == 0
    with pytest.raises(AudioError, match=r"one44.wav: too short: 0 samples \(0 ms\) at 16000 Hz"):
        stream.finish()
    sliver = tmp_path / "sliver.wav"
    sliver.write_bytes(wavs["wav"].read_bytes()[: 44 + 200])
    stream = stream_audio(sliver, 16000)
    list(stream)
    with pytest.raises(AudioError, match=r"too short: 100 samples .*\(truncated: the header declares 2.000 s"):
        stream.finish()
    stream = stream_audio(_truncate(wavs["wav"], tmp_path, 0.5), 16000)
    list(stream)
    assert stream.finish() == stream.notice and stream.notice.startswith("truncated")


def _write_tmp(tmp_path, name, data, rate):
    sf.write(tmp_path / name, data, rate)
    return tmp_path / name
