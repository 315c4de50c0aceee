"""Training: recipes, the loop (learning, resume after SIGKILL / SIGTERM, weight averaging, bad audio),
the `train` / `finetune` commands on an ESC-50 layout, DDP on two CPU processes, ImageNet weight transfer."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from astcli.cli import app, flag_for
from astcli.errors import ModelError, ParameterError, UsageError
from astcli.model import AudioTransformer, ast_config, elastic_config
from astcli.tagger import load_model
from astcli.train import experiment
from astcli.train.batches import scan_lengths
from astcli.train.datasets import load_dataset, run_splits
from astcli.train.logs import TIMING_KEYS
from astcli.train.optimization import learning_rate, make_optimizer
from astcli.train.probe import clip_features, probe_split
from astcli.train.recipes import Recipe, recipe_for, resolve_recipe, with_overrides
from astcli.train.state import TrainingState, WeightAverage, load_state, save_state
from astcli.train.statistics import fbank_statistics
from astcli.train.trainer import RunOptions, fit

SR = 16000
KINDS = ("tone", "noise", "chirp", "clicks")
TINY = {"dim": 64, "depth": 2, "heads": 2, "mlp_dim": 128}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_sound(kind: str, rng: np.random.Generator, seconds: float) -> np.ndarray:
    """One clip of a class that a tiny model can tell apart: a ~1 kHz tone, gated noise, an up-chirp, clicks."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    if kind == "tone":
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(900, 1100) * t)
    elif kind == "noise":
        x = 0.3 * rng.standard_normal(n) * (np.sin(2 * np.pi * rng.uniform(2, 5) * t) > 0)
    elif kind == "chirp":
        f0, f1 = rng.uniform(200, 400), rng.uniform(5000, 6000)
        x = 0.3 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
    else:
        x = np.zeros(n)
        x[:: int(SR / rng.uniform(8, 20))] = 0.9
    return (x + 0.003 * rng.standard_normal(n)).astype(np.float32)


def make_folder(root: Path, per_class: int, seed: int = 0, kinds=KINDS) -> Path:
    """A folder dataset: one sub-folder per class, clips of 0.5-1 s."""
    rng = np.random.default_rng(seed)
    for kind in kinds:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            sf.write(root / kind / f"{i}.wav", make_sound(kind, rng, rng.uniform(0.5, 1.0)), SR)
    return root


def make_esc50(root: Path, kinds=KINDS[:3], folds: int = 5, seconds: float = 1.0) -> Path:
    """The ESC-50 layout (meta/esc50.csv + audio/), one clip per class per fold."""
    rng = np.random.default_rng(7)
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for fold in range(1, folds + 1):
            for target, kind in enumerate(kinds):
                name = f"{fold}-{target}-A-{kind}.wav"
                sf.write(root / "audio" / name, make_sound(kind, rng, seconds), SR)
                writer.writerow([name, fold, target, kind, "False", f"{fold}{target}", "A"])
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is faster and steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "small", per_class=6, seed=3)


# -- recipes and schedule ------------------------------------------------------------------------------


def test_recipes_carry_the_paper_defaults_and_take_overrides():
    esc = recipe_for("esc50", pretrained="audioset")
    assert (esc.lr, esc.epochs, esc.batch_size, esc.freqm, esc.timem, esc.window) == (1e-5, 25, 48, 24, 96, 512)
    assert (esc.loss, esc.lr_decay, esc.lr_decay_start, esc.mean, esc.std) == ("ce", 0.85, 5, -6.6268077, 5.358466)
    assert recipe_for("esc50", pretrained="imagenet").lr == 1e-4
    sc = recipe_for("speechcommands")
    assert (sc.lr, sc.epochs, sc.batch_size, sc.freqm, sc.timem, sc.mixup, sc.loss, sc.window, sc.noise) == (
        2.5e-4, 30, 128, 48, 48, 0.6, "bce", 128, True)
    assert (sc.mean, sc.std) == (-6.845978, 5.5654526)
    aset = recipe_for("audioset")
    assert (aset.lr, aset.epochs, aset.batch_size, aset.timem, aset.mixup) == (1e-5, 5, 12, 192, 0.5)
    assert aset.balanced and aset.select == "wa"
    assert (aset.lr_decay, aset.lr_decay_start, aset.wa_start, aset.wa_end, aset.warmup_steps) == (0.5, 2, 1, 5, 1000)
    custom = recipe_for("my-sounds", pretrained="imagenet", multi_label=True)
    assert (custom.lr, custom.epochs, custom.batch_size, custom.loss) == (1e-4, 10, 32, "bce")
    assert recipe_for("my-sounds").lr == 1e-5
    scratch = recipe_for("my-sounds", pretrained="none", size="tiny")
    assert (scratch.name, scratch.optimizer, scratch.lr, scratch.weight_decay, scratch.loss) == (
        "scratch", "adamw", 1e-4, 0.05, "ce")
    assert (scratch.batch_size, scratch.freqm, scratch.timem, scratch.token_dropout, scratch.clip_grad) == (
        16, 0, 0, 0.0, 1.0)
    assert (scratch.noise, scratch.reference_frames, scratch.wa_share, scratch.wa_start) == (True, 128, 1 / 3, None)
    assert [recipe_for("x", pretrained="none", size=s).lr for s in ("small", "base")] == [5e-5, 2.5e-5]
    assert recipe_for("esc50", pretrained="none").name == "esc50"  # a published recipe stays
    changed = esc.replace(lr=3e-4, epochs=3, mixup=None)
    assert (changed.lr, changed.epochs, changed.mixup) == (3e-4, 3, 0.0)
    assert Recipe.from_dict(changed.to_dict()) == changed
    with pytest.raises(ParameterError, match="not a recipe field"):
        esc.replace(learning_rate=1.0)
    with pytest.raises(ParameterError, match="wa_start") as caught:
        esc.replace(wa_start=3, wa_end=30)
    assert caught.value.parameter == "wa_start"
    with pytest.raises(ParameterError, match="mixup"):
        esc.replace(mixup=1.5)
    with pytest.raises(ParameterError) as caught:
        Recipe(lr=-1).validate()
    assert (caught.value.parameter, caught.value.problem) == ("lr", "must be positive (got -1)")
    with pytest.raises(dataclasses.FrozenInstanceError):
        esc.lr = 1.0


def test_learning_rate_warms_up_linearly_then_decays_per_epoch_like_ast():
    r = Recipe(lr=1.0, lr_decay=0.5, lr_decay_start=2, warmup_steps=4)
    assert learning_rate(r, 1, 1) == 0.25 and learning_rate(r, 1, 3) == 0.75
    assert learning_rate(r, 1, 4) == 1.0 and learning_rate(r, 2, 99) == 1.0
    assert learning_rate(r, 3, 99) == 0.5 and learning_rate(r.replace(warmup_steps=0), 5, 99) == 0.125


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_the_fused_optimizer_takes_the_same_steps_as_torchs_per_tensor_one(kind):
    torch.manual_seed(0)
    model = AudioTransformer(elastic_config("tiny", num_classes=3, depth=2))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    recipe = recipe_for("custom", pretrained="none", size="tiny").replace(optimizer=kind, weight_decay=0.05)
    fused = make_optimizer(model.parameters(), recipe)
    assert fused.defaults["fused"]
    plain = (torch.optim.AdamW if kind == "adamw" else torch.optim.Adam)(
        reference, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay, foreach=False)
    for _ in range(5):
        for p, q in zip(model.parameters(), reference, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert all(not torch.equal(p, q0) for p, q0 in zip(model.parameters(), start, strict=True))  # it stepped


def test_one_function_derives_every_default_the_recipe_leaves_open(small_folder):
    ds = load_dataset(small_folder)  # 4 classes x 6 clips of 0.5-1 s
    samples, errors = scan_lengths([e.path for e in ds.examples])
    assert not errors
    split = dataclasses.replace(run_splits(ds, None, 0.25)[0], lengths=samples)
    assert (len(split.train), len(split.validation)) == (16, 8)  # round(6 x 0.25) = 2 per class held out
    config = ast_config("tiny", **TINY, num_classes=4)
    open_recipe = Recipe(batch_size=2, epochs=10)
    assert set(open_recipe.unresolved()) == {"loss", "balanced", "token_dropout", "window", "mean", "std",
                                             "batch_tokens", "warmup_steps", "select"}
    r = resolve_recipe(open_recipe, command="train", config=config, split=split)
    assert r.unresolved() == []
    frames = max(1 + (n - 400) // 160 for n in samples)  # 25 ms windows every 10 ms at 16 kHz
    assert r.window == frames and 48 <= frames <= 98
    assert (r.loss, r.balanced, r.token_dropout, r.select, r.mean, r.std) == (
        "ce", False, 0.0, "best", config.mean, config.std)
    ast_tokens = 12 * ((frames - 16) // 10 + 1) + 2  # 12 frequency patches (stride 10) x time patches + CLS/DIST
    assert r.batch_tokens == 2 * ast_tokens
    assert r.warmup_steps == 4  # 16 clips / 2 per batch = 8 steps x 10 epochs = 80; 5 % of 80
    assert resolve_recipe(open_recipe.replace(grad_accum=3), command="train", config=config,
                          split=split).warmup_steps == 2  # ceil(8 / 3) x 10 = 30 steps; round(1.5)
    assert resolve_recipe(open_recipe, command="train", config=config, split=split, world=2).warmup_steps == 2
    # a step floor: 8 steps per epoch x 10 epochs is short of 100 steps, so 13 epochs, the decay 5 -> 6.5 -> 6
    floor = resolve_recipe(open_recipe.replace(min_steps=100), command="train", config=config, split=split)
    assert (floor.epochs, floor.lr_decay_start, floor.warmup_steps) == (13, 6, 5)
    # the averaged share follows the final epochs: the last ceil(20 / 3) = 7 of 20; ceil(13 / 3) = 5 of the floor's 13
    share = open_recipe.replace(wa_share=1 / 3)
    averaged = [(r.wa_start, r.wa_end, r.select) for r in (
        resolve_recipe(share.replace(epochs=20), command="train", config=config, split=split),
        resolve_recipe(share.replace(min_steps=100), command="train", config=config, split=split),
        resolve_recipe(share.replace(epochs=1), command="train", config=config, split=split),
        resolve_recipe(share.replace(epochs=30), command="train", config=config, split=split),
        resolve_recipe(share.replace(wa_start=2, wa_end=3), command="train", config=config, split=split),
        resolve_recipe(share.replace(select="best"), command="train", config=config, split=split))]
    assert averaged == [(14, 20, "wa"), (9, 13, "wa"), (1, 1, "wa"), (21, 30, "wa"), (2, 3, "wa"), (None, None, "best")]
    assert Recipe(select="wa", wa_share=0.5).select == "wa"
    # a share asked for replaces a published recipe's own selection (ESC-50: last) and range (AudioSet: 1-5)
    for name in ("esc50", "audioset"):
        asked = with_overrides(recipe_for(name), {"wa_share": 0.4, "epochs": 10})
        assert (asked.wa_start, asked.select, asked.min_steps) == (None, None, 0)
        resolved = resolve_recipe(asked, command="train", config=config, split=split)
        assert (resolved.wa_start, resolved.wa_end, resolved.select) == (7, 10, "wa")
    kept = with_overrides(recipe_for("esc50"), {"wa_share": 0.4, "select": "best"})
    assert resolve_recipe(kept, command="train", config=config, split=split).wa_start is None
    assert with_overrides(recipe_for("audioset"), {"lr": 1e-4}).wa_start == 1  # no share asked: the recipe's
    with pytest.raises(ParameterError, match="goes without wa_start") as caught:
        with_overrides(recipe_for("x", pretrained="none", size="tiny"), {"wa_share": 0.5, "wa_start": 2})
    assert caught.value.parameter == "wa_share"
    for bad in (-0.1, 1.5):
        with pytest.raises(ParameterError, match="share of the epochs") as caught:
            open_recipe.replace(wa_share=bad)
        assert caught.value.parameter == "wa_share"
    with pytest.raises(ParameterError, match="wa needs wa_start"):
        open_recipe.replace(select="wa")
    assert resolve_recipe(open_recipe.replace(min_steps=80), command="train", config=config, split=split).epochs == 10
    elastic = elastic_config("tiny", **TINY, num_classes=4)
    fitted = resolve_recipe(open_recipe, command="train", config=elastic, split=split, statistics=(-3.0, 4.0))
    clip_frames = [1 + (samples[i] - 400) // 160 for i in split.train]
    mean_tokens = sum(8 * (f // 16) for f in clip_frames) / len(clip_frames)  # 8 x 16-frame patches per column
    assert fitted.batch_tokens == math.ceil(2 * mean_tokens)  # 2 clips of the mean length, not of the longest
    assert (fitted.mean, fitted.std) == (-3.0, 4.0) and fitted.token_dropout == 0.1
    assert resolve_recipe(open_recipe, command="finetune", config=elastic, split=split).token_dropout == 0.0
    given = Recipe(window=64, loss="bce", balanced=True, token_dropout=0.3, mean=-1.0, std=2.0, batch_tokens=999,
                   warmup_steps=7, select="last")
    assert resolve_recipe(given, command="train", config=config, split=split) == given.replace(token_dropout=0.0)
    assert resolve_recipe(Recipe(wa_start=1, wa_end=2), command="train", config=config, split=split).select == "wa"
    no_validation = dataclasses.replace(split, validation=())
    assert resolve_recipe(Recipe(), command="train", config=config, split=no_validation).select == "last"
    assert resolve_recipe(Recipe(), command="train", config=config, split=dataclasses.replace(
        split, lengths=None)).window == 1024
    with pytest.raises(ParameterError, match="ElasticAST") as caught:
        resolve_recipe(Recipe(random_hop=True), command="train", config=config, split=split)
    assert caught.value.parameter == "random_hop"
    with pytest.raises(ParameterError, match="resolve it first"):
        fit(AudioTransformer(config), split, open_recipe, RunOptions(Path("unused")))


# -- learning ------------------------------------------------------------------------------------------


def test_tiny_elastic_model_learns_generated_sounds(tmp_path):
    data = make_folder(tmp_path / "sounds", per_class=16, seed=1)
    result = experiment.train(str(data), tmp_path / "out", arch="elastic", size="tiny", init="none",
                              model_options={**TINY, "max_frames": 128}, epochs=8, lr=2e-3, batch_size=4,
                              lr_decay_start=100, val_fraction=0.25, num_workers=0, progress=False)
    run = result.runs[0]
    assert run.selected == "wa" and run.metrics["top1"] >= 0.75  # the last third averaged; 16 clips; chance 0.25
    assert [r["epoch"] for r in run.history] == list(range(1, 9))  # given epochs: no step floor
    out = tmp_path / "out"
    assert len((out / "log.jsonl").read_text().splitlines()) == 8
    header = (out / "log.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "lr", "train_loss", "top1", "seconds", "clips_per_s"} <= set(header)
    assert (out / "curves.png").stat().st_size > 0 and not (out / "state.pt").exists()
    tagger = load_model(out / "model", device="cpu")
    assert tagger.labels == ["chirp", "clicks", "noise", "tone"] and tagger.config.family == "elastic"
    waves = [torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in sorted(data.glob("*/*.wav"))]
    truth = torch.tensor([tagger.labels.index(Path(p).parent.name) for p in sorted(data.glob("*/*.wav"))])
    accuracy = (tagger.predict(waves).argmax(-1) == truth).float().mean().item()
    assert accuracy >= 0.85  # training + validation clips


def test_a_new_model_normalises_with_its_training_clips_statistics_and_reports_the_probe(tmp_path, capsys):
    data = make_folder(tmp_path / "sounds", per_class=5, seed=2, kinds=KINDS[:2])
    out = tmp_path / "out"
    result = experiment.train(str(data), out, arch="elastic", size="tiny", init="none", model_options=TINY,
                              epochs=1, lr=1e-6, batch_size=4, val_fraction=0.4, num_workers=0)
    ds, (split,) = load_dataset(data), run_splits(load_dataset(data), None, 0.4)
    stats = fbank_statistics([ds.examples[i].path for i in split.train])  # fewer than 500: every training clip
    run = json.loads((out / "run.json").read_text())
    assert run["statistics"] == {"mean": stats.mean, "std": stats.std, "source": "training clips", "clips": 6,
                                 "frames": stats.frames}
    model = load_model(out / "model", device="cpu")
    assert (model.config.mean, model.config.std) == (stats.mean, stats.std)
    features, _ = clip_features([e.path for e in ds.examples])
    probe = probe_split(ds, features, list(split.train), list(split.validation))
    saved = json.loads((out / "result.json").read_text())["baseline"]
    assert saved["on"] == "validation" and saved["metrics"] == probe.metrics == {"top1": 1.0}
    assert result.runs[0].metrics["top1"] <= 1.0 and "probe_top1" in result.table().splitlines()[0]
    err = capsys.readouterr().err  # lr 1e-6 for one step: the model cannot beat a perfect probe
    assert "does not beat the linear probe's 1.0000" in err and "from training clips" in err
    given = experiment.train(str(data), tmp_path / "given", arch="elastic", size="tiny", init="none",
                             model_options=TINY, epochs=1, batch_size=4, mean=-5.0, std=3.0, num_workers=0)
    assert json.loads((tmp_path / "given" / "run.json").read_text())["statistics"]["source"] == "given"
    assert (given.runs[0].model.config.mean, given.runs[0].model.config.std) == (-5.0, 3.0)
    assert not (tmp_path / "given" / "statistics.json").exists()


def test_a_trained_model_fine_tunes_to_new_classes_better_than_training_from_scratch(tmp_path):
    # masks, token dropout, no clipping, no feature noise and the best epoch, fixed here so the numbers do not
    # move with the scratch defaults
    fixed = dict(freqm=24, timem=48, token_dropout=0.1, clip_grad=1e9, noise=False, wa_share=0.0)
    pre = experiment.train(str(make_folder(tmp_path / "a", per_class=16, seed=1)), tmp_path / "pre", arch="elastic",
                           size="tiny", init="none", model_options=TINY, epochs=8, lr=2e-3, batch_size=4,
                           lr_decay_start=100, val_fraction=0.25, num_workers=0, **fixed)
    assert pre.runs[0].metrics["top1"] >= 0.75
    pretrained = load_model(tmp_path / "pre" / "model", device="cpu").config
    few = make_folder(tmp_path / "b", per_class=12, seed=9, kinds=("clicks", "tone"))
    for kind, name in (("clicks", "ticking"), ("tone", "beeping")):  # new classes: 3 training clips each
        (few / kind).rename(few / name)
    recipe = dict(epochs=1, lr=3e-3, batch_size=2, val_fraction=0.75, select="last", num_workers=0)
    tuned = experiment.finetune(str(few), tmp_path / "tuned", model=str(tmp_path / "pre" / "model"), **recipe)
    scratch = experiment.train(str(few), tmp_path / "scratch", arch="elastic", size="tiny", init="none",
                               model_options=TINY, **recipe, **fixed)
    model = load_model(tmp_path / "tuned" / "model", device="cpu")
    assert model.labels == ["beeping", "ticking"] and model.config.num_classes == 2
    assert (model.config.mean, model.config.std) == (pretrained.mean, pretrained.std)  # its statistics kept
    run = json.loads((tmp_path / "tuned" / "run.json").read_text())
    assert run["statistics"]["source"] == "the pretrained model"
    assert tuned.runs[0].metrics["top1"] >= scratch.runs[0].metrics["top1"] + 0.2  # 18 validation clips, 5 steps


def test_weight_averaging_is_the_mean_of_the_weights_after_each_epoch(small_folder, tmp_path):
    after_epoch = {}

    def keep(record):  # state.pt is written before this is called: it holds the epoch's weights
        state = torch.load(tmp_path / "wa" / "state.pt", weights_only=True)
        after_epoch[record["epoch"]] = state["parts"]["model"]

    result = experiment.train(str(small_folder), tmp_path / "wa", arch="ast", size="tiny", init="none",
                              model_options=TINY, epochs=3, lr=1e-3, batch_size=6, wa_start=2, wa_end=3,
                              num_workers=0, progress=False, on_epoch_end=keep)
    run = result.runs[0]
    assert run.selected == "wa" and run.epoch == 3
    recorded = json.loads((tmp_path / "wa" / "run.json").read_text())["resolved_recipe"]
    assert Recipe.from_dict(recorded).unresolved() == [] and recorded["select"] == "wa"
    a, b = after_epoch[2], after_epoch[3]
    final = load_file(str(tmp_path / "wa" / "model" / "model.safetensors"))
    assert set(final) == set(a)
    for key in final:
        assert torch.allclose(final[key], ((a[key].double() + b[key].double()) / 2).float(), atol=0, rtol=0), key
    assert not torch.equal(a["blocks.0.fc1.weight"], b["blocks.0.fc1.weight"])
    assert sorted(p.name for p in (tmp_path / "wa").iterdir()) == [
        "curves.png", "lengths.json", "log.csv", "log.jsonl", "model", "result.json", "run.json",
        "statistics.json", "summary.json"]  # no file per epoch; state.pt removed once the run is done


def test_weight_average_sums_in_float64_and_refuses_an_empty_range():
    average = WeightAverage()
    with pytest.raises(UsageError, match="no epoch weights"):
        average.mean()
    big, small = torch.tensor([1e8], dtype=torch.float32), torch.tensor([1.0], dtype=torch.float32)
    for value in (big, small, small, -big):
        average.add({"w": value})
    assert average.mean()["w"].item() == 0.5  # (1e8 + 1 + 1 - 1e8) / 4: a float32 sum would lose the ones
    restored = WeightAverage()
    restored.load_state_dict(average.state_dict())
    assert restored.count == 4 and torch.equal(restored.mean()["w"], average.mean()["w"])


def test_a_state_saved_for_other_epochs_or_another_range_is_refused_by_name(tmp_path):
    saved = {"train": 10, "val": 2, "classes": 3, "epochs": 20, "averaged": [14, 20]}
    save_state(tmp_path / "state.pt", TrainingState(epoch=3), {"model": torch.nn.Linear(2, 2)}, saved)
    assert load_state(tmp_path / "state.pt", {"model": torch.nn.Linear(2, 2)}, dict(saved)).epoch == 3
    differs = re.escape("another run (epochs 20 (now 22), averaged [14, 20] (now [15, 22]))")
    with pytest.raises(UsageError, match=differs):
        load_state(tmp_path / "state.pt", {"model": torch.nn.Linear(2, 2)},
                   {**saved, "epochs": 22, "averaged": [15, 22]})


def test_a_share_with_a_range_is_a_usage_error_before_anything_is_written(small_folder, tmp_path):
    with pytest.raises(ParameterError, match="goes without wa_start"):
        experiment.train(str(small_folder), tmp_path / "out", arch="elastic", size="tiny", init="none",
                         model_options=TINY, wa_share=0.5, wa_start=1, wa_end=2, num_workers=0)
    assert not (tmp_path / "out").exists()


def test_unreadable_audio_is_counted_and_reported_once(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=4, seed=5, kinds=KINDS[:2])
    (data / "tone" / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage that is not audio" * 10)
    (data / "noise" / "empty.wav").write_bytes(b"")
    # AST with a fixed window reads no headers up front: failures surface in the data workers, every epoch.
    result = experiment.train(str(data), tmp_path / "ast", arch="ast", size="tiny", init="none", model_options=TINY,
                              epochs=2, lr=1e-3, batch_size=4, window=64, val_fraction=0.2, num_workers=0)
    assert result.runs[0].bad_clips == 2 and len(result.runs[0].history) == 2
    assert result.runs[0].history[-1]["bad"] == 2
    assert capsys.readouterr().err.count("warning: skipping unreadable audio") == 1
    # ElasticAST reads the headers first: the same files are skipped before training, with one warning.
    result = experiment.train(str(data), tmp_path / "elastic", arch="elastic", size="tiny", init="none",
                              model_options=TINY, epochs=1, lr=1e-3, batch_size=4, num_workers=0)
    assert result.runs[0].bad_clips == 2
    err = capsys.readouterr().err
    assert err.count("warning: 2 unreadable clip(s) skipped") == 1 and "skipping" not in err


def test_clips_shorter_than_one_frame_are_not_trained_on(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=4, seed=6, kinds=KINDS[:2])
    sf.write(data / "tone" / "click.wav", np.full(200, 0.5, np.float32), 16000)  # 12.5 ms: no analysis frame
    result = experiment.train(str(data), tmp_path / "ast", arch="ast", size="tiny", init="none", model_options=TINY,
                              epochs=1, lr=1e-3, batch_size=4, window=64, val_fraction=0.2, num_workers=0)
    assert result.runs[0].bad_clips == 1
    assert "too short: 200 samples" in capsys.readouterr().err


# -- resume --------------------------------------------------------------------------------------------

RUNNER = textwrap.dedent("""
    import json, os, signal, sys, time
    from astcli.train import experiment

    mode, data, out = sys.argv[1:4]
    kw = dict(arch="elastic", size="tiny", init="none", model_options={"dim": 64, "depth": 2, "heads": 2,
              "mlp_dim": 128, "max_frames": 128}, epochs=3, lr=1e-3, batch_size=2, seed=11, mixup=0.5,
              noise=True, random_hop=True, token_dropout=0.2, wa_start=1, wa_end=3, num_workers=0, progress=False)
    if mode == "straight":
        result = experiment.train(data, out, **kw)
    elif mode == "hang-after-epoch-1":
        def hang(record):
            if record["epoch"] == 1:
                print("EPOCH-1-SAVED", flush=True)
                time.sleep(600)
        result = experiment.train(data, out, on_epoch_end=hang, **kw)
    elif mode == "sigterm-in-epoch-2":
        seen = []
        def term(epoch, step):
            seen.append(epoch)
            if epoch == 2 and seen.count(2) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        result = experiment.train(data, out, on_step=term, **kw)
    else:
        result = experiment.resume(out, num_workers=0, progress=False)
    print(json.dumps({"interrupted": result.interrupted, "signum": result.signum}), flush=True)
    sys.exit(143 if result.interrupted else 0)
""")


def _runner(tmp_path: Path) -> Path:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    return script


def _comparable(out: Path) -> tuple[dict, dict]:
    result = json.loads((out / "result.json").read_text())
    for record in result["history"]:
        for key in TIMING_KEYS:
            record.pop(key)
    result["baseline"].pop("seconds")
    return result, load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(small_folder, tmp_path_factory):
    base = tmp_path_factory.mktemp("straight")
    out = base / "out"
    subprocess.run([sys.executable, str(_runner(base)), "straight", str(small_folder), str(out)], env=ENV,
                   check=True, capture_output=True, timeout=300)
    return _comparable(out)


def _assert_same(run_a, run_b):
    (result_a, weights_a), (result_b, weights_b) = run_a, run_b
    assert result_a == result_b
    assert set(weights_a) == set(weights_b)
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


def test_run_killed_with_sigkill_resumes_to_the_same_result(small_folder, straight_run, tmp_path):
    script, out = _runner(tmp_path), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), "hang-after-epoch-1", str(small_folder), str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "EPOCH-1-SAVED"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(out / "state.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 0) and not (out / "model").exists()
    assert set(state["rng"]) <= {"torch", "cuda"}  # torch's generators only: nothing draws from Python's or NumPy's
    done = subprocess.run([sys.executable, str(script), "resume", str(small_folder), str(out)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _assert_same(straight_run, _comparable(out))


def test_sigterm_saves_a_resumable_mid_epoch_checkpoint(small_folder, straight_run, tmp_path):
    script, out = _runner(tmp_path), tmp_path / "out"
    stopped = subprocess.run([sys.executable, str(script), "sigterm-in-epoch-2", str(small_folder), str(out)],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr
    assert json.loads(stopped.stdout.splitlines()[-1]) == {"interrupted": True, "signum": signal.SIGTERM}
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["batch"] == 2  # two steps of epoch 2 done, then saved
    done = subprocess.run([sys.executable, str(script), "resume", str(small_folder), str(out)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _assert_same(straight_run, _comparable(out))


# -- commands ------------------------------------------------------------------------------------------


def test_cli_train_then_finetune_on_an_esc50_layout(small_folder, tmp_path):
    runner = CliRunner()
    tiny = [arg for key, value in TINY.items() for arg in ("--model-option", f"{key}={value}")]
    trained = runner.invoke(app, ["train", "--dataset", str(small_folder), "--arch", "ast", "--size", "tiny",
                                  "--init", "none", *tiny, "--epochs", "1", "--lr", "1e-3", "--batch-size", "6",
                                  "--num-workers", "0", "-o", str(tmp_path / "pre")])
    assert trained.exit_code == 0, trained.output
    assert "model:" in trained.stdout and 48 <= load_model(tmp_path / "pre" / "model").config.max_frames <= 98

    esc = make_esc50(tmp_path / "ESC-50")
    tuned = runner.invoke(app, ["finetune", "--dataset", "esc50", "--data-dir", str(esc), "--model",
                                str(tmp_path / "pre" / "model"), "--window-frames", "128", "--epochs", "2",
                                "--batch-size", "4", "--lr", "1e-3", "--num-workers", "1", "-o",
                                str(tmp_path / "esc")])
    assert tuned.exit_code == 0, tuned.output
    lines = tuned.stdout.splitlines()
    assert lines[0].split() == ["fold", "top1", "test_top1", "probe_top1", "clips", "test_clips", "model", "epoch"]
    assert [line.split()[0] for line in lines[1:7]] == ["1", "2", "3", "4", "5", "mean"]
    assert [line.split()[4:6] for line in lines[1:6]] == [["3", "3"]] * 5  # one clip of each class each
    assert lines[6].count("±") == 3 and lines[7].startswith("probe:") and lines[8].startswith("AST protocol")
    assert "esc50 recipe: 3 classes on cpu; 9 training, 3 validation, 3 test clips per fold" in tuned.stderr
    summary = json.loads((tmp_path / "esc" / "summary.json").read_text())
    assert summary["metric"] == "top1" and len(summary["runs"]) == 5
    for run in summary["runs"]:  # selection on the validation clips, the held-out fold reported as the test
        assert set(run["test_metrics"]) == {"top1"} and run["baseline"]["on"] == "test"
        assert [r["epoch"] for r in run["history"]] == [1, 2] and "test_top1" in run["history"][0]
    assert summary["test_mean"] == pytest.approx(np.mean([r["test_metrics"]["top1"] for r in summary["runs"]]))
    tagger = load_model(tmp_path / "esc" / "model")
    assert tagger.labels == ["tone", "noise", "chirp"] and tagger.config.max_frames == 128
    assert (tagger.config.mean, tagger.config.std) == (-6.6268077, 5.358466)
    probs = tagger.predict([torch.from_numpy(make_sound("tone", np.random.default_rng(0), 1.0))])
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(), torch.tensor(1.0))

    again = runner.invoke(app, ["finetune", "--dataset", "esc50", "--data-dir", str(esc), "-o",
                                str(tmp_path / "esc"), "--folds", "1"])
    assert isinstance(again.exception, ParameterError) and "resume it" in str(again.exception)
    assert flag_for(again.exception.parameter) == "--output"
    resumed = runner.invoke(app, ["finetune", "--resume", str(tmp_path / "esc")])  # every fold done: report
    assert resumed.exit_code == 0 and resumed.stdout.splitlines()[:9] == lines[:9]


def test_cli_rejects_imagenet_weights_for_small_sizes(small_folder, tmp_path):
    result = CliRunner().invoke(app, ["train", "--dataset", str(small_folder), "--size", "tiny", "--init",
                                      "imagenet", "-o", str(tmp_path / "x")])
    assert isinstance(result.exception, UsageError) and "base size" in str(result.exception)
    assert not (tmp_path / "x").exists()  # usage errors come before any output file
    result = CliRunner().invoke(app, ["finetune", "--dataset", str(small_folder), "-o", str(tmp_path / "y"),
                                      "--folds", "x,y"])
    assert isinstance(result.exception, UsageError)
    result = CliRunner().invoke(app, ["train", "--dataset", str(small_folder), "--size", "tiny", "--init", "none",
                                      "--model-option", "heads=5", "-o", str(tmp_path / "z")])
    assert isinstance(result.exception, ParameterError) and "heads=5: 5 does not divide" in str(result.exception)
    assert flag_for(result.exception.parameter) == "--model-option" and not (tmp_path / "z").exists()


# -- DDP -----------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from safetensors.torch import save_file
    from astcli.train import experiment

    data, out = sys.argv[1:3]
    result = experiment.train(data, out, arch="elastic", size="tiny", init="none", model_options={"dim": 64,
                              "depth": 2, "heads": 2, "mlp_dim": 128, "max_frames": 128}, epochs=1, lr=1e-3,
                              batch_size=2, num_workers=0, progress=False)
    run = result.runs[0]
    state = {k: v.contiguous() for k, v in run.model.state_dict().items()}
    save_file(state, os.path.join(out, "rank%s.safetensors" % os.environ["RANK"]))
    with open(os.path.join(out, "rank%s.steps" % os.environ["RANK"]), "w") as f:
        f.write("steps %s" % run.history[-1]["steps"])
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_cpu_processes_keeps_ranks_identical(small_folder, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    env = {**ENV, "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(small_folder), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    steps = [(out / f"rank{rank}.steps").read_text() for rank in (0, 1)]
    assert steps[0] == steps[1]  # both ranks took the same number of optimizer steps
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(history) == 1 and f"steps {history[0]['steps']}" == steps[0]  # logs written once, by rank 0
    assert (out / "model" / "model.safetensors").is_file()


# -- ImageNet initialisation ---------------------------------------------------------------------------


def _hf_vision_checkpoint(directory: Path, kind: str, image_size: int, dim=64, depth=2, heads=2, mlp=128,
                          seed=0) -> dict[str, torch.Tensor]:
    """A tiny transformers DeiT (distilled, with teacher heads) or ViT checkpoint: config.json + safetensors."""
    gen = torch.Generator().manual_seed(seed)
    side = image_size // 16
    prefix = "deit." if kind == "deit" else "vit."
    tokens = 2 if kind == "deit" else 1

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    state = {
        prefix + "embeddings.cls_token": rnd(1, 1, dim),
        prefix + "embeddings.position_embeddings": rnd(1, side * side + tokens, dim),
        prefix + "embeddings.patch_embeddings.projection.weight": rnd(dim, 3, 16, 16),
        prefix + "embeddings.patch_embeddings.projection.bias": rnd(dim),
        prefix + "layernorm.weight": rnd(dim), prefix + "layernorm.bias": rnd(dim),
    }
    if kind == "deit":
        state[prefix + "embeddings.distillation_token"] = rnd(1, 1, dim)
        for head in ("cls_classifier", "distillation_classifier"):
            state[head + ".weight"], state[head + ".bias"] = rnd(1000, dim), rnd(1000)
    else:
        state["classifier.weight"], state["classifier.bias"] = rnd(1000, dim), rnd(1000)
    for i in range(depth):
        layer = f"{prefix}encoder.layer.{i}."
        for name, shape in (("attention.attention.query", (dim, dim)), ("attention.attention.key", (dim, dim)),
                            ("attention.attention.value", (dim, dim)), ("attention.output.dense", (dim, dim)),
                            ("intermediate.dense", (mlp, dim)), ("output.dense", (dim, mlp))):
            state[layer + name + ".weight"], state[layer + name + ".bias"] = rnd(*shape), rnd(shape[0])
        for name in ("layernorm_before", "layernorm_after"):
            state[layer + name + ".weight"], state[layer + name + ".bias"] = rnd(dim), rnd(dim)
    config = {"model_type": kind, "hidden_size": dim, "num_hidden_layers": depth, "num_attention_heads": heads,
              "intermediate_size": mlp, "image_size": image_size, "patch_size": 16, "num_channels": 3,
              "layer_norm_eps": 1e-12}
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(state, str(directory / "model.safetensors"))
    return state


def _hub_cache(cache: Path, repo: str, kind: str, image_size: int) -> dict[str, torch.Tensor]:
    """Put a fabricated checkpoint where hf_hub_download finds it offline: snapshots/<commit> + refs/main."""
    commit = "c0ffee" * 6 + "c0ff"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    state = _hf_vision_checkpoint(repo_dir / "snapshots" / commit, kind, image_size)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return state


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_deit_weights_map_onto_ast_offline(offline_hub):
    from astcli.train.imagenet import DEIT_REPO, init_from_imagenet

    theirs = _hub_cache(offline_hub, DEIT_REPO, "deit", 384)  # a 24 x 24 grid, as DeiT-B/16-384
    pos = theirs["deit.embeddings.position_embeddings"][0]
    grid = pos[2:].reshape(24, 24, 64)
    for frames, expected in (
        (128, grid[6:18, 6:18]),  # 12 x 12 audio grid: centre cut along both axes
        (512, F.interpolate(grid.permute(2, 0, 1)[None], size=(24, 50), mode="bilinear")[0].permute(1, 2, 0)[6:18]),
    ):
        model = AudioTransformer(ast_config("tiny", **TINY, max_frames=frames, num_classes=3))
        fresh = model.head.weight.clone()
        left = init_from_imagenet(model, cache_dir=offline_hub)
        assert left == ["head.bias", "head.weight", "head_norm.bias", "head_norm.weight"]
        ours = model.state_dict()
        assert torch.allclose(ours["pos_grid"], expected, atol=1e-6)
        conv = theirs["deit.embeddings.patch_embeddings.projection.weight"]
        assert torch.equal(ours["patch_embed.weight"], conv.sum(1).reshape(64, 256))
        cls, dist = theirs["deit.embeddings.cls_token"][0, 0], theirs["deit.embeddings.distillation_token"][0, 0]
        assert torch.equal(ours["prefix"], torch.stack([cls, dist])) and torch.equal(ours["prefix_pos"], pos[:2])
        layer = "deit.encoder.layer.1."
        qkv = torch.cat([theirs[layer + f"attention.attention.{n}.weight"] for n in ("query", "key", "value")])
        assert torch.equal(ours["blocks.1.attn.qkv.weight"], qkv)
        assert torch.equal(ours["blocks.1.fc2.weight"], theirs[layer + "output.dense.weight"])
        assert torch.equal(ours["blocks.1.norm2.bias"], theirs[layer + "layernorm_after.bias"])
        assert torch.equal(ours["norm.weight"], theirs["deit.layernorm.weight"])
        assert torch.equal(ours["head.weight"], fresh)
    with pytest.raises(ModelError, match="hidden_size"):
        init_from_imagenet(AudioTransformer(ast_config("tiny", depth=2, num_classes=3)), cache_dir=offline_hub)


def test_vit_weights_map_onto_elastic_offline(offline_hub):
    from astcli.train.imagenet import VIT_REPO, init_from_imagenet

    theirs = _hub_cache(offline_hub, VIT_REPO, "vit", 224)  # 14 x 14, as ViT-B/16-224
    model = AudioTransformer(elastic_config("tiny", **TINY, num_classes=5))  # 8 x 64 audio grid
    left = init_from_imagenet(model, cache_dir=offline_hub)
    assert left == ["head.bias", "head.weight", "head_norm.bias", "head_norm.weight", "pool.query"]
    grid = theirs["vit.embeddings.position_embeddings"][0, 1:].reshape(14, 14, 64)
    adapted = F.interpolate(grid.permute(2, 0, 1)[None], size=(14, 64), mode="bilinear")[0].permute(1, 2, 0)[3:11]
    ours = model.state_dict()
    assert torch.allclose(ours["pos_freq"], adapted.mean(1), atol=1e-6)
    assert torch.allclose(ours["pos_time"], adapted.mean(0), atol=1e-6)
    qkv = [torch.cat([theirs[f"vit.encoder.layer.{i}.attention.attention.{n}.weight"]
                      for n in ("query", "key", "value")]) for i in range(2)]
    mean_qkv = (qkv[0] + qkv[1]) / 2
    assert torch.allclose(ours["pool.q.weight"], mean_qkv[:64])
    assert torch.allclose(ours["pool.kv.weight"], mean_qkv[64:])
    proj = [theirs[f"vit.encoder.layer.{i}.attention.output.dense.weight"] for i in range(2)]
    assert torch.allclose(ours["pool.proj.weight"], (proj[0] + proj[1]) / 2)
    assert "prefix" not in ours
    from astcli.model import pack_clips, patchify

    clip = patchify(torch.randn(160, 128), model.config)
    assert model(pack_clips([clip], 0)).shape == (1, 5)


def test_imagenet_weights_missing_from_the_offline_cache_is_a_model_error(offline_hub, monkeypatch):
    from astcli.train.imagenet import init_from_imagenet

    offline_hub.mkdir()
    connects = []
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: connects.append(address))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache") as caught:
        init_from_imagenet(AudioTransformer(ast_config("tiny", **TINY)), cache_dir=offline_hub)
    assert connects == [] and caught.value.__cause__ is not None  # no network tried; the hub's error kept
