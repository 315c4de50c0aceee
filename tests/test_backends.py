"""One Tagger over pluggable backends: PyTorch and ONNX Runtime give the same logits through the same front end;
training never loads a model through a tagger, so an ONNX file is a one-line usage error there."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import perturb_

from astcli.backends import OnnxBackend, TorchBackend
from astcli.errors import ModelError, UsageError
from astcli.export import export_onnx
from astcli.model import AudioTransformer, elastic_config
from astcli.model.checkpoints import load_transformer
from astcli.tagger import Tagger, load_model

LABELS = ("low", "mid", "high")


def _wave(seconds: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return torch.from_numpy(wave).float()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny perturbed ElasticAST and its float32 packed ONNX export."""
    torch.manual_seed(0)
    config = elastic_config("tiny", dim=64, depth=2, heads=2, mlp_dim=128, max_frames=256, num_classes=3,
                            labels=LABELS)
    model = perturb_(AudioTransformer(config), seed=1).eval()
    path = tmp_path_factory.mktemp("backends") / "tiny.onnx"
    export_onnx(Tagger(TorchBackend(model, device="cpu", name="tiny")), path)
    return model, path


def test_onnx_and_torch_backends_give_equal_logits_through_one_tagger(exported):
    model, path = exported
    tagger = Tagger([TorchBackend(model, device="cpu", name="torch"), OnnxBackend(path, device="cpu")])
    assert tagger.labels == list(LABELS) and tagger.name == f"torch+{path}"
    clips = [tagger.clip(tagger.features(_wave(s, i))) for i, s in enumerate((2.5, 0.3, 1.2, 0.05, 1.9))]
    for budget in (1, 200, 10**6):  # one clip per batch, several batches, everything packed together
        torch_logits = tagger.logits(clips, budget, member=0)
        onnx_logits = tagger.logits(clips, budget, member=1)
        assert torch_logits.abs().max() > 0.5  # not all near zero: the comparison has teeth
        torch.testing.assert_close(onnx_logits, torch_logits, atol=1e-5, rtol=0)
    windows = [tagger.features(_wave(s, i)) for i, s in enumerate((1.0, 2.2))]
    alone = Tagger(TorchBackend(model, device="cpu")).score_windows(windows)
    torch.testing.assert_close(tagger.score_windows(windows), alone, atol=1e-5, rtol=0)


def test_members_must_share_labels_and_features(exported):
    model, path = exported
    relabelled = OnnxBackend(path, labels=["a", "b", "c"])
    with pytest.raises(ModelError, match="different labels"):
        Tagger([TorchBackend(model, device="cpu"), relabelled])
    with pytest.raises(ModelError, match="ensemble"):
        Tagger([TorchBackend(model, device="cpu"), OnnxBackend(path)]).save(path.parent / "copy")


def test_load_transformer_refuses_onnx_and_loads_pytorch(exported, tmp_path):
    model, path = exported
    with pytest.raises(UsageError, match="an ONNX model cannot be fine-tuned"):
        load_transformer(path)
    saved = TorchBackend(model, device="cpu").save(tmp_path / "own")
    again = load_transformer(saved)
    assert isinstance(again, AudioTransformer) and again.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(),
                                                  strict=True))
    assert isinstance(load_model(saved, device="cpu").backends[0], TorchBackend)


def test_finetune_from_onnx_is_one_line_usage_error(exported, tmp_path):
    _, path = exported
    data = tmp_path / "data"
    for label, seed in (("a", 0), ("b", 1)):
        (data / label).mkdir(parents=True)
        for i in range(2):
            sf.write(data / label / f"{i}.wav", _wave(1.0, seed + 2 * i).numpy(), 16000)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "astcli", "finetune", "-m", str(path), "-o", str(tmp_path / "out"),
                           "--dataset", str(data), "--num-workers", "0"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"ast: error: {path}: an ONNX model cannot be fine-tuned; give the PyTorch "
                                        "model it was exported from"]
