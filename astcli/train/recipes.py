"""Per-dataset training hyper-parameters, with the defaults of the AST and ElasticAST papers.

A :class:`Recipe` is a flat record of everything the loop needs besides the model and the data; every
field can be overridden (``Recipe.replace`` / the CLI options). ``recipe_for(dataset, pretrained=...)``
picks the published defaults:

========  ==============================================================================================
esc50     AST's ESC-50 recipe: lr 1e-5 from an AudioSet model (1e-4 otherwise), 25 epochs, batch 48,
          freqm 24 / timem 96 at 512 frames, no mixup, CE, lr x0.85 per epoch after epoch 5, 512-frame
          window, ESC-50 statistics (-6.6268077, 5.358466), 5-fold cross-validation.
sc        AST's Speech Commands v2 recipe: lr 2.5e-4, 30 epochs, batch 128, freqm 48 / timem 48 at 128
          frames, mixup 0.6, feature noise, BCE, lr x0.85 per epoch after epoch 5, 128-frame window,
          statistics (-6.845978, 5.5654526).
audioset  AST's full AudioSet recipe: lr 1e-5, 5 epochs, batch 12, balanced sampling, freqm 48 / timem 192
          at 1024 frames, mixup 0.5, BCE, 1000 warm-up steps, lr halved per epoch after epoch 2, weight
          averaging over epochs 1-5.
custom    lr 1e-5 from a pretrained tagger (1e-4 from ImageNet weights), 10 epochs, batch 32, freqm 24 / timem 48
          at 512 frames, CE or BCE by the dataset, warm-up over ~5% of the steps, lr x0.85 after epoch 5.
scratch   a new model without pretrained weights on a dataset without a published recipe: AdamW (betas 0.9,
          0.999, weight decay 0.05), lr by model size (tiny 1e-4, small 5e-5, base 2.5e-5), 20 epochs of 16 clips
          per step and at least 1200 steps (more epochs for small datasets, the decay start scaled alike; not
          when the epochs are given), warm-up over ~5% of the steps, lr x0.85 per epoch after epoch 10
          (half the epochs), gradient norm clipped to 1, AST's feature noise (its time roll at 128 reference
          frames), no SpecAugment and no token dropout (a short run from scratch underfits; both slowed it),
          statistics fitted to the training clips; the final model is the weight average of the last third
          of the epochs. Measurements behind it: docs/training.md.
========  ==============================================================================================

``batch_size`` counts clips: the token budget of a batch is ``batch_size`` times the mean tokens of the training
clips (ElasticAST packs short clips by their native length), so a step sees about ``batch_size`` clips whatever
the clips' lengths.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from astcli.errors import ParameterError
from astcli.model.config import ModelConfig
from astcli.train.batches import batches_per_epoch, data_window, mean_clip_tokens
from astcli.train.datasets import Split

LOSSES = ("ce", "bce")
OPTIMIZERS = ("adam", "adamw")
SELECTIONS = ("last", "best", "wa")
PRETRAINED = ("audioset", "imagenet", "none")
DERIVED = ("loss", "balanced", "token_dropout", "window", "mean", "std", "batch_tokens", "warmup_steps", "select")

# Dataset statistics of the fbank features, as AST's recipes set them (run_esc.sh, run_sc.sh); the per-family
# defaults of pretrained models live in astcli.model.config.DEFAULT_STATS.
ESC50_STATS = (-6.6268077, 5.358466)
SPEECHCOMMANDS_STATS = (-6.845978, 5.5654526)
SCRATCH_LR = {"tiny": 1e-4, "small": 5e-5, "base": 2.5e-5}  # peak lr of a new model by size (AdamW, 16 clips)
SCRATCH_EPOCHS = 20  # measured: docs/training.md
SCRATCH_MIN_STEPS = 1200  # optimizer steps a new model gets at least (small datasets: more epochs)
SCRATCH_WA_SHARE = 1 / 3  # a new model is the weight average of its last third of epochs (docs/training.md)


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run (immutable: ``replace`` makes a changed copy). ``None`` means
    "derive it" (see each field); :func:`resolve_recipe` derives all of them at once for a run."""

    name: str = "custom"
    lr: float = 1e-4
    epochs: int = 10
    batch_size: int = 32  # clips per optimizer step (sets the token budget)
    batch_tokens: int | None = None  # token budget per batch; None = batch_size x mean tokens of the training clips
    window: int | None = None  # frames per clip (AST: padded window; ElasticAST: cap); None = from the data
    freqm: int = 24  # SpecAugment frequency mask, bins
    timem: int = 48  # SpecAugment time mask, frames, at `reference_frames` (scaled to each clip's length)
    reference_frames: int = 512
    mixup: float = 0.0  # probability that a training clip is mixed with another one
    mixup_alpha: float = 10.0  # lambda ~ Beta(alpha, alpha)
    loss: str | None = None  # "ce" | "bce"; None = BCE for multi-label data, else CE
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 5e-7
    warmup_steps: int | None = None  # linear warm-up; None = min(1000, 5% of all steps)
    lr_decay: float = 0.85  # lr x lr_decay per epoch ...
    lr_decay_start: int = 5  # ... for every epoch after this one (AST's lrscheduler_start)
    mean: float | None = None  # normalisation statistics; None = the model's own
    std: float | None = None
    balanced: bool | None = None  # class-balanced sampling; None = on for multi-label data
    noise: bool = False  # AST's feature noise (uniform noise + random roll)
    background_noise: float = 0.0  # probability of adding a background recording (Speech Commands noise)
    noise_snr: tuple[float, float] = (0.0, 20.0)  # SNR range in dB for background noise
    token_dropout: float | None = None  # ElasticAST token dropout; None = 0.1 for `train`, 0 for `finetune`
    random_hop: bool = False  # ElasticAST resolution augmentation: hop drawn from hop_choices per clip
    hop_choices: tuple[float, ...] = (10.0, 20.0, 30.0, 40.0)
    wa_start: int | None = None  # weight averaging over epochs wa_start..wa_end (1-based, inclusive)
    wa_end: int | None = None
    wa_share: float = 0.0  # without wa_start/wa_end: average the last this share of the epochs (0 = none)
    select: str | None = None  # final model: "last" | "best" | "wa"; None = wa if set, else best (last w/o val)
    grad_accum: int = 1
    clip_grad: float | None = None  # max gradient norm
    min_steps: int = 0  # at least this many optimizer steps: a small dataset gets more epochs (lr_decay_start
    # scales with them); 0 = the epochs as given
    val_fraction: float = 0.1  # validation share of the training data (folds: of the training folds) when the
    # dataset defines no validation split

    def replace(self, **overrides) -> Recipe:
        """A copy with ``overrides`` applied (``None`` values are ignored); checked with ``validate``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ParameterError(unknown[0], f"is not a recipe field (fields: {', '.join(sorted(known))})")
        changes = {k: v for k, v in overrides.items() if v is not None}
        for key in ("betas", "noise_snr", "hop_choices"):
            if key in changes:
                changes[key] = tuple(float(x) for x in changes[key])
        out = dataclasses.replace(self, **changes)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise :class:`~astcli.errors.ParameterError`, naming the field, for a value that cannot work."""
        for field_name, ok, problem in self._checks():
            if not ok:
                raise ParameterError(field_name, problem)

    def _checks(self) -> list[tuple[str, bool, str]]:
        """(field, holds, problem when it does not) for every rule a recipe must follow."""
        wa_range = self.wa_start is None or (1 <= self.wa_start <= (self.wa_end or 0) <= self.epochs)
        return [
            ("lr", self.lr > 0, f"must be positive (got {self.lr:g})"),
            ("epochs", self.epochs >= 1, f"must be at least 1 (got {self.epochs})"),
            ("batch_size", self.batch_size >= 1, f"must be at least 1 (got {self.batch_size})"),
            ("batch_tokens", self.batch_tokens is None or self.batch_tokens >= 1, "must be at least 1"),
            ("window", self.window is None or self.window >= 16, f"must be at least 16 frames (got {self.window})"),
            ("freqm", self.freqm >= 0, f"must be >= 0 (got {self.freqm})"),
            ("timem", self.timem >= 0, f"must be >= 0 (got {self.timem})"),
            ("reference_frames", self.reference_frames >= 1, "must be at least 1"),
            ("mixup", 0.0 <= self.mixup <= 1.0, f"is a probability in [0, 1] (got {self.mixup:g})"),
            ("mixup_alpha", self.mixup_alpha > 0, "must be positive"),
            ("loss", self.loss in (None, *LOSSES), f"must be one of {', '.join(LOSSES)} (got {self.loss!r})"),
            ("optimizer", self.optimizer in OPTIMIZERS,
             f"must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "must be two values in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must be >= 0"),
            ("lr_decay", 0 < self.lr_decay <= 1, f"must be in (0, 1] (got {self.lr_decay:g})"),
            ("lr_decay_start", self.lr_decay_start >= 0, "must be >= 0"),
            ("min_steps", self.min_steps >= 0, f"must be >= 0 (got {self.min_steps})"),
            ("mean", (self.mean is None) == (self.std is None), "and std go together"),
            ("std", self.std is None or self.std > 0, "must be positive"),
            ("background_noise", 0.0 <= self.background_noise <= 1.0, "is a probability in [0, 1]"),
            ("token_dropout", self.token_dropout is None or 0.0 <= self.token_dropout < 1.0, "must be in [0, 1)"),
            ("hop_choices", len(self.hop_choices) >= 1 and all(1 <= h <= 100 for h in self.hop_choices),
             "must lie between 1 and 100 ms"),
            ("wa_start", (self.wa_start is None) == (self.wa_end is None), "and wa_end go together"),
            ("wa_start", wa_range, f"must satisfy 1 <= wa_start <= wa_end <= epochs ({self.epochs})"),
            ("select", self.select in (None, *SELECTIONS),
             f"must be one of {', '.join(SELECTIONS)} (got {self.select!r})"),
            ("wa_share", 0.0 <= self.wa_share <= 1.0, f"is a share of the epochs in [0, 1] (got {self.wa_share:g})"),
            ("select", self.select != "wa" or self.wa_start is not None or self.wa_share > 0,
             "wa needs wa_start and wa_end (or wa_share)"),
            ("grad_accum", self.grad_accum >= 1, "must be at least 1"),
            ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "must be positive"),
            ("val_fraction", 0.0 <= self.val_fraction < 1.0, "must be in [0, 1)"),
        ]

    def unresolved(self) -> list[str]:
        """The "derive it" fields that are still ``None`` (none once :func:`resolve_recipe` has run)."""
        return [name for name in DERIVED if getattr(self, name) is None]

    def to_dict(self) -> dict:
        """JSON-ready dictionary (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """Inverse of ``to_dict``."""
        return cls().replace(**data) if data else cls()


def recipe_for(dataset: str, *, pretrained: str = "audioset", multi_label: bool = False,
               size: str = "base") -> Recipe:
    """The published defaults for ``dataset`` ("esc50", "speechcommands", "audioset" or anything else).

    ``pretrained`` says where the starting weights come from: "audioset" (any pretrained tagger),
    "imagenet" or "none"; it changes the learning rate where the papers did, and "none" on a dataset without a
    published recipe gives the from-scratch recipe, whose learning rate follows the model ``size``.
    """
    if pretrained not in PRETRAINED:
        raise ParameterError("pretrained", f"must be one of {', '.join(PRETRAINED)} (got {pretrained!r})")
    from_tagger = pretrained == "audioset"
    key = dataset.lower().replace("-", "").replace("_", "")
    if key == "esc50":
        mean, std = ESC50_STATS
        return Recipe(
            name="esc50", lr=1e-5 if from_tagger else 1e-4, epochs=25, batch_size=48, window=512,
            freqm=24, timem=96, reference_frames=512, mixup=0.0, loss="ce", warmup_steps=0,
            lr_decay=0.85, lr_decay_start=5, mean=mean, std=std, balanced=False, select="last",
        )
    if key in ("speechcommands", "sc", "speechcommandsv2"):
        mean, std = SPEECHCOMMANDS_STATS
        return Recipe(
            name="speechcommands", lr=2.5e-4, epochs=30, batch_size=128, window=128, freqm=48, timem=48,
            reference_frames=128, mixup=0.6, loss="bce", warmup_steps=0, lr_decay=0.85, lr_decay_start=5,
            mean=mean, std=std, balanced=False, noise=True, select="best",
        )
    if key == "audioset":
        return Recipe(
            name="audioset", lr=1e-5, epochs=5, batch_size=12, window=1024, freqm=48, timem=192,
            reference_frames=1024, mixup=0.5, loss="bce", warmup_steps=1000, lr_decay=0.5,
            lr_decay_start=2, balanced=True, wa_start=1, wa_end=5, select="wa",
        )
    loss = "bce" if multi_label else "ce"
    if pretrained == "none":
        if size not in SCRATCH_LR:
            raise ParameterError("size", f"must be one of {', '.join(SCRATCH_LR)} (got {size!r})")
        return Recipe(
            name="scratch", lr=SCRATCH_LR[size], epochs=SCRATCH_EPOCHS, batch_size=16, window=None, freqm=0,
            timem=0, reference_frames=128, mixup=0.0, loss=loss, optimizer="adamw", betas=(0.9, 0.999),
            weight_decay=0.05, warmup_steps=None, lr_decay=0.85, lr_decay_start=SCRATCH_EPOCHS // 2,
            token_dropout=0.0, clip_grad=1.0, min_steps=SCRATCH_MIN_STEPS, noise=True, wa_share=SCRATCH_WA_SHARE,
        )
    return Recipe(
        name="custom", lr=1e-5 if from_tagger else 1e-4, epochs=10, batch_size=32, window=None, freqm=24,
        timem=48, reference_frames=512, mixup=0.0, loss=loss, warmup_steps=None,
    )


def check_averaging(overrides: dict) -> None:
    """Raise ParameterError when ``overrides`` give ``wa_share`` together with ``wa_start``/``wa_end``."""
    if "wa_share" in overrides and ({"wa_start", "wa_end"} & set(overrides)):
        raise ParameterError("wa_share", "goes without wa_start/wa_end, which name the averaged epochs themselves")


def with_overrides(recipe: Recipe, overrides: dict) -> Recipe:
    """``recipe`` with the user's ``overrides`` (recipe field -> value) applied: given ``epochs`` are taken as
    given (no step floor), and a given ``wa_share`` replaces the recipe's own averaging range and final-model
    selection (unless ``select`` is given too). Raises ParameterError for a bad value, or for ``wa_share``
    together with ``wa_start``/``wa_end``."""
    check_averaging(overrides)
    if "wa_share" in overrides:
        recipe = dataclasses.replace(recipe, wa_start=None, wa_end=None, select=None)
    given_epochs = {"min_steps": 0} if "epochs" in overrides else {}
    return recipe.replace(**{**given_epochs, **overrides})


# -- one place where every "derive it" default is decided ----------------------------------------------

COMMANDS = ("finetune", "train")
ELASTIC_TRAIN_TOKEN_DROPOUT = 0.1  # ElasticAST (Feng et al. 2024) drops 10 % of the tokens in training
WARMUP_SHARE, WARMUP_MAX = 0.05, 1000  # warm-up over ~5 % of all steps, at most AST's 1000


def window_config(config: ModelConfig, window: int) -> ModelConfig:
    """The model configuration a run trains at ``window`` frames: AST's padded window becomes ``window``;
    ElasticAST keeps its configuration (``window`` caps clip lengths, up to its ``max_frames``)."""
    if not config.pads_to_window or config.max_frames == window:
        return config
    return dataclasses.replace(config, max_frames=int(window))


def resolve_recipe(recipe: Recipe, *, command: str, config: ModelConfig, split: Split, world: int = 1,
                   statistics: tuple[float, float] | None = None) -> Recipe:
    """``recipe`` with every ``None`` ("derive it") field decided, for ``command`` ("finetune" or "train")
    training a model configured as ``config`` on the first run's ``split`` (its dataset decides the loss and
    sampling, its clip lengths the window, the token budget and the warm-up) on ``world`` processes;
    ``statistics`` are (mean, std) fitted to the training clips, for a new model:

    ==============  ============================================================================================
    loss            "bce" for multi-label data, else "ce"
    balanced        on for multi-label data
    token_dropout   0.1 for a new ElasticAST (``train``), else 0; always 0 for AST
    window          the longest clip (frames at the model's hop), 16 to 1024; 1024 without clip lengths
    mean, std       ``statistics`` when given, else the model's own (``config.mean`` / ``config.std``)
    batch_tokens    ``batch_size`` clips of the mean training-clip length (a full window where lengths are unknown)
    epochs          raised until the run takes ``min_steps`` optimizer steps (``lr_decay_start`` scaled alike)
    warmup_steps    min(1000, round(5 % of all optimizer steps)), steps counted at the model's hop
    wa_start/end    the last ``wa_share`` of the (final) epochs when ``wa_share`` > 0 and neither is given
    select          "wa" with weight averaging, else "best" with a validation split, else "last"
    ==============  ============================================================================================

    Raises ParameterError where the recipe does not fit the model (``random_hop`` with AST)."""
    if command not in COMMANDS:
        raise ParameterError("command", f"must be one of {', '.join(COMMANDS)} (got {command!r})")
    elastic = config.family == "elastic"
    if recipe.random_hop and not elastic:
        raise ParameterError("random_hop", "is for ElasticAST models (AST was trained at a 10 ms hop)")
    multi_label = split.dataset.multi_label
    window = recipe.window
    if window is None:
        every = range(len(split.dataset.examples))
        window = data_window(split.lengths or [None] * len(every), every, config.hop_ms, config.sample_rate)
    fitted = window_config(config, window)
    dropout = recipe.token_dropout if recipe.token_dropout is not None else (
        ELASTIC_TRAIN_TOKEN_DROPOUT if command == "train" else 0.0)
    resolved = recipe.replace(
        loss=recipe.loss or ("bce" if multi_label else "ce"),
        balanced=multi_label if recipe.balanced is None else recipe.balanced,
        token_dropout=dropout if elastic else 0.0,
        window=window,
        mean=(statistics or (config.mean, config.std))[0] if recipe.mean is None else recipe.mean,
        std=(statistics or (config.mean, config.std))[1] if recipe.std is None else recipe.std,
        batch_tokens=recipe.batch_tokens or math.ceil(recipe.batch_size * mean_clip_tokens(fitted, split,
                                                                                             window=window)),
    )
    if resolved.min_steps or resolved.warmup_steps is None:
        batches = batches_per_epoch(fitted, split, window=window, budget=resolved.batch_tokens, world=world)
        per_epoch = -(-batches // resolved.grad_accum)
        if per_epoch * resolved.epochs < resolved.min_steps:
            epochs = -(-resolved.min_steps // per_epoch)
            resolved = resolved.replace(epochs=epochs,
                                        lr_decay_start=round(resolved.lr_decay_start * epochs / resolved.epochs))
        if resolved.warmup_steps is None:
            steps = per_epoch * resolved.epochs
            resolved = resolved.replace(warmup_steps=min(WARMUP_MAX, round(WARMUP_SHARE * steps)))
    return _with_selection(resolved, bool(split.validation))


def _with_selection(recipe: Recipe, validated: bool) -> Recipe:
    """``recipe`` with its weight-averaging range (the last ``wa_share`` of the epochs, unless given, and not
    for another explicit ``select``) and its final-model selection decided."""
    if recipe.wa_start is None and recipe.wa_share > 0 and recipe.select in (None, "wa"):
        averaged = max(1, math.ceil(recipe.wa_share * recipe.epochs - 1e-9))
        recipe = recipe.replace(wa_start=recipe.epochs - averaged + 1, wa_end=recipe.epochs)
    return recipe.replace(select=recipe.select or ("wa" if recipe.wa_start is not None else
                                                   ("best" if validated else "last")))
