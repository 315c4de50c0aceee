"""Uniform descriptions of training datasets (ESC-50, Speech Commands v2, AudioSet, folders, manifests) and
their splits into the training, validation and test examples of each run.

Loaders read metadata and check that audio files exist; decoding happens at training time. A row that
cannot be used (missing file, unknown label, malformed field) is skipped and counted in
``Dataset.skipped``; a missing or unreadable meta file, or a dataset left with no example, raises
:class:`~astcli.errors.DatasetError` with one line naming the path.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from astcli.audio import AUDIO_EXTENSIONS
from astcli.console import Progress, warn
from astcli.errors import DatasetError, ParameterError
from astcli.files import write_text
from astcli.train.seeds import seeded_generator

ESC50_URL = "https://github.com/karoldvl/ESC-50/archive/master.zip"


@dataclass
class Example:
    """One clip: its audio file, its class indices and the fold it belongs to (None without folds)."""

    path: str
    labels: list[int]  # class indices (one for single-label)
    fold: int | None = None


@dataclass
class Dataset:
    """Examples with class names; ``folds`` / ``splits`` say how the dataset is divided where it defines that."""

    name: str
    classes: list[str]  # display names, index = class id
    multi_label: bool
    examples: list[Example]
    folds: list[int] | None  # sorted fold ids where the dataset defines cross-validation folds
    splits: dict[str, list[int]] | None = None  # example indices per fixed split ("train", "validation", ...)
    noise_files: list[str] = field(default_factory=list)  # background-noise recordings (speechcommands)
    skipped: int = 0  # rows that could not be used (bad label, missing file)


def _why(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV file with a header that holds the ``required`` columns."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path}: {_why(exc)}") from exc
    missing = [name for name in required if name not in reader.fieldnames]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} in the header")
    return rows


def _checked(dataset: Dataset, source: Path) -> Dataset:
    if not dataset.examples:
        raise DatasetError(f"{source}: no usable examples ({dataset.skipped} rows skipped)")
    used = {c for e in dataset.examples for c in e.labels}
    if len(used) < 2 and not dataset.multi_label:
        only = dataset.classes[next(iter(used))] if used else "none"
        warn(f"{source}: every clip has the same class ({only}): a model trained on it learns nothing "
             "(a single-label task needs two or more classes)")
    return dataset


def load_esc50(data_dir: str | os.PathLike) -> Dataset:
    """The official ESC-50 layout: ``meta/esc50.csv`` and ``audio/<filename>``; 5 folds, 50 classes."""
    root = Path(data_dir)
    meta = root / "meta" / "esc50.csv"
    names: dict[int, str] = {}
    examples, skipped = [], 0
    for row in _read_csv(meta, ("filename", "fold", "target", "category")):
        try:
            target, fold, path = int(row["target"]), int(row["fold"]), root / "audio" / row["filename"]
        except (TypeError, ValueError):
            skipped += 1
            continue
        if target < 0 or not path.is_file():
            skipped += 1
            continue
        names.setdefault(target, row["category"])
        examples.append(Example(str(path), [target], fold))
    classes = [names.get(i, str(i)) for i in range(max(names, default=-1) + 1)]
    folds = sorted({e.fold for e in examples})
    return _checked(Dataset("esc50", classes, False, examples, folds, skipped=skipped), meta)


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "astcli"


def _tree_fingerprint(root: Path) -> dict[str, object]:
    """File count and sha256 over every file's relative path and size (cheap: no content is read)."""
    files = (p for p in root.rglob("*") if p.is_file())
    entries = sorted(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}" for p in files)
    return {"files": len(entries), "sha256": hashlib.sha256("\n".join(entries).encode()).hexdigest()}


def _fetch(url: str, dest: Path, progress: bool) -> tuple[int, str]:
    """Stream ``url`` to ``dest`` with a progress bar on stderr; return (size, sha256)."""
    digest, size = hashlib.sha256(), 0
    try:
        with (
            urllib.request.urlopen(url, timeout=60) as response,
            open(dest, "wb") as out,
            Progress(progress, unit="bytes", elapsed=False) as bar,
        ):
            bar.start("ESC-50", total=int(response.headers.get("Content-Length") or 0) or None)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                bar.advance(len(chunk))
    except OSError as exc:  # URLError and socket timeouts are OSErrors
        reason = getattr(exc, "reason", None) or _why(exc)
        raise ParameterError("data_dir", f"is needed: ESC-50 cannot be downloaded from {url} ({reason}); download "
                             "and unpack it where the network is, then give its folder (holding audio/ and "
                             "meta/esc50.csv)") from exc
    return size, digest.hexdigest()


def download_esc50(
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    url: str = ESC50_URL,
    sha256: str | None = None,
) -> Path:
    """Download and extract ESC-50 once; return the data dir (holding ``meta/`` and ``audio/``).

    The cache is ``cache_dir`` or ``$XDG_CACHE_HOME/astcli/esc50`` (default ``~/.cache/astcli/esc50``).
    ESC-50 publishes no checksum, so nothing proves the first download authentic: pass ``sha256`` to pin
    a known archive digest. The archive's size and sha256 are recorded in ``download.json`` next to the
    data, together with a fingerprint of the extracted tree (file paths and sizes, not contents); re-use
    verifies that fingerprint (and the recorded digest against a pinned ``sha256``) and downloads again
    when it does not match. Extraction goes to a temporary directory that is renamed into place, so an
    interrupted run never leaves a half-extracted dataset.
    """
    cache = Path(cache_dir) if cache_dir is not None else _cache_root() / "esc50"
    data_dir, record_path = cache / "ESC-50", cache / "download.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    reusable = (
        isinstance(record, dict)
        and (sha256 is None or record.get("sha256") == sha256.lower())
        and data_dir.is_dir()
        and record.get("tree") == _tree_fingerprint(data_dir)
    )
    if reusable:
        return data_dir
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            archive, extracted = Path(tmp) / "esc50.zip", Path(tmp) / "extracted"
            size, digest = _fetch(url, archive, progress)
            if sha256 is not None and digest != sha256.lower():
                raise DatasetError(f"checksum mismatch for {url}: sha256 {digest}, expected {sha256}")
            try:
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(extracted)
            except zipfile.BadZipFile as exc:
                raise DatasetError(f"{url} is not a zip archive: {exc}") from exc
            metas = [*extracted.glob("meta/esc50.csv"), *extracted.glob("*/meta/esc50.csv")]
            if not metas:
                raise DatasetError(f"{url}: the archive holds no meta/esc50.csv")
            if data_dir.exists():
                shutil.rmtree(data_dir)
            os.replace(metas[0].parent.parent, data_dir)
        record = {"url": url, "size": size, "sha256": digest, "tree": _tree_fingerprint(data_dir)}
        write_text(record_path, json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise DatasetError(f"cannot store ESC-50 in {cache}: {_why(exc)}") from exc
    return data_dir


def load_speechcommands(data_dir: str | os.PathLike) -> Dataset:
    """Speech Commands v2: one folder per word, ``validation_list.txt`` and ``testing_list.txt``.

    Everything not in those lists is the train split; ``_background_noise_/*.wav`` become ``noise_files``.
    """
    root = Path(data_dir)
    listed: dict[str, set[str]] = {}
    for split, name in (("validation", "validation_list.txt"), ("test", "testing_list.txt")):
        try:
            lines = (root / name).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read {root / name}: {_why(exc)}") from exc
        listed[split] = {line.strip() for line in lines if line.strip()}
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    examples: list[Example] = []
    splits: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    found = set()
    for label, word in enumerate(classes):
        for wav in sorted((root / word).glob("*.wav")):
            rel = f"{word}/{wav.name}"
            split = next((s for s in ("validation", "test") if rel in listed[s]), "train")
            found.add(rel)
            splits[split].append(len(examples))
            examples.append(Example(str(wav), [label]))
    skipped = len((listed["validation"] | listed["test"]) - found)
    noise = sorted(str(p) for p in (root / "_background_noise_").glob("*.wav"))
    dataset = Dataset("speechcommands", classes, False, examples, None, splits, noise, skipped)
    return _checked(dataset, root)


def load_audioset(datafile_json: str | os.PathLike, class_labels_csv: str | os.PathLike) -> Dataset:
    """AST-style ``{"data": [{"wav": ..., "labels": "/m/..,/m/.."}]}`` plus ``class_labels_indices.csv``.

    Relative wav paths are resolved against the JSON's folder; a row with an unknown mid is skipped.
    """
    datafile, labels_csv = Path(datafile_json), Path(class_labels_csv)
    if not labels_csv.is_file():
        raise DatasetError(f"{datafile}: no class list at {labels_csv.resolve()} (an AST-style datafile needs "
                           "class_labels_indices.csv, index,mid,display_name, in its folder)")
    try:
        rows = _read_csv(labels_csv, ("index", "mid", "display_name"))
        table = sorted((int(r["index"]), r["mid"].strip(), r["display_name"].strip()) for r in rows)
    except (TypeError, ValueError, AttributeError) as exc:
        raise DatasetError(f"{labels_csv}: malformed row ({exc})") from exc
    class_of = {mid: i for i, (_, mid, _) in enumerate(table)}
    try:
        doc = json.loads(datafile.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"cannot read {datafile}: {_why(exc)}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DatasetError(f'{datafile}: expected a JSON object with a "data" list')
    examples, skipped = [], 0
    for entry in doc["data"]:
        try:
            path = datafile.parent / entry["wav"]
            ids = [class_of.get(mid.strip()) for mid in entry["labels"].split(",") if mid.strip()]
        except (TypeError, KeyError, AttributeError):
            skipped += 1
            continue
        if not ids or None in ids or not path.is_file():
            skipped += 1
            continue
        examples.append(Example(str(path), sorted(set(ids))))
    dataset = Dataset("audioset", [name for _, _, name in table], True, examples, None, skipped=skipped)
    return _checked(dataset, datafile)


def load_folder(data_dir: str | os.PathLike) -> Dataset:
    """One sub-folder per class (sorted names) holding audio files (searched recursively)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"no such folder: {root}")
    groups = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in sub.rglob("*")
            if p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        )
        if files:
            groups[sub.name] = files
    examples = [Example(str(f), [label]) for label, files in enumerate(groups.values()) for f in files]
    return _checked(Dataset(root.resolve().name, list(groups), False, examples, None), root)


def load_manifest(csv_path: str | os.PathLike) -> Dataset:
    """CSV with header ``path,labels[,fold]``; labels joined with ``;``; paths relative to the CSV.

    Classes are the sorted label names of all well-formed rows (so they do not depend on which files exist).
    """
    path = Path(csv_path)
    rows = _read_csv(path, ("path", "labels"))
    has_folds = bool(rows) and "fold" in rows[0]
    parsed, skipped = [], 0
    for row in rows:
        names = list(dict.fromkeys(s.strip() for s in (row["labels"] or "").split(";") if s.strip()))
        try:
            fold = int(row["fold"]) if has_folds else None
        except (TypeError, ValueError):
            fold, names = None, []
        if not names or not (row["path"] or "").strip():
            skipped += 1
            continue
        parsed.append((path.parent / row["path"].strip(), names, fold))
    classes = sorted({name for _, names, _ in parsed for name in names})
    class_of = {name: i for i, name in enumerate(classes)}
    examples = [
        Example(str(file), sorted(class_of[n] for n in names), fold)
        for file, names, fold in parsed
        if file.is_file()
    ]
    skipped += len(parsed) - len(examples)
    folds = sorted({e.fold for e in examples}) if has_folds else None
    multi_label = any(len(names) > 1 for _, names, _ in parsed)
    return _checked(Dataset(path.stem, classes, multi_label, examples, folds, skipped=skipped), path)


def load_dataset(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Dispatch on a dataset name ("esc50", "speechcommands", "audioset") or a path.

    ``esc50`` without ``data_dir`` downloads the dataset; for ``audioset`` ``data_dir`` is the JSON datafile
    with ``class_labels_indices.csv`` next to it. A path may be a folder (class folders, or an ESC-50 or
    Speech Commands tree), a ``.csv`` manifest or a ``.json`` datafile.
    """
    name = str(name_or_path)
    key = name.lower()
    if key == "esc50":
        return load_esc50(data_dir if data_dir is not None else download_esc50())
    if key == "speechcommands":
        if data_dir is None:
            raise DatasetError("speechcommands needs a data dir: the extracted Speech Commands v2 folder")
        return load_speechcommands(data_dir)
    if key == "audioset":
        if data_dir is None:
            raise DatasetError("audioset needs a data path: an AST-style JSON datafile")
        return load_audioset(data_dir, Path(data_dir).parent / "class_labels_indices.csv")
    path = Path(name)
    if path.is_dir():
        if (path / "meta" / "esc50.csv").is_file():
            return load_esc50(path)
        if (path / "validation_list.txt").is_file() and (path / "testing_list.txt").is_file():
            return load_speechcommands(path)
        return load_folder(path)
    if path.suffix.lower() == ".csv":
        return load_manifest(path)
    if path.suffix.lower() == ".json":
        return load_audioset(path, path.parent / "class_labels_indices.csv")
    if not path.exists() and (os.sep in name or "/" in name or path.suffix):
        raise DatasetError(f"{name}: no such file or folder")
    raise DatasetError(
        f"unknown dataset {name!r}: expected esc50, speechcommands, audioset, a folder, "
        "a .csv manifest or a .json datafile"
    )


def fold_split(dataset: Dataset, test_fold: int) -> tuple[list[int], list[int]]:
    """Example indices (train, test) holding out ``test_fold``."""
    if not dataset.folds or test_fold not in dataset.folds:
        raise DatasetError(f"{dataset.name}: no fold {test_fold} (folds: {dataset.folds or 'none'})")
    train = [i for i, e in enumerate(dataset.examples) if e.fold != test_fold]
    test = [i for i, e in enumerate(dataset.examples) if e.fold == test_fold]
    return train, test


@dataclass(frozen=True)
class Split:
    """The examples of one training run, as indices into ``dataset.examples``: ``train``, ``validation``
    (evaluated after every epoch) and ``test`` (the final model only). ``fold`` is the held-out fold (None
    without cross-validation); ``lengths`` are samples per example from the audio headers (None where unknown,
    or no list at all), which let batches be filled by native length."""

    dataset: Dataset
    train: tuple[int, ...]
    validation: tuple[int, ...] = ()
    test: tuple[int, ...] = ()
    fold: int | None = None
    lengths: list[int | None] | None = None

    def without(self, bad: set[int] | dict[int, str]) -> Split:
        """The same split with the examples in ``bad`` left out of every part."""

        def keep(indices: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(i for i in indices if i not in bad)

        return dataclasses.replace(self, train=keep(self.train), validation=keep(self.validation),
                                   test=keep(self.test))


def holdout_split(dataset: Dataset, fraction: float, seed: int = 0,
                  among: list[int] | tuple[int, ...] | None = None) -> tuple[list[int], list[int]]:
    """(train, validation) indices: ``fraction`` of each class (by first label, at least one where a class has
    two or more examples) of the examples ``among`` (default: all) held out at random, reproducibly from ``seed``.
    """
    pool = list(range(len(dataset.examples))) if among is None else list(among)
    if fraction <= 0:
        return pool, []
    by_class: dict[int, list[int]] = {}
    for i in pool:
        labels = dataset.examples[i].labels
        by_class.setdefault(labels[0] if labels else -1, []).append(i)
    gen = seeded_generator(seed, "holdout")
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        take = round(len(members) * fraction)
        if len(members) >= 2:
            take = max(1, min(take, len(members) - 1))
        order = torch.randperm(len(members), generator=gen).tolist()
        val += [members[k] for k in order[:take]]
    held = set(val)
    return [i for i in pool if i not in held], sorted(val)


def run_splits(dataset: Dataset, folds: list[int] | None, val_fraction: float, seed: int = 0) -> list[Split]:
    """The runs of an experiment on ``dataset``: one per fold in ``folds`` (None: every fold the dataset
    defines; []: no cross-validation), each testing on that fold and validating on ``val_fraction`` of each class
    of the other folds (:func:`holdout_split`), so that no choice is made on the test fold; otherwise one run on
    the dataset's own train / validation / test split (its test split validates when it has no validation split),
    or ``val_fraction`` of each class held out for validation."""
    if dataset.folds and folds != []:
        chosen = folds or dataset.folds
        missing = [f for f in chosen if f not in dataset.folds]
        if missing:
            raise ParameterError("folds", f"names fold {missing[0]}, but {dataset.name} has folds {dataset.folds}")
        splits = []
        for k in chosen:
            rest, test = fold_split(dataset, k)
            train, val = holdout_split(dataset, val_fraction, seed, among=rest)
            splits.append(Split(dataset, tuple(train), tuple(val), tuple(test), fold=k))
        return splits
    if folds:
        raise ParameterError("folds", f"cannot be chosen: {dataset.name} defines no folds")
    parts = dataset.splits or {}
    if parts.get("train"):
        val, test = list(parts.get("validation") or []), list(parts.get("test") or [])
        if not val:
            val, test = test, []
        return [Split(dataset, tuple(parts["train"]), tuple(val), tuple(test))]
    train, val = holdout_split(dataset, val_fraction, seed)
    return [Split(dataset, tuple(train), tuple(val))]
