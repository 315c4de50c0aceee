import csv
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from astcli.audio import AUDIO_EXTENSIONS, load_audio
from astcli.errors import DatasetError, ParameterError
from astcli.train.datasets import (
    download_esc50,
    fold_split,
    load_audioset,
    load_dataset,
    load_esc50,
    load_folder,
    load_manifest,
    load_speechcommands,
    run_splits,
)


def _wav(path: Path, seconds: float = 0.1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(16000 * seconds), dtype=np.float32), 16000)
    return path


def _write_csv(path: Path, rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


ESC50_CATEGORIES = ["dog", "rooster", "pig"]


def _make_esc50(root: Path) -> Path:
    rows = [["filename", "fold", "target", "category", "esc10", "src_file", "take"]]
    for fold in range(1, 6):
        for target, category in enumerate(ESC50_CATEGORIES):
            name = f"{fold}-{target}-A-{target}.wav"
            _wav(root / "audio" / name)
            rows.append([name, fold, target, category, "False", "100", "A"])
    rows.append(["1-999-A-0.wav", 1, 0, "dog", "True", "999", "A"])  # no audio file
    rows.append(["1-0-A-0.wav", 1, "x", "dog", "True", "0", "A"])  # malformed target
    _write_csv(root / "meta" / "esc50.csv", rows)
    return root


def test_esc50_layout_folds_and_skipped_rows(tmp_path):
    ds = load_esc50(_make_esc50(tmp_path / "ESC-50"))
    assert ds.name == "esc50" and not ds.multi_label
    assert ds.classes == ESC50_CATEGORIES
    assert ds.folds == [1, 2, 3, 4, 5]
    assert len(ds.examples) == 15 and ds.skipped == 2
    first = ds.examples[0]
    assert Path(first.path).is_file() and first.labels == [0] and first.fold == 1
    train, test = fold_split(ds, 2)
    assert len(train) == 12 and len(test) == 3
    assert all(ds.examples[i].fold == 2 for i in test)
    assert sorted(train + test) == list(range(15))
    with pytest.raises(DatasetError, match="no fold 7"):
        fold_split(ds, 7)


def test_esc50_detected_from_directory_and_name(tmp_path):
    root = _make_esc50(tmp_path / "ESC-50")
    assert load_dataset(root).classes == ESC50_CATEGORIES
    assert load_dataset("esc50", data_dir=root).folds == [1, 2, 3, 4, 5]


def test_esc50_missing_meta_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match=r"esc50\.csv") as info:
        load_esc50(tmp_path)
    assert "\n" not in str(info.value)


def test_esc50_all_rows_bad_is_an_error(tmp_path):
    _write_csv(
        tmp_path / "meta" / "esc50.csv", [["filename", "fold", "target", "category"], ["a.wav", 1, 0, "dog"]]
    )
    with pytest.raises(DatasetError, match="no usable examples"):
        load_esc50(tmp_path)


def _make_speechcommands(root: Path) -> Path:
    for word in ("yes", "dog", "no"):
        for i in range(3):
            _wav(root / word / f"spk{i}_nohash_0.wav")
    _wav(root / "_background_noise_" / "white_noise.wav", 0.5)
    (root / "_background_noise_" / "README.md").write_text("noise")
    (root / "validation_list.txt").write_text("dog/spk0_nohash_0.wav\nyes/spk1_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("no/spk2_nohash_0.wav\nno/gone_nohash_0.wav\n\n")
    return root


def test_speechcommands_splits_classes_and_noise(tmp_path):
    ds = load_speechcommands(_make_speechcommands(tmp_path / "sc"))
    assert ds.classes == ["dog", "no", "yes"]
    assert not ds.multi_label and ds.folds is None
    assert len(ds.examples) == 9 and ds.skipped == 1  # the listed file that does not exist
    rel = {
        split: sorted("/".join(Path(ds.examples[i].path).parts[-2:]) for i in idx)
        for split, idx in ds.splits.items()
    }
    assert rel["validation"] == ["dog/spk0_nohash_0.wav", "yes/spk1_nohash_0.wav"]
    assert rel["test"] == ["no/spk2_nohash_0.wav"]
    assert len(rel["train"]) == 6
    assert [Path(p).name for p in ds.noise_files] == ["white_noise.wav"]
    for example in ds.examples:
        assert ds.classes[example.labels[0]] == Path(example.path).parent.name
    assert load_dataset(tmp_path / "sc").name == "speechcommands"
    assert load_dataset("speechcommands", tmp_path / "sc").classes == ds.classes


def test_run_splits_follow_folds_fixed_splits_or_a_stratified_holdout(tmp_path):
    esc = load_esc50(_make_esc50(tmp_path / "ESC-50"))
    folds = run_splits(esc, None, 0.1)
    assert [s.fold for s in folds] == [1, 2, 3, 4, 5]
    for s in folds:  # the fold is the test; validation: one clip per class of the other folds
        assert {esc.examples[i].fold for i in s.test} == {s.fold} and len(s.test) == 3
        assert len(s.train) == 9 and sorted(esc.examples[i].labels[0] for i in s.validation) == [0, 1, 2]
        assert s.fold not in {esc.examples[i].fold for i in s.train + s.validation}
        assert sorted(s.train + s.validation + s.test) == list(range(15))
    assert [s.fold for s in run_splits(esc, [2, 4], 0.1)] == [2, 4]
    (flat,) = run_splits(esc, [], 1 / 3)  # no cross-validation: a third of each class held out
    assert flat.fold is None and len(flat.validation) == 6 and sorted(flat.train + flat.validation) == list(range(15))
    assert [esc.examples[i].labels[0] for i in flat.validation].count(0) == 2  # round(5 / 3) per class
    assert run_splits(esc, [], 1 / 3, seed=1)[0].validation != flat.validation
    with pytest.raises(ParameterError, match="names fold 7") as caught:
        run_splits(esc, [7], 0.1)
    assert caught.value.parameter == "folds"
    sc = load_speechcommands(_make_speechcommands(tmp_path / "sc"))
    (fixed,) = run_splits(sc, None, 0.1)
    assert (fixed.train, fixed.validation, fixed.test) == tuple(tuple(sc.splits[k]) for k in ("train", "validation",
                                                                                              "test"))
    with pytest.raises(ParameterError, match="defines no folds"):
        run_splits(sc, [1], 0.1)
    smaller = fixed.without({fixed.train[0]: "unreadable", fixed.test[0]: "unreadable"})
    assert smaller.train == fixed.train[1:] and smaller.test == () and smaller.validation == fixed.validation


def test_speechcommands_without_lists_is_an_error(tmp_path):
    _wav(tmp_path / "dog" / "a.wav")
    with pytest.raises(DatasetError, match=r"validation_list\.txt"):
        load_speechcommands(tmp_path)


def _make_audioset(root: Path) -> tuple[Path, Path]:
    labels = root / "class_labels_indices.csv"
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_text(
        "index,mid,display_name\n"
        '0,/m/09x0r,"Speech"\n'
        '1,/m/0bt9lr,"Dog, domestic"\n'
        '2,/m/05zppz,"Male speech, man speaking"\n'
    )
    _wav(root / "audio" / "a.wav")
    data = {
        "data": [
            {"wav": "audio/a.wav", "labels": "/m/09x0r,/m/05zppz"},
            {"wav": str(_wav(root / "elsewhere" / "b.wav")), "labels": "/m/0bt9lr"},  # absolute path
            {"wav": "audio/a.wav", "labels": "/m/09x0r,/m/unknown"},  # unknown mid
            {"wav": "audio/missing.wav", "labels": "/m/09x0r"},  # missing file
            {"wav": "audio/a.wav"},  # no labels
        ]
    }
    datafile = root / "train_data.json"
    datafile.write_text(json.dumps(data))
    return datafile, labels


def test_audioset_json_with_quoted_display_names(tmp_path):
    datafile, labels = _make_audioset(tmp_path / "as")
    ds = load_audioset(datafile, labels)
    assert ds.multi_label and ds.folds is None
    assert ds.classes == ["Speech", "Dog, domestic", "Male speech, man speaking"]
    assert [e.labels for e in ds.examples] == [[0, 2], [1]]
    assert Path(ds.examples[0].path) == tmp_path / "as" / "audio" / "a.wav"
    assert ds.skipped == 3
    assert load_dataset(datafile).classes == ds.classes
    assert load_dataset("audioset", datafile).skipped == 3


def test_audioset_bad_json_is_an_error(tmp_path):
    _, labels = _make_audioset(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(DatasetError, match=r"bad\.json"):
        load_audioset(bad, labels)
    with pytest.raises(DatasetError, match=r"nothere\.csv"):
        load_audioset(tmp_path / "train_data.json", tmp_path / "nothere.csv")


def test_folder_layout(tmp_path):
    _wav(tmp_path / "cat" / "a.wav")
    _wav(tmp_path / "cat" / "nested" / "b.FLAC")
    _wav(tmp_path / "bird" / "c.wav")
    (tmp_path / "bird" / "notes.txt").write_text("not audio")
    (tmp_path / "bird" / "._c.wav").write_bytes(b"resource fork")
    (tmp_path / "empty").mkdir()
    ds = load_folder(tmp_path)
    assert ds.classes == ["bird", "cat"] and not ds.multi_label
    assert [(Path(e.path).name, e.labels) for e in ds.examples] == [
        ("c.wav", [0]),
        ("a.wav", [1]),
        ("b.FLAC", [1]),
    ]
    assert load_dataset(tmp_path).classes == ["bird", "cat"]


def test_folder_reads_every_extension_that_tagging_reads(tmp_path):
    for name, fmt in (("a.caf", "CAF"), ("b.au", "AU"), ("c.w64", "W64")):
        path = tmp_path / "real" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.zeros(1600, dtype=np.float32), 16000, format=fmt)
    for ext in AUDIO_EXTENSIONS:  # the one list `ast tag DIR` expands directories with
        (tmp_path / "listed").mkdir(exist_ok=True)
        (tmp_path / "listed" / f"clip{ext}").write_bytes(b"")
    ds = load_folder(tmp_path)
    assert ds.classes == ["listed", "real"]
    names = {Path(e.path).name for e in ds.examples}
    assert {f"clip{ext}" for ext in AUDIO_EXTENSIONS} | {"a.caf", "b.au", "c.w64"} == names
    real = [e.path for e in ds.examples if e.labels == [1]]
    assert [load_audio(p).shape[0] for p in real] == [1600, 1600, 1600]


def test_folder_without_audio_is_an_error(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(DatasetError, match="no usable examples"):
        load_folder(tmp_path)
    with pytest.raises(DatasetError, match="no such folder"):
        load_folder(tmp_path / "nope")


def test_manifest_multi_label_with_folds(tmp_path):
    _wav(tmp_path / "clips" / "a.wav")
    _wav(tmp_path / "clips" / "b.wav")
    _wav(tmp_path / "clips" / "c.wav")
    manifest = _write_csv(
        tmp_path / "manifest.csv",
        [
            ["path", "labels", "fold"],
            ["clips/a.wav", "speech;music", 1],
            ["clips/b.wav", "music", 2],
            ["clips/c.wav", " dog ", 2],
            ["clips/missing.wav", "cat", 1],  # missing file: skipped, its label still a class
            ["clips/a.wav", "", 1],  # no label
            ["clips/b.wav", "music", "two"],  # malformed fold
        ],
    )
    ds = load_manifest(manifest)
    assert ds.name == "manifest" and ds.multi_label
    assert ds.classes == ["cat", "dog", "music", "speech"]
    assert [(e.labels, e.fold) for e in ds.examples] == [([2, 3], 1), ([2], 2), ([1], 2)]
    assert ds.folds == [1, 2] and ds.skipped == 3
    assert Path(ds.examples[0].path) == tmp_path / "clips" / "a.wav"
    assert load_dataset(manifest).classes == ds.classes


def test_manifest_single_label_without_folds(tmp_path):
    _wav(tmp_path / "a.wav")
    manifest = _write_csv(tmp_path / "m.csv", [["path", "labels"], ["a.wav", "dog"]])
    ds = load_manifest(manifest)
    assert not ds.multi_label and ds.folds is None and ds.classes == ["dog"]
    with pytest.raises(DatasetError, match="no fold"):
        fold_split(ds, 1)


def test_manifest_header_errors(tmp_path):
    manifest = _write_csv(tmp_path / "m.csv", [["file", "label"], ["a.wav", "dog"]])
    with pytest.raises(DatasetError, match="missing column"):
        load_manifest(manifest)
    with pytest.raises(DatasetError, match=r"nothere\.csv"):
        load_dataset(tmp_path / "nothere.csv")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("imagenet", "unknown dataset"),
        ("speechcommands", "needs a data dir"),
        ("audioset", "needs a data path"),
    ],
)
def test_load_dataset_errors(name, match):
    with pytest.raises(DatasetError, match=match):
        load_dataset(name)


def test_missing_paths_and_class_lists_are_named(tmp_path):
    with pytest.raises(DatasetError, match=r"^nope/: no such file or folder$"):
        load_dataset("nope/")
    datafile = tmp_path / "train.json"
    datafile.write_text('{"data": []}')
    with pytest.raises(DatasetError) as missing:
        load_dataset(datafile)
    assert str(missing.value).startswith(f"{datafile}: no class list at {tmp_path / 'class_labels_indices.csv'} ")


def test_a_one_class_dataset_is_warned_about(tmp_path, capsys):
    (tmp_path / "dog").mkdir()
    for i in range(2):
        sf.write(tmp_path / "dog" / f"{i}.wav", np.zeros(1600, np.float32), 16000)
    assert load_dataset(tmp_path).classes == ["dog"]
    assert capsys.readouterr().err == (f"ast: warning: {tmp_path}: every clip has the same class (dog): a model "
                                       "trained on it learns nothing (a single-label task needs two or more "
                                       "classes)\n")


def _make_esc50_zip(tmp_path: Path) -> Path:
    source = _make_esc50(tmp_path / "src" / "ESC-50-master")
    archive = tmp_path / "master.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            zf.write(path, path.relative_to(source.parent).as_posix())
    return archive


def test_download_esc50_from_local_url(tmp_path):
    archive = _make_esc50_zip(tmp_path)
    url, cache = archive.as_uri(), tmp_path / "cache"
    data_dir = download_esc50(cache, progress=False, url=url)
    assert data_dir == cache / "ESC-50" and load_esc50(data_dir).folds == [1, 2, 3, 4, 5]
    record = json.loads((cache / "download.json").read_text())
    assert record["size"] == archive.stat().st_size
    assert record["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # temp dir cleaned up

    archive.unlink()  # re-use must not download again
    assert download_esc50(cache, progress=False, url=url) == data_dir
    assert download_esc50(cache, progress=False, url=url, sha256=record["sha256"]) == data_dir
    with pytest.raises(ParameterError, match="cannot be downloaded"):  # a different pinned digest needs a download
        download_esc50(cache, progress=False, url=url, sha256="0" * 64)
    next((data_dir / "audio").iterdir()).unlink()  # damaged tree: downloads again, which now fails
    with pytest.raises(ParameterError) as failed:
        download_esc50(cache, progress=False, url=url)
    assert failed.value.parameter == "data_dir"  # offline: the way out is a local copy
    assert failed.value.problem.startswith(f"is needed: ESC-50 cannot be downloaded from {url} (")
    assert failed.value.problem.endswith("then give its folder (holding audio/ and meta/esc50.csv)")


def test_download_esc50_checksum_and_archive_errors(tmp_path, monkeypatch):
    archive = _make_esc50_zip(tmp_path)
    with pytest.raises(DatasetError, match="checksum mismatch"):
        download_esc50(tmp_path / "c1", progress=False, url=archive.as_uri(), sha256="0" * 64)
    assert not (tmp_path / "c1" / "ESC-50").exists()
    not_zip = tmp_path / "not.zip"
    not_zip.write_text("hello")
    with pytest.raises(DatasetError, match="not a zip"):
        download_esc50(tmp_path / "c2", progress=False, url=not_zip.as_uri())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    data_dir = download_esc50(progress=False, url=archive.as_uri(), sha256=digest)
    assert data_dir == tmp_path / "xdg" / "astcli" / "esc50" / "ESC-50"
