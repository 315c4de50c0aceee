"""The Hugging Face hub without a network: fast, one-line failures that say what to do, for every command
that fetches from the hub (tag, finetune, export, train --init imagenet); models already cached still load."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile as sf
from helpers import build_hub_cache, make_hf_ast, save_hf_ast
from typer.testing import CliRunner

from astcli.cli import app
from astcli.errors import ModelError
from astcli.model.presets import get_preset
from astcli.tagger import load_model

HUB_MODEL = "owner/tiny-ast"


class DeadHub:
    """A loopback endpoint that accepts connections and closes them at once, counting them: a hub that
    cannot be reached, seen from huggingface_hub as a protocol error (the kind it retries with back-off)."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self):
        self.server.close()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty HF cache (huggingface_hub reads its settings at import: patch them as well as the environment)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return cache


@pytest.fixture
def dead_hub(empty_cache, monkeypatch):
    import huggingface_hub.constants as hub_constants

    hub = DeadHub()
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    yield hub
    hub.close()


@pytest.fixture
def offline(empty_cache, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return empty_cache


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf_ast(make_hf_ast(max_length=200, num_labels=3), tmp_path_factory.mktemp("model") / "ast")


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for kind in ("a", "b"):
        (root / kind).mkdir()
        for i in range(3):
            sf.write(root / kind / f"{i}.wav", (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
    return root


def test_unreachable_hub_fails_after_one_attempt_and_says_what_to_do(dead_hub):
    with pytest.raises(ModelError) as excinfo:
        load_model(HUB_MODEL)
    message = str(excinfo.value)
    assert dead_hub.connections <= 2  # one request (the client may reconnect once): no back-off loop, which makes 6
    assert message.startswith(f"{HUB_MODEL}: not in the local Hugging Face cache, and the hub ({dead_hub.url}) "
                              "cannot be reached")
    assert f"`hf download {HUB_MODEL}`" in message and "HF_HUB_OFFLINE=1" in message
    assert message.endswith("use a local model instead (a model directory, a .pth checkpoint with its labels file, "
                            "or an .onnx file)")
    assert "\n" not in message


def test_offline_mode_never_says_the_hub_is_unreachable(offline):
    with pytest.raises(ModelError) as excinfo:
        load_model(HUB_MODEL, revision="v2")
    message = str(excinfo.value)
    assert "HF_HUB_OFFLINE is set, so the hub was not asked" in message and "cannot be reached" not in message
    assert f"`hf download {HUB_MODEL} --revision v2`" in message and str(offline) in message


def test_a_cached_model_loads_while_the_hub_is_unreachable(dead_hub, empty_cache, model_dir):
    build_hub_cache(empty_cache, HUB_MODEL, model_dir)
    tagger = load_model(HUB_MODEL)
    assert tagger.labels == load_model(model_dir).labels
    assert dead_hub.connections <= 3  # one look per file for a newer revision, never a retry loop


@pytest.mark.parametrize("argv", [
    ["finetune", "--model", HUB_MODEL, "--dataset", "{data}", "-o", "{tmp}/run"],
    ["export", "--onnx", "--model", HUB_MODEL, "-o", "{tmp}/m.onnx"],
    ["train", "--size", "base", "--init", "imagenet", "--dataset", "{data}", "-o", "{tmp}/run"],
], ids=["finetune", "export", "train-imagenet"])
def test_every_command_that_fetches_fails_fast_with_the_remedy(argv, dead_hub, folder_dataset, tmp_path):
    argv = [a.format(data=folder_dataset, tmp=tmp_path) for a in argv]
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, ModelError), result.output
    message = str(result.exception)
    assert "cannot be reached" in message and "`hf download " in message and "HF_HUB_OFFLINE=1" in message
    assert dead_hub.connections <= 2
    if argv[0] == "train":
        assert "facebook/deit-base-distilled-patch16-384" in message and "train from scratch (init none)" in message


def test_cli_with_an_unreachable_endpoint_asks_once_and_says_what_to_do(tmp_path, folder_dataset):
    """The real environment variables, in a fresh process: one request (huggingface_hub's back-off would make
    six over about 25 s, logging "Retrying" each time), then one line."""
    hub = DeadHub()
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "astcli", "tag", str(folder_dataset / "a" / "0.wav")],
                          capture_output=True, text=True, env=env, timeout=300)
    hub.close()
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("ast: error: MIT/ast-finetuned-audioset-10-10-0.4593: not in the local")
    assert len(done.stderr.splitlines()) == 1 and "Retrying" not in done.stderr
    assert hub.connections <= 2


def test_list_models_is_sorted_sized_marks_the_default_and_the_cache_without_torch(tmp_path, model_dir):
    from astcli.model.presets import DEFAULT_MODEL, get_preset, list_presets

    default = get_preset(DEFAULT_MODEL)
    build_hub_cache(tmp_path / "hub", default.source, model_dir)
    script = ("import sys; from astcli.cli import main; sys.argv = ['ast', 'tag', '--list-models']\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    lines = done.stdout.splitlines()
    assert lines.pop() == "False", "listing the models imported torch"
    heads = [line.split() for line in lines if not line.startswith(" ")]
    names = [p.name for p in list_presets()]
    assert [h[0] for h in heads] == sorted(names) == names
    rows = {h[0]: h[1:] for h in heads}
    assert rows[DEFAULT_MODEL] == ["(default)", "346", "MB", "cached"]
    assert rows["ast-speechcommands"] == ["342", "MB", "not", "cached"]
    assert rows["audioset-ensemble-s"] == ["1038", "MB", "1/3", "cached"]  # three stride-10 models, one cached
    assert f"    {default.source}: AST fine-tuned on AudioSet" in done.stdout
    assert max(map(len, lines)) <= 80


def test_ensemble_sizes_are_the_sum_of_their_members():
    from astcli.model.presets import download_mb, list_presets

    for preset in list_presets():
        if preset.members:
            assert download_mb(preset) == sum(download_mb(get_preset(m)) for m in preset.members) > 0
        else:
            assert 300 < preset.size_mb < 400  # AST-Base, float32
