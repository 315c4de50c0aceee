"""Checkpoint formats: original AST and ElasticAST files, the hub cache, presets, our own format, bad files."""

from __future__ import annotations

import builtins
import json
import pickle
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    AST_MEAN,
    AST_STD,
    ast_window,
    build_hub_cache,
    hf_logits,
    hf_saved_state,
    hf_to_original_ast,
    make_elastic_state,
    make_hf_ast,
    save_hf_ast,
    write_labels_csv,
)
from safetensors.torch import load_file, save_file

import astcli.model.presets as presets
from astcli.backends import TorchBackend
from astcli.errors import ModelError
from astcli.model import load_checkpoint
from astcli.model.presets import get_preset, list_presets
from astcli.tagger import load_model

ELASTIC_MEAN, ELASTIC_STD = -4.414, 4.905
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def raw_fbank(frames: int, seed: int, mel: int = 128) -> torch.Tensor:
    """Log-mel-like raw features."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(frames, mel, generator=gen) * 4.0 - 4.0


def assert_distinct_parameters(model: torch.nn.Module) -> None:
    """The loader assigns checkpoint tensors to parameters: no two may share memory (training updates them
    in place) and none may be left on the meta device it builds the model on."""
    params = list(model.parameters())
    assert all(p.device.type == "cpu" for p in params)
    assert len({p.data_ptr() for p in params}) == len(params)


def one_line_error(excinfo) -> str:
    """The message of a raised ModelError, checked to be one line."""
    message = str(excinfo.value)
    assert message and "\n" not in message and "\x1b" not in message, message
    return message


# -- original AST (.pth) --------------------------------------------------------------------------------


def test_original_ast_pth_matches_transformers(tmp_path):
    """dim 128 -> 2 heads (bare checkpoints: dim / 64); 128 frames at stride 10 (Speech Commands geometry)."""
    hf = make_hf_ast(hidden_size=128, num_attention_heads=2, intermediate_size=256, max_length=128,
                     layer_norm_eps=1e-6, num_labels=7, seed=3)
    path = tmp_path / "audioset_tiny.pth"
    torch.save(hf_to_original_ast(hf_saved_state(hf)), path)
    names = write_labels_csv(tmp_path / "labels.csv", 7)
    tagger = load_model(path, labels=tmp_path / "labels.csv")
    assert_distinct_parameters(tagger.backends[0].model)
    c = tagger.config
    assert (c.family, c.dim, c.heads, c.depth, c.mlp_dim) == ("ast", 128, 2, 2, 256)
    assert (c.freq_stride, c.time_stride, c.max_frames, c.layer_norm_eps) == (10, 10, 128, 1e-6)
    assert (c.mean, c.std) == (AST_MEAN, AST_STD)
    assert tagger.labels == names and names[1] == "Sound 1, type 1"
    windows = [raw_fbank(n, seed) for seed, n in enumerate((60, 128, 400))]
    expected = hf_logits(hf, torch.stack([ast_window(w, 128) for w in windows]))
    got = tagger.logits([tagger.clip(w) for w in windows])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(tagger.score_windows(windows), expected.softmax(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("stride", "frames"), [(10, 1024), (16, 1024), (10, 128), (10, 512), (12, 1024),
                                                (14, 1024)])
def test_original_ast_geometry_inference(tmp_path, stride, frames):
    hf = make_hf_ast(hidden_size=64, num_attention_heads=1, intermediate_size=64, num_hidden_layers=1,
                     max_length=frames, frequency_stride=stride, time_stride=stride, num_labels=3)
    path = tmp_path / "geometry.pth"
    torch.save(hf_to_original_ast(hf_saved_state(hf)), path)
    config, state = load_checkpoint(path)
    assert (config.freq_stride, config.time_stride, config.max_frames) == (stride, stride, frames)
    assert config.grid_freq == hf.audio_spectrogram_transformer.embeddings.get_shape(hf.config)[0]
    assert config.grid_time == hf.audio_spectrogram_transformer.embeddings.get_shape(hf.config)[1]
    assert state["pos_grid"].shape == (config.grid_freq, config.grid_time, 64)


# -- ElasticAST (.pth) ----------------------------------------------------------------------------------


def elastic_reference(state: dict[str, torch.Tensor], raw: torch.Tensor) -> torch.Tensor:
    """ElasticAST logits of one clip, written out plainly in float64 from the paper's released design.

    ``raw`` is an unnormalised fbank ``[frames, mel]``; frames are cut to a multiple of 16 (and to the time table).
    """
    s = {k.removeprefix("module."): v.double() for k, v in state.items()}
    dim = s["patch_embed.0.weight"].shape[0]
    heads, dh = dim // 64, 64
    max_frames = s["pos_embed_time"].shape[0] * 16
    x = (raw.double() - ELASTIC_MEAN) / (2 * ELASTIC_STD)
    frames = min(x.shape[0], max_frames) // 16 * 16
    image = x[:frames].T  # [mel, time]: frequency rows, time columns
    tokens, positions = [], []
    for f in range(image.shape[0] // 16):
        for t in range(frames // 16):
            tokens.append(image[16 * f : 16 * f + 16, 16 * t : 16 * t + 16].reshape(-1))
            positions.append(s["pos_embed_freq"][f] + s["pos_embed_time"][t])

    def linear(name: str, v: torch.Tensor) -> torch.Tensor:
        return v @ s[name + ".weight"].T + s[name + ".bias"]

    def norm(name: str, v: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(v, (dim,), s[name + ".weight"], s[name + ".bias"], eps=1e-6)

    def attend(prefix: str, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = linear(prefix + ".to_q", queries)
        k, v = linear(prefix + ".to_kv", context).split(dim, dim=-1)
        out = []
        for h in range(heads):
            part = slice(h * dh, (h + 1) * dh)
            weights = (q[:, part] @ k[:, part].T).softmax(-1)  # no 1/sqrt(d) scale
            out.append(weights @ v[:, part])
        return linear(prefix + ".proj", torch.cat(out, dim=-1))

    x = linear("patch_embed.0", torch.stack(tokens)) + torch.stack(positions)
    depth = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("blocks.modules_list."))
    for i in range(depth):
        b = f"blocks.modules_list.{i}."
        h = norm(b + "norm1", x)
        x = x + attend(b + "attn", h, h)
        x = x + linear(b + "mlp.fc2", F.gelu(linear(b + "mlp.fc1", norm(b + "norm2", x))))
    x = norm("norm", x)
    pooled = attend("attn_pool", s["attn_pool_queries"][None], x)[0]  # no residual
    return linear("head", norm("mlp_norm", pooled))


def test_elastic_pth_matches_reference(tmp_path):
    state = make_elastic_state(dim=128, depth=2, num_classes=6, time_patches=24, seed=5)
    path = tmp_path / "elastic.pth"
    torch.save(state, path)
    names = write_labels_csv(tmp_path / "labels.csv", 6)
    tagger = load_model(path, labels=tmp_path / "labels.csv")
    assert_distinct_parameters(tagger.backends[0].model)
    c = tagger.config
    assert (c.family, c.dim, c.heads, c.depth, c.max_frames, c.attn_scale) == ("elastic", 128, 2, 2, 384, False)
    assert (c.mean, c.std, c.layer_norm_eps) == (ELASTIC_MEAN, ELASTIC_STD, 1e-6)
    assert tagger.labels == names
    windows = [raw_fbank(n, seed) for seed, n in enumerate((48, 160, 333, 20, 500))]  # 333 -> 320, 500 -> 384
    expected = torch.stack([elastic_reference(state, w) for w in windows]).float()
    assert expected.std() > 0.1
    got = tagger.logits([tagger.clip(w) for w in windows])  # one packed batch, short clips share rows
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(tagger.score_windows(windows), expected.softmax(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(tagger.score_windows(windows, batch_tokens=1), expected.softmax(-1), atol=1e-4,
                               rtol=0)


def test_elastic_own_format_round_trip(tmp_path):
    path = tmp_path / "elastic.pth"
    torch.save(make_elastic_state(dim=64, depth=1, num_classes=4, time_patches=10, seed=2), path)
    tagger = load_model(path, labels=["a", "b", "c", "d"])
    saved = tagger.save(tmp_path / "own")
    again = load_model(saved)
    assert_distinct_parameters(again.backends[0].model)
    assert again.config == tagger.config
    windows = [raw_fbank(n, seed) for seed, n in enumerate((40, 100, 160))]
    assert torch.equal(again.score_windows(windows), tagger.score_windows(windows))


# -- own format -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(transformers model, saved directory) of a tiny stride-10 AST with 5 classes."""
    hf = make_hf_ast(seed=11)
    return hf, save_hf_ast(hf, tmp_path_factory.mktemp("hf"))


def test_own_format_round_trip(hf_dir, tmp_path):
    _, directory = hf_dir
    tagger = load_model(directory)
    assert_distinct_parameters(tagger.backends[0].model)
    saved = tagger.save(tmp_path / "own")
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((saved / "config.json").read_text())
    assert meta["format"] == "astcli-model" and meta["labels"] == tagger.labels
    again = load_model(saved)
    assert_distinct_parameters(again.backends[0].model)
    assert again.config == tagger.config
    windows = [raw_fbank(n, seed) for seed, n in enumerate((70, 200, 300))]
    assert torch.equal(again.score_windows(windows), tagger.score_windows(windows))


# -- Hugging Face hub cache -----------------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local HF cache, offline; huggingface_hub reads its constants at import, so patch them too."""
    import huggingface_hub.constants as hub_constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_resolves_offline(hf_dir, hub_cache):
    hf, directory = hf_dir
    build_hub_cache(hub_cache, "owner/tiny-ast", directory, COMMIT)
    windows = [raw_fbank(n, seed) for seed, n in enumerate((90, 200, 250))]
    expected = hf_logits(hf, torch.stack([ast_window(w, 200) for w in windows])).softmax(-1)
    for revision in (None, "main", COMMIT):
        tagger = load_model("owner/tiny-ast", revision=revision)
        assert tagger.labels == [f"class {i}" for i in range(5)]
        torch.testing.assert_close(tagger.score_windows(windows), expected, atol=1e-4, rtol=0)


def test_hub_missing_repo_is_one_line(hub_cache):
    with pytest.raises(ModelError) as excinfo:
        load_model("owner/not-there")
    assert "cache" in one_line_error(excinfo)


def test_hub_unknown_revision_is_one_line(hf_dir, hub_cache):
    build_hub_cache(hub_cache, "owner/tiny-ast", hf_dir[1], COMMIT)
    with pytest.raises(ModelError) as excinfo:
        load_model("owner/tiny-ast", revision="f" * 40)
    one_line_error(excinfo)


@pytest.fixture
def preset_cards(tmp_path, monkeypatch, hub_cache, hf_dir):
    """Cards tiny-a / tiny-b (two hub models) and tiny-ens (their ensemble) in a patched presets dir."""
    cards = tmp_path / "cards"
    cards.mkdir()
    build_hub_cache(hub_cache, "owner/tiny-a", hf_dir[1], COMMIT)
    other = save_hf_ast(make_hf_ast(seed=12), tmp_path / "b")
    build_hub_cache(hub_cache, "owner/tiny-b", other, "fedcba9876543210fedcba9876543210fedcba98")
    (cards / "tiny-a.toml").write_text(f'description = "A"\nsource = "owner/tiny-a"\nrevision = "{COMMIT}"\n')
    (cards / "tiny-b.toml").write_text('description = "B"\nsource = "owner/tiny-b"\nrevision = "main"\n')
    (cards / "tiny-ens.toml").write_text('description = "A+B"\nmembers = ["tiny-a", "tiny-b"]\n')
    monkeypatch.setattr(presets, "presets_dir", lambda: cards)
    return cards


def test_preset_resolves_to_hub_id(preset_cards, hf_dir):
    hf, _ = hf_dir
    assert get_preset("tiny-a").source == "owner/tiny-a"
    windows = [raw_fbank(n, seed) for seed, n in enumerate((120, 210))]
    expected = hf_logits(hf, torch.stack([ast_window(w, 200) for w in windows])).softmax(-1)
    tagger = load_model("tiny-a")
    assert len(tagger.backends) == 1 and isinstance(tagger.backends[0], TorchBackend)
    torch.testing.assert_close(tagger.score_windows(windows), expected, atol=1e-4, rtol=0)


def test_ensemble_preset_averages_members(preset_cards):
    windows = [raw_fbank(n, seed) for seed, n in enumerate((120, 210, 64))]
    ensemble = load_model("tiny-ens")
    assert len(ensemble.backends) == 2
    a, b = load_model("tiny-a").score_windows(windows), load_model("tiny-b").score_windows(windows)
    assert (a - b).abs().max() > 1e-3  # the members differ, so the mean is a real check
    torch.testing.assert_close(ensemble.score_windows(windows), (a + b) / 2, atol=1e-6, rtol=0)


def test_shipped_cards_parse():
    cards = list_presets()
    names = {p.name for p in cards}
    assert "ast-audioset" in names
    for card in cards:
        assert card.description
        if card.members:
            assert card.source is None
            for member in card.members:
                assert member in names, f"{card.name}: member {member} has no card"
                assert not get_preset(member).members, "no nested ensembles"
        else:
            assert card.source and card.source.count("/") == 1, card.name
            assert card.revision


# -- malformed checkpoints: one-line ModelError, never a traceback --------------------------------------


class MarkerWriter:
    """Unpickling this would create ``path``: a weights-only loader must refuse it without running it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def tiny_pth_state() -> dict[str, torch.Tensor]:
    """A 1-layer, dim-64 original-AST state dict (128 frames, 3 classes)."""
    hf = make_hf_ast(hidden_size=64, num_attention_heads=1, intermediate_size=64, num_hidden_layers=1,
                     max_length=128, num_labels=3)
    return hf_to_original_ast(hf_saved_state(hf))


def expect_model_error(source, **kwargs) -> str:
    with pytest.raises(ModelError) as excinfo:
        load_model(source, **kwargs)
    return one_line_error(excinfo)


def test_missing_path(tmp_path):
    assert "no such" in expect_model_error(tmp_path / "nothing.pth")
    assert "no such" in expect_model_error(str(tmp_path / "nothing"))


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "config.json" in expect_model_error(tmp_path / "empty")


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe", "[1, 2]", "42", '{"model_type": "bert"}'])
def test_bad_config_json(tmp_path, text):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_bytes(text.encode("latin-1"))
    expect_model_error(tmp_path / "m")


@pytest.mark.parametrize("text", ["{bad", "[]"])
def test_bad_preprocessor_config(hf_dir, tmp_path, text):
    directory = shutil.copytree(hf_dir[1], tmp_path / "hf")
    (directory / "preprocessor_config.json").write_text(text)
    assert "preprocessor_config.json" in expect_model_error(directory)


def test_hf_config_missing_field(hf_dir, tmp_path):
    directory = shutil.copytree(hf_dir[1], tmp_path / "hf")
    meta = json.loads((directory / "config.json").read_text())
    del meta["hidden_size"]
    (directory / "config.json").write_text(json.dumps(meta))
    assert "hidden_size" in expect_model_error(directory)


def test_own_format_unknown_config_key(hf_dir, tmp_path):
    saved = load_model(hf_dir[1]).save(tmp_path / "own")
    meta = json.loads((saved / "config.json").read_text())
    meta["not_a_key"] = 1
    (saved / "config.json").write_text(json.dumps(meta))
    assert "not_a_key" in expect_model_error(saved)


def test_own_format_bad_config_value(hf_dir, tmp_path):
    saved = load_model(hf_dir[1]).save(tmp_path / "own")
    meta = json.loads((saved / "config.json").read_text())
    meta["family"] = "nope"
    (saved / "config.json").write_text(json.dumps(meta))
    expect_model_error(saved)


@pytest.mark.parametrize("source", ["own", "hf"])
def test_truncated_safetensors(hf_dir, tmp_path, source):
    directory = load_model(hf_dir[1]).save(tmp_path / "own") if source == "own" else shutil.copytree(
        hf_dir[1], tmp_path / "hf")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    expect_model_error(directory)


def test_missing_weights_file(hf_dir, tmp_path):
    saved = load_model(hf_dir[1]).save(tmp_path / "own")
    (saved / "model.safetensors").unlink()
    assert "weights" in expect_model_error(saved)


def test_truncated_and_random_pth(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(tiny_pth_state(), good)
    data = good.read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    expect_model_error(tmp_path / "half.pth")
    gen = torch.Generator().manual_seed(0)
    (tmp_path / "noise.pth").write_bytes(bytes(torch.randint(0, 256, (4096,), generator=gen).tolist()))
    expect_model_error(tmp_path / "noise.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    expect_model_error(tmp_path / "empty.pth")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_unsafe_pickle_is_refused_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"w": MarkerWriter(marker)}}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert "weights-only" in expect_model_error(path)
    assert not marker.exists(), "the pickle was executed"


def test_pth_without_tensors(tmp_path):
    torch.save({"epoch": 3, "note": "hello"}, tmp_path / "meta.pth")
    expect_model_error(tmp_path / "meta.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    expect_model_error(tmp_path / "list.pth")


@pytest.mark.parametrize("key", ["module.v.blocks.0.norm1.weight", "module.mlp_head.1.weight",
                                 "module.v.patch_embed.proj.weight", "module.v.cls_token"])
def test_original_ast_missing_key(tmp_path, key):
    state = tiny_pth_state()
    del state[key]
    torch.save(state, tmp_path / "x.pth")
    expect_model_error(tmp_path / "x.pth")


@pytest.mark.parametrize("key", ["module.blocks.modules_list.1.attn.to_kv.weight", "module.head.bias",
                                 "module.attn_pool_queries", "module.pos_embed_time"])
def test_elastic_missing_key(tmp_path, key):
    state = make_elastic_state(dim=64, depth=2, num_classes=3, time_patches=4)
    del state[key]
    torch.save(state, tmp_path / "x.pth")
    expect_model_error(tmp_path / "x.pth")


def test_misshaped_tensors(tmp_path, hf_dir):
    state = tiny_pth_state()
    state["module.v.blocks.0.mlp.fc2.weight"] = torch.zeros(64, 65)
    torch.save(state, tmp_path / "a.pth")
    assert "fc2" in expect_model_error(tmp_path / "a.pth")
    state = tiny_pth_state()
    state["module.v.pos_embed"] = torch.zeros(1, 2 + 7, 64)  # 7 patches: no stride fits
    torch.save(state, tmp_path / "b.pth")
    expect_model_error(tmp_path / "b.pth")
    el = make_elastic_state(dim=64, depth=1, num_classes=3, time_patches=4)
    el["module.blocks.modules_list.0.attn.to_kv.weight"] = torch.zeros(128, 63)
    torch.save(el, tmp_path / "c.pth")
    expect_model_error(tmp_path / "c.pth")
    # transformers directory with a classifier that does not match id2label.
    directory = shutil.copytree(hf_dir[1], tmp_path / "hf")
    tensors = load_file(directory / "model.safetensors")
    tensors["classifier.dense.weight"] = torch.zeros(9, 64)
    save_file(tensors, directory / "model.safetensors")
    assert "head.weight (9, 64)" in expect_model_error(directory)


def test_labels_count_mismatch(tmp_path, hf_dir):
    torch.save(tiny_pth_state(), tmp_path / "x.pth")
    write_labels_csv(tmp_path / "labels.csv", 5)
    assert "label" in expect_model_error(tmp_path / "x.pth", labels=tmp_path / "labels.csv")
    expect_model_error(hf_dir[1], labels=["only one"])
    (tmp_path / "bad.json").write_text("{oops")
    expect_model_error(tmp_path / "x.pth", labels=tmp_path / "bad.json")
    expect_model_error(tmp_path / "x.pth", labels=tmp_path / "missing.csv")


def test_unknown_architecture_keys(tmp_path):
    torch.save({"encoder.layers.0.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, tmp_path / "x.pth")
    assert "unknown keys" in expect_model_error(tmp_path / "x.pth")
    save_file({"w": torch.zeros(2)}, tmp_path / "y.safetensors")
    expect_model_error(tmp_path / "y.safetensors")


def test_extra_tensor_in_own_format(hf_dir, tmp_path):
    saved = load_model(hf_dir[1]).save(tmp_path / "own")
    tensors = load_file(saved / "model.safetensors")
    tensors["surprise"] = torch.zeros(1)
    save_file(tensors, saved / "model.safetensors")
    assert "surprise" in expect_model_error(saved)
