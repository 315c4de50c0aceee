"""`ast export --onnx` and the ONNX Runtime backend, on tiny models built here (no network).

Exports are the slow part (~5 s each), so each graph is exported once per module and shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from astcli import cli
from astcli.backends import OUTPUTS, PACKED_INPUTS, OnnxBackend
from astcli.errors import ModelError, ParameterError, UsageError
from astcli.export import (
    MAX_OPSET,
    export_model,
    export_onnx,
)
from astcli.model.packing import pack_clips, patchify
from astcli.tagger import Tagger, load_model

LABELS = ["dog", "rain", "speech"]
TOL = 1e-4


# -- tiny checkpoints ------------------------------------------------------------------------------------


def _signal(seconds: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(round(seconds * 16000)) / 16000
    tone = 0.3 * torch.sin(2 * torch.pi * (300 + 200 * seed) * t) + 0.2 * torch.sin(2 * torch.pi * 2500 * t * t)
    return (tone + 0.05 * torch.randn(t.shape, generator=gen)).float()


def _hf_ast_dir(directory: Path) -> Path:
    """A transformers AST (hidden 64, 2 layers, 2 heads, 128 frames, multi-label) written with save_pretrained."""
    from transformers import ASTConfig, ASTForAudioClassification

    config = ASTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_length=128,
        num_mel_bins=128, patch_size=16, frequency_stride=10, time_stride=10, num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
        problem_type="multi_label_classification",
    )
    torch.manual_seed(0)
    model = ASTForAudioClassification(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights large enough that differences show in the logits
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(1.0 + noise if "layernorm" in name and name.endswith("weight") else noise)
    model.save_pretrained(directory)
    prep = {"feature_extractor_type": "ASTFeatureExtractor", "mean": -4.2677393, "std": 4.5689974,
            "sampling_rate": 16000, "num_mel_bins": 128, "max_length": 128}
    (directory / "preprocessor_config.json").write_text(json.dumps(prep), encoding="utf-8")
    return directory


def _elastic_pth(path: Path, dim: int = 128, depth: int = 2, time_patches: int = 16) -> Path:
    """An original-format ElasticAST state dict (``module.`` keys), 128 mel x 256 frames, 3 classes."""
    gen = torch.Generator().manual_seed(2)
    state: dict[str, torch.Tensor] = {}

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def linear(name: str, out: int, inp: int, gain: float = 1.0) -> None:
        state[f"{name}.weight"] = rand(out, inp, scale=gain * inp**-0.5)
        state[f"{name}.bias"] = rand(out, scale=0.05)

    def norm(name: str) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = 1.0 + rand(dim, scale=0.1), rand(dim, scale=0.1)

    linear("patch_embed.0", dim, 256)
    state["pos_embed_freq"], state["pos_embed_time"] = rand(8, dim, scale=0.5), rand(time_patches, dim, scale=0.5)
    for i in range(depth):
        block = f"blocks.modules_list.{i}."
        norm(block + "norm1")
        linear(block + "attn.to_q", dim, dim, gain=64**-0.5)  # trained to work without the 1/sqrt(d) scale
        linear(block + "attn.to_kv", 2 * dim, dim)
        linear(block + "attn.proj", dim, dim)
        norm(block + "norm2")
        linear(block + "mlp.fc1", 2 * dim, dim)
        linear(block + "mlp.fc2", dim, 2 * dim)
    norm("norm")
    state["attn_pool_queries"] = rand(dim, scale=1.0)
    for part, out, gain in (("to_q", dim, 64**-0.5), ("to_kv", 2 * dim, 1.0), ("proj", dim, 1.0)):
        linear(f"attn_pool.{part}", out, dim, gain)
    norm("mlp_norm")
    linear("head", len(LABELS), dim, gain=4.0)
    torch.save({"module." + k: v for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    labels = root / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    hf = root / "hf-ast"
    hf.mkdir()
    return {"root": root, "ast": _hf_ast_dir(hf), "elastic": _elastic_pth(root / "elastic.pth"), "labels": labels}


@pytest.fixture(scope="module")
def ast_onnx(models):
    """The AST exported through the CLI (CliRunner), float32 packed graph."""
    out = models["root"] / "ast.onnx"
    result = CliRunner().invoke(cli.app, ["export", "--onnx", "--model", str(models["ast"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "verified float32 graph" in result.output
    return out


@pytest.fixture(scope="module")
def elastic_onnx(models):
    """The ElasticAST .pth exported through the library with a label file, float32 packed graph."""
    report = export_model(str(models["elastic"]), models["root"] / "elastic.onnx", labels=models["labels"])
    assert report.graph == "packed" and report.precision == "float32"
    return report.path


def _torch(models, family: str) -> Tagger:
    return load_model(models[family], labels=models["labels"] if family == "elastic" else None, device="cpu")


def _clips(tagger: Tagger, frames: list[int]):
    c = tagger.config
    raw = tagger.features(_signal(c.max_frames * c.hop_ms / 1000 + 0.1, seed=3))
    return [patchify((raw[:n] - c.mean) / (2 * c.std), c) for n in frames]


# -- parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ast", "elastic"])
def test_packed_graph_matches_pytorch_at_several_lengths(models, ast_onnx, elastic_onnx, family):
    tagger = _torch(models, family)
    onnx_tagger = OnnxBackend(ast_onnx if family == "ast" else elastic_onnx)
    frames = [128, 64, 36, 16] if family == "ast" else [256, 160, 48, 16]
    clips = _clips(tagger, frames)
    prefix = tagger.config.prefix_tokens
    batches = [pack_clips([clip], prefix) for clip in clips]
    packed = pack_clips(clips, prefix, row_tokens=len(clips[0]) + prefix)  # short clips share a row
    assert packed.patches.shape[0] == 2 and not packed.one_clip_per_row
    for batch in [*batches, packed]:
        with torch.inference_mode():
            expected = tagger.backends[0].model(batch)
        logits, probs = onnx_tagger.run(batch)
        assert logits.shape == (batch.num_clips, len(LABELS))
        assert expected.abs().max() > 0.5  # the check has teeth: logits are not all near zero
        assert np.abs(logits - expected.numpy()).max() <= TOL
        assert np.abs(probs - tagger.probabilities(expected).numpy()).max() <= TOL


@pytest.mark.parametrize("family", ["ast", "elastic"])
def test_onnx_tagger_predicts_like_audio_tagger(models, ast_onnx, elastic_onnx, family):
    tagger = _torch(models, family)
    onnx_tagger = load_model(ast_onnx if family == "ast" else elastic_onnx)
    assert len(onnx_tagger.backends) == 1 and isinstance(onnx_tagger.backends[0], OnnxBackend)
    waves = [_signal(s, seed=i) for i, s in enumerate((0.4, 1.0, 2.9, 0.05))]
    expected = tagger.predict(waves, batch_tokens=300)
    got = onnx_tagger.predict(waves, batch_tokens=300)
    assert got.shape == expected.shape == (4, len(LABELS))
    assert (got - expected).abs().max() <= TOL
    windows = [tagger.features(w) for w in waves]
    assert (onnx_tagger.score_windows(windows) - tagger.score_windows(windows)).abs().max() <= TOL
    assert onnx_tagger.score_windows([]).shape == (0, len(LABELS))


def test_metadata_round_trip_and_signature(models, ast_onnx, elastic_onnx):
    for family, path in (("ast", ast_onnx), ("elastic", elastic_onnx)):
        tagger, onnx_tagger = _torch(models, family), load_model(path)
        assert onnx_tagger.config == tagger.config
        assert onnx_tagger.labels == LABELS
        assert (onnx_tagger.sample_rate, onnx_tagger.feature_hop_ms, onnx_tagger.window_frames) == (
            tagger.sample_rate, tagger.feature_hop_ms, tagger.window_frames)
        assert onnx_tagger.name == str(path)
    proto = onnx.load(str(ast_onnx))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["astcli.config"])["family"] == "ast"
    assert json.loads(meta["astcli.inputs"]) == list(PACKED_INPUTS)
    assert json.loads(meta["astcli.outputs"]) == list(OUTPUTS)
    assert meta["astcli.graph"] == "packed" and meta["astcli.precision"] == "float32"
    assert json.loads(meta["astcli.verification"])["float32"]["max_logit_diff"] <= TOL
    inputs = {i.name: i for i in proto.graph.input}
    assert list(inputs) == list(PACKED_INPUTS)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert dims(inputs["patches"]) == ["rows", "length", 256]
    assert inputs["patches"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    for name in ("freq_pos", "time_pos", "token_kind", "clip_ids"):
        assert dims(inputs[name]) == ["rows", "length"]
        assert inputs[name].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(inputs["clip_index"]) == ["clips"]
    assert [o.name for o in proto.graph.output] == list(OUTPUTS)
    assert dims(proto.graph.output[0]) == ["clips", len(LABELS)]


def test_onnx_tagger_options(models, ast_onnx, elastic_onnx):
    renamed = load_model(elastic_onnx, labels=["a", "b", "c"])
    assert renamed.labels == ["a", "b", "c"]
    with pytest.raises(ModelError, match="2 labels"):
        OnnxBackend(elastic_onnx, labels=["a", "b"])
    assert load_model(elastic_onnx, hop_ms=20).feature_hop_ms == 20
    with pytest.raises(UsageError, match="ElasticAST models only"):
        load_model(ast_onnx, hop_ms=20)
    with pytest.raises(ModelError, match="no such file"):
        OnnxBackend(models["root"] / "missing.onnx")
    with pytest.raises(ModelError, match="cannot be saved"):
        load_model(ast_onnx).save(models["root"] / "copy")
    with pytest.raises(ParameterError) as refused:  # never silently ignored
        load_model(ast_onnx, dtype="bfloat16")
    assert refused.value.parameter == "dtype" and "is an ONNX graph" in refused.value.problem
    assert load_model(ast_onnx, dtype="float32").labels == load_model(ast_onnx).labels
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="onnxruntime-gpu"):
            OnnxBackend(ast_onnx, device="cuda")
    assert OnnxBackend(ast_onnx, device="cpu").session.get_providers() == ["CPUExecutionProvider"]
    junk = models["root"] / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        OnnxBackend(junk)


# -- precisions ------------------------------------------------------------------------------------------


def test_int8_runs_with_bounded_deviation(models):
    tagger = _torch(models, "elastic")
    report = export_onnx(tagger, models["root"] / "elastic-int8.onnx", precision="int8")
    precisions = [v.precision for v in report.verifications]
    assert precisions == ["float32", "int8"]
    assert report.verifications[0].max_logit_diff <= TOL
    assert 0 < report.verifications[1].max_prob_diff <= 0.1
    assert any("int8 graph" in line for line in report.lines())
    onnx_tagger = load_model(report.path)
    assert onnx_tagger.backends[0].precision == "int8"
    proto = onnx.load(str(report.path))
    assert any(n.op_type == "MatMulInteger" for n in proto.graph.node)
    waves = [_signal(s, seed=i) for i, s in enumerate((0.7, 2.5))]
    assert (onnx_tagger.predict(waves) - tagger.predict(waves)).abs().max() <= 0.1


def test_fp16_export_is_a_valid_model(models):
    tagger = _torch(models, "ast")
    report = export_onnx(tagger, models["root"] / "ast-fp16.onnx", precision="float16", opset=MAX_OPSET)
    onnx.checker.check_model(str(report.path), full_check=True)
    proto = onnx.load(str(report.path))
    assert proto.opset_import[0].version == MAX_OPSET
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 in and out
    assert [v.precision for v in report.verifications] == ["float16"]  # it ran on the CPU provider
    assert report.verifications[0].max_prob_diff <= 1e-2
    waves = [_signal(1.0)]
    assert (load_model(report.path).predict(waves) - tagger.predict(waves)).abs().max() <= 1e-2


# -- the waveform graph ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ast", "elastic"])
def test_waveform_graph_tags_with_plain_onnxruntime(models, family):
    tagger = _torch(models, family)
    out = models["root"] / f"{family}-waveform.onnx"
    report = export_onnx(tagger, out, with_features=True)
    assert report.graph == "waveform"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["waveform"]
    assert session.get_inputs()[0].shape == ["clips", "samples"]
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["astcli.graph"] == "waveform"
    for seconds in (0.03, 0.5, 1.3, 4.0):
        wave = _signal(seconds, seed=int(seconds * 10))
        logits, probs = session.run(list(OUTPUTS), {"waveform": wave.numpy()[None]})
        with torch.inference_mode():
            expected = tagger.logits([tagger.clip(tagger.features(wave.double()).float())])
        assert np.abs(logits - expected.numpy()).max() <= TOL, seconds
        assert np.abs(probs - tagger.probabilities(expected).numpy()).max() <= TOL
    batch = torch.stack([_signal(1.0, seed=s) for s in range(3)])
    logits, _ = session.run(list(OUTPUTS), {"waveform": batch.numpy()})
    expected = tagger.logits([tagger.clip(tagger.features(w.double()).float()) for w in batch])
    assert np.abs(logits - expected.numpy()).max() <= TOL
    with pytest.raises(ModelError, match="packed graph"):
        OnnxBackend(out)


# -- failures --------------------------------------------------------------------------------------------


def test_failed_verification_leaves_nothing(models, elastic_onnx, monkeypatch):
    import astcli.export as export

    other = _torch(models, "elastic")
    with torch.no_grad():
        other.backends[0].model.head.bias.add_(1.0)  # a different model than the graph handed to the verifier

    def stale_graph(module, example, path, opset, with_features):
        path.write_bytes(elastic_onnx.read_bytes())
        return path

    monkeypatch.setattr(export, "_to_onnx", stale_graph)
    out = models["root"] / "broken" / "model.onnx"
    out.parent.mkdir()
    with pytest.raises(ModelError, match="verification failed"):
        export_onnx(other, out)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(("args", "error", "message"), [
    (["--onnx", "--fp16", "--quantize", "int8"], UsageError, "exclude each other"),
    (["--onnx", "--quantize", "int4"], SystemExit, "'int4' is not one of 'int8'"),  # the option parser's check
    (["--onnx", "--opset", "16"], ParameterError, "opset must lie between"),
    (["--onnx", "--opset", str(MAX_OPSET + 1)], ParameterError, "opset must lie between"),
    (["--onnx", "-o", "{root}/no/such/dir/model.onnx"], UsageError, "not an existing directory"),
    (["--onnx", "-o", "{root}/labels.txt/model.onnx"], UsageError, "not an existing directory"),
    (["--onnx", "-o", "{root}/model.txt"], UsageError, "must end in .onnx"),
    (["--onnx", "-m", "{root}/missing.pth"], ModelError, "no such file"),
    ([], UsageError, "choose an export format"),
])
def test_cli_rejects_bad_options(models, args, error, message):
    root = models["root"]
    argv = ["export", "-m", str(models["ast"]), "-o", str(root / "never.onnx")]
    argv += [a.format(root=root) for a in args]  # a later -m / -o wins
    result = CliRunner().invoke(cli.app, argv)
    assert isinstance(result.exception, error), result.output
    assert message in (result.output if error is SystemExit else str(result.exception))
    assert not (root / "never.onnx").exists()


def test_cli_error_is_one_line_with_exit_code_2(models, monkeypatch, capsys):
    argv = ["ast", "export", "--onnx", "-m", str(models["ast"]), "-o", str(models["root"] / "x.onnx"), "--opset", "9"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ast: error: --opset must lie between")


def test_cli_subprocess_exit_code(models):
    out = models["root"] / "sub" / "model.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "astcli", "export", "--onnx", "-m", str(models["root"] / "nope.pth"), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"ast: error: {out}: cannot write there ({out.parent} is not an existing "
                                        "directory)"]
    assert done.stdout == ""
