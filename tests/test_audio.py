import os

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from astcli.audio import AUDIO_EXTENSIONS, AudioInfo, audio_info, load_audio, resample, stream_audio
from astcli.errors import AudioError, AudioWarning


@pytest.mark.parametrize(
    ("name", "subtype", "atol"),
    [
        ("u8.wav", "PCM_U8", 1 / 128),
        ("s16.wav", "PCM_16", 2**-15),
        ("s24.wav", "PCM_24", 2**-23),
        ("s32.wav", "PCM_32", 1e-7),
        ("float.wav", "FLOAT", 0.0),
        ("s16.flac", "PCM_16", 2**-15),
        ("s24.flac", "PCM_24", 2**-23),
        ("s16.aiff", "PCM_16", 2**-15),
        ("s16.au", "PCM_16", 2**-15),
        ("float.w64", "FLOAT", 0.0),
        ("s16.caf", "PCM_16", 2**-15),
    ],
)
def test_lossless_formats_round_trip(signal, write_audio, name, subtype, atol):
    x = signal("tones", seconds=1.0)
    y = load_audio(write_audio(name, x, subtype=subtype))
    assert y.dtype == torch.float32 and y.shape == (16000,) and y.is_contiguous()
    np.testing.assert_allclose(y.numpy(), x, rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("name", "rate", "fmt", "subtype"),
    [
        ("vorbis.ogg", 16000, "OGG", "VORBIS"),
        ("opus.opus", 48000, "OGG", "OPUS"),
        ("mpeg2.mp3", 16000, "MP3", "MPEG_LAYER_III"),
        ("mpeg1.mp3", 44100, "MP3", "MPEG_LAYER_III"),
    ],
)
def test_lossy_formats(signal, write_audio, name, rate, fmt, subtype):
    assert subtype in sf.available_subtypes(fmt), f"this libsndfile cannot write {fmt}/{subtype}"
    x = signal("tones", seconds=2.0)
    path = write_audio(name, soxr.resample(x, 16000, rate), rate, format=fmt, subtype=subtype)
    assert audio_info(path).duration == pytest.approx(2.0, abs=1e-3)
    y = load_audio(path).numpy()
    assert abs(len(y) - 32000) <= 16  # +-1 ms at 16 kHz
    n = min(len(x), len(y))
    assert np.corrcoef(x[:n], y[:n])[0, 1] > 0.98


def test_resamples_48k_to_16k(write_audio):
    t = np.arange(96000) / 48000
    y = load_audio(write_audio("48k.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 48000, subtype="FLOAT"))
    assert y.shape == (32000,)
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)
    np.testing.assert_allclose(y.numpy()[500:-500], expected[500:-500], atol=1e-3)


@pytest.mark.parametrize("rate", [44100, 96000])
def test_stereo_vorbis_to_16k_mono(signal, write_audio, rate):
    x = soxr.resample(signal("chirp", seconds=1.5), 16000, rate)
    path = write_audio(f"stereo{rate}.ogg", np.stack([x, 0.5 * x], axis=1), rate, subtype="VORBIS")
    y = load_audio(path)
    assert y.dim() == 1 and abs(len(y) - 24000) <= 16


def test_stereo_is_averaged(signal, write_audio):
    left, right = signal("tones", seconds=0.5), signal("chirp", seconds=0.5)
    y = load_audio(write_audio("stereo.wav", np.stack([left, right], axis=1), subtype="FLOAT"))
    np.testing.assert_allclose(y.numpy(), (left + right) / 2, rtol=0, atol=1e-7)


def test_audio_info(write_audio):
    path = write_audio("info.wav", np.zeros((110250, 2), np.float32), 44100, subtype="PCM_24")
    assert audio_info(path) == AudioInfo(str(path), 2.5, 44100, 2, 110250, "WAV", "PCM_24")


def test_extensions_are_lowercase_dotted():
    assert {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff"} <= AUDIO_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in AUDIO_EXTENSIONS)


def _header_only_wav(path):
    sf.write(path, np.zeros(0, np.float32), 16000)


def _wav_cut_in_header(path):
    sf.write(path, np.zeros(1000, np.float32), 16000)
    path.write_bytes(path.read_bytes()[:30])


def _float_wav_with(value):
    def write(path):
        x = np.zeros(4000, np.float32)
        x[1234] = value
        sf.write(path, x, 16000, subtype="FLOAT")

    return write


BAD_FILES = {  # name: (file name, make it, expected reason, whether the header alone shows it)
    "missing": ("missing.wav", lambda p: None, "no such file", True),
    "directory": ("folder.wav", lambda p: p.mkdir(), "is a directory", True),
    "zero-length": ("zero.wav", lambda p: p.write_bytes(b""), "empty audio", True),
    "header-only": ("header.wav", _header_only_wav, "empty audio", True),
    "random-bytes": ("noise.wav", lambda p: p.write_bytes(np.random.default_rng(1).bytes(5000)), "", True),
    "cut-header": ("cut.wav", _wav_cut_in_header, "corrupt", True),
    "text": ("notes.txt", lambda p: p.write_text("not audio\n" * 50), "not a recognised audio format", True),
    "nan": ("nan.wav", _float_wav_with(np.nan), "NaN or Inf", False),
    "inf": ("inf.wav", _float_wav_with(-np.inf), "NaN or Inf", False),
}


def test_permission_denied_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "locked.wav"
    sf.write(path, np.zeros(1000, np.float32), 16000)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the open fail the way it does for everyone else
        real_open = os.open

        def denying_open(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "open", denying_open)
    for read in (load_audio, lambda p: list(stream_audio(p)), audio_info):
        with pytest.raises(AudioError) as caught:
            read(path)
        assert str(caught.value) == f"{path}: permission denied"


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_raise_one_line_audio_error(tmp_path, case):
    name, make, reason, header_shows_it = BAD_FILES[case]
    path = tmp_path / name
    make(path)
    readers = [load_audio, lambda p: list(stream_audio(p)), lambda p: list(stream_audio(p, 8000, 0.01))]
    for read in [*readers, audio_info] if header_shows_it else readers:
        with pytest.raises(AudioError) as caught:
            read(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and reason in message and "\n" not in message


def test_nan_found_while_streaming(write_audio):
    x = np.zeros(32000, np.float32)
    x[-5] = np.nan
    blocks = stream_audio(write_audio("late-nan.wav", x, subtype="FLOAT"), block_seconds=0.5)
    assert len(next(blocks)) == 8000
    with pytest.raises(AudioError, match="NaN"):
        list(blocks)


def test_corrupt_data_after_a_good_header(signal, write_audio, tmp_path):
    good = write_audio("good.mp3", signal("tones", seconds=2.0), format="MP3").read_bytes()
    path = tmp_path / "bad.mp3"
    path.write_bytes(good[: len(good) // 2] + np.random.default_rng(2).bytes(3000))
    # decoded as far as the data goes, and said so: a warning with the header's length and the decoded one
    with pytest.warns(AudioWarning, match=r"decoding stopped after 0\.\d+ s of the 2\.000 s the header declares"):
        y = load_audio(path)
    assert 0.5 * 16000 < len(y) < 1.2 * 16000


@pytest.fixture(scope="module")
def stream_files(signal, write_audio):
    x = signal("bursts", seconds=2.3, seed=3)
    stereo44 = np.stack([soxr.resample(x, 16000, 44100), soxr.resample(x[::-1], 16000, 44100)], axis=1)
    return [
        write_audio("mono16.wav", x, subtype="PCM_16"),
        write_audio("stereo44.wav", stereo44, 44100, subtype="FLOAT"),
        write_audio("vorbis48.ogg", soxr.resample(x, 16000, 48000), 48000, subtype="VORBIS"),
    ]


@settings(max_examples=25, deadline=None)
@given(
    index=st.integers(0, 2),
    block_seconds=st.floats(0.01, 3.0),
    sample_rate=st.sampled_from([16000, 8000]),
)
def test_stream_equals_load(stream_files, index, block_seconds, sample_rate):
    path = stream_files[index]
    blocks = list(stream_audio(path, sample_rate, block_seconds))
    assert all(len(b) > 0 and b.dtype == torch.float32 and b.dim() == 1 for b in blocks)
    streamed, whole = torch.cat(blocks), load_audio(path, sample_rate)
    assert streamed.shape == whole.shape
    assert (streamed - whole).abs().max() <= 1e-5


def test_resample_matches_load_audio(signal, write_audio):
    x = signal("chirp", seconds=1.0)
    y = load_audio(write_audio("rs.wav", x, 16000, subtype="FLOAT"), 22050)
    assert torch.equal(resample(torch.from_numpy(x), 16000, 22050), y)
    assert torch.equal(resample(torch.from_numpy(x).double(), 16000, 16000), torch.from_numpy(x))
