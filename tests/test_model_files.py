"""Label files and transformers model folders as people save them: BOMs, semicolons, bad indices, and every
feature-changing field of preprocessor_config.json, checked against transformers' own extractor and model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_signal
from helpers import make_hf_ast, save_hf_ast

from astcli.errors import ModelError
from astcli.model.checkpoints import read_labels
from astcli.tagger import load_model

FRAMES = 200  # the tiny AST's window


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("bom.csv", "\ufeffindex,mid,display_name\n0,/m/a,\"Dog, barking\"\n1,/m/b,Cat\n", ["Dog, barking", "Cat"]),
    ("semicolons.csv", "index;mid;display_name\r\n1;/m/b;Cat\r\n0;/m/a;Dog\r\n", ["Dog", "Cat"]),
    ("tabs.tsv", "index\tmid\tdisplay_name\n0\t/m/a\tDog\n1\t/m/b\tCat\n", ["Dog", "Cat"]),
    ("name-column.csv", "\ufeffName,Index\nDog,0\nCat,1\n", ["Dog", "Cat"]),
    ("crlf.txt", "\ufeffDog\r\nCat, domestic\r\n\r\n", ["Dog", "Cat, domestic"]),
    ("map.json", "\ufeff{\"1\": \"Cat\", \"0\": \"Dog\"}", ["Dog", "Cat"]),
    ("list.json", "[\"Dog\", \"Cat\"]", ["Dog", "Cat"]),
])
def test_label_files_people_save(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text, encoding="utf-8", newline="")
    assert read_labels(tmp_path / name) == expected


def _rows(indices: list[int]) -> str:
    return "index,mid,display_name\n" + "".join(f"{i},/m/{i},class {i}\n" for i in indices)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("dup-gap.csv", _rows([0, 1, 2, 3, 4, 5, 5, 6, 8, 9]), "index 5 appears 2 times (line 7, line 8); index 7 missing"),
    ("one-based.csv", _rows([1, 2, 3]), "index 0 missing"),
    ("no-header.csv", "0,/m/a,Dog\n1,/m/b,Cat\n", "needs a header naming the columns index and display_name"),
    ("pipes.csv", "index|mid|display_name\n0|/m/a|Dog\n", "separated by commas, semicolons or tabs"),
    ("word-index.csv", "index,mid,display_name\nzero,/m/a,Dog\n", "line 2: index 'zero' is not a whole number"),
    ("short-row.csv", "index,mid,display_name\n0\n", "line 2 has 1 fields"),
    ("gap.json", "{\"0\": \"Dog\", \"2\": \"Cat\"}", "index 1 missing"),
    ("keys.json", "{\"dog\": \"Dog\"}", "keys must be class indices"),
])
def test_bad_label_files_say_what_is_wrong(tmp_path, name, text, message):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ModelError) as caught:
        read_labels(tmp_path / name)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# -- transformers folders: preprocessor_config.json -------------------------------------------------------


def _oracle(model, prep: dict, wave: np.ndarray) -> np.ndarray:
    """transformers' own ASTFeatureExtractor (configured from the file's fields) + ASTForAudioClassification."""
    from transformers import ASTFeatureExtractor

    fields = {k: prep[k] for k in ("do_normalize", "mean", "std", "num_mel_bins", "max_length") if k in prep}
    features = ASTFeatureExtractor(**fields)(wave, sampling_rate=16000, return_tensors="pt").input_values
    with torch.inference_mode():
        return model(input_values=features).logits.sigmoid()[0].numpy()


@pytest.mark.parametrize(("mel", "changes"), [
    (128, {"do_normalize": False}),
    (128, {"mean": -6.6268077, "std": 5.358466}),
    (128, {"do_normalize": True, "max_length": FRAMES, "padding_value": 0.0, "return_attention_mask": True}),
    (64, {"num_mel_bins": 64}),
])
def test_preprocessor_fields_are_honoured(tmp_path, mel, changes):
    model = make_hf_ast(max_length=FRAMES, num_labels=4, num_mel_bins=mel, problem_type="multi_label_classification")
    folder = save_hf_ast(model, tmp_path / "hf")
    prep = json.loads((folder / "preprocessor_config.json").read_text())
    prep.update(changes)
    (folder / "preprocessor_config.json").write_text(json.dumps(prep))
    tagger = load_model(folder)
    for seconds, kind in ((1.3, "tones"), (2.0, "chirp")):
        wave = make_signal(kind, seconds)
        ours = tagger.predict([torch.from_numpy(wave)])[0].numpy()
        assert np.abs(ours - _oracle(model, prep, wave)).max() <= 1e-4


@pytest.mark.parametrize(("changes", "message"), [
    ({"sampling_rate": 8000}, "sampling_rate 8000 is not supported"),
    ({"num_mel_bins": 64}, "num_mel_bins 64 differs from the model's num_mel_bins 128"),
    ({"max_length": 1024}, "max_length 1024 differs from the model's max_length 200"),
    ({"do_normalize": "yes"}, "do_normalize 'yes' is not true or false"),
    ({"std": 0}, "std 0 is not positive"),
    ({"mean": None}, "mean None is not a finite number"),
    ({"feature_size": 2}, "feature_size 2 is not supported"),
    ({"feature_extractor_type": "WhisperFeatureExtractor"}, "feature_extractor_type 'WhisperFeatureExtractor'"),
])
def test_preprocessor_fields_we_cannot_reproduce_are_refused(tmp_path, changes, message):
    source = save_hf_ast(make_hf_ast(max_length=FRAMES, num_labels=4), tmp_path / "hf")
    folder = shutil.copytree(source, tmp_path / "changed")
    prep = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**prep, **changes}))
    with pytest.raises(ModelError) as caught:
        load_model(folder)
    assert message in str(caught.value) and "preprocessor_config.json" in str(caught.value)
