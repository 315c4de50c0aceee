"""Named models: TOML cards in ``models/`` (hub id + revision, or ensemble members)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from astcli.errors import ModelError

DEFAULT_MODEL = "ast-audioset"


@dataclass(frozen=True)
class Preset:
    """One model card: a hub checkpoint (``source`` at ``revision``) or an ensemble of other presets.
    ``size_mb``: the download (float32 weights: parameters x 4 bytes, in 10^6 bytes); 0 for an ensemble."""

    name: str
    description: str
    source: str | None = None
    revision: str | None = None
    members: tuple[str, ...] = field(default_factory=tuple)
    size_mb: int = 0


def presets_dir() -> Path:
    """``astcli/models`` inside an installed wheel, else the checkout's top-level ``models/``."""
    package = Path(__file__).resolve().parent.parent  # astcli/
    inside = package / "models"
    return inside if inside.is_dir() else package.parent / "models"


def list_presets() -> list[Preset]:
    """Every card, sorted by name."""
    return [get_preset(name) for name in sorted(p.stem for p in presets_dir().glob("*.toml"))]


def download_mb(preset: Preset) -> int:
    """Megabytes a preset downloads: its own weights, or the sum of its members'."""
    return preset.size_mb or sum(download_mb(get_preset(m)) for m in preset.members if get_preset(m))


def get_preset(name: str) -> Preset | None:
    """The card called ``name``, or None when there is none."""
    path = presets_dir() / f"{name}.toml"
    if "/" in name or not path.is_file():
        return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return Preset(
            name=name, description=data.get("description", ""), source=data.get("source"),
            revision=data.get("revision"), members=tuple(data.get("members", ())),
            size_mb=int(data.get("size_mb", 0)),
        )
    except (tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: malformed model card ({exc})") from exc
