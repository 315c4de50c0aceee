"""The Hugging Face hub: the one place that fetches files of a hub repository (or finds them in the standard
cache) and turns the hub's failures into one-line ``ModelError`` messages that say what to do.

Downloads go through ``huggingface_hub.hf_hub_download``, so ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT``
and ``HF_HUB_OFFLINE=1`` behave as in every other Hugging Face tool. When a file is not in the cache,
huggingface_hub retries an unreachable hub with back-off for about 25 s before giving up; this module asks the
hub once (``PROBE_SECONDS`` time-out, no retries) before downloading, so that a machine without network fails
within seconds. Nothing here imports torch (``ast tag --list-models`` stays instant).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from astcli.errors import ModelError

PROBE_SECONDS = 5.0  # time-out of the one reachability check before a download

LOCAL_MODEL = "use a local model instead (a model directory, a .pth checkpoint with its labels file, or an .onnx file)"


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot directory holding what a transformers AST model needs: ``config.json``, the weights
    (``model.safetensors`` or ``pytorch_model.bin``) and ``preprocessor_config.json`` where the repository has
    one. Raises ModelError (not a hub id, not found, not cached while offline or unreachable)."""
    files = fetch(repo_id, [("config.json",), ("model.safetensors", "pytorch_model.bin")],
                  optional=[("preprocessor_config.json",)], revision=revision)
    return files["config.json"].parent


def fetch(repo_id: str, required: Sequence[tuple[str, ...]], *, optional: Sequence[tuple[str, ...]] = (),
          revision: str | None = None, cache_dir: str | Path | None = None,
          instead: str = LOCAL_MODEL) -> dict[str, Path]:
    """Local paths of a hub repository's files, downloaded into the cache where needed.

    ``required`` and ``optional`` are groups of alternative file names: the first name of a group that the
    repository has is fetched. Returns ``{file name: path}`` of what was fetched. When the hub cannot be
    reached, a repository whose required files are cached is served from the cache; otherwise ModelError
    ends with what to do, ``instead`` being the alternative to the hub. Every hub failure is one ModelError line.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ModelError(f"{repo_id}: not a file, preset or valid hub id") from exc
    groups = [(group, True) for group in required] + [(group, False) for group in optional]
    in_cache = all(_cached(repo_id, g, revision, cache_dir) for g in required)
    local_only = constants.is_offline_mode()
    if not local_only and not (in_cache and all(_cached(repo_id, g, revision, cache_dir) for g in optional)):
        problem = _unreachable(repo_id, required[0][0], revision)
        if problem and not in_cache:
            raise ModelError(f"{repo_id}: not in the local Hugging Face cache, and the hub ({constants.ENDPOINT}) "
                             f"cannot be reached ({problem}); {_what_to_do(repo_id, revision, instead)}")
        local_only = bool(problem)
    with _hub_errors(repo_id, revision, instead):
        try:
            return _fetch_groups(repo_id, groups, revision=revision, cache_dir=cache_dir, local_files_only=local_only)
        except Exception as exc:  # the hub's many exception types (httpx, HTTP errors, metadata errors)
            if local_only or not in_cache or _definite(exc):
                raise
            # the hub misbehaved while checking for a newer revision: the cached files serve
            return _fetch_groups(repo_id, groups, revision=revision, cache_dir=cache_dir, local_files_only=True)


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, instead: str):
    """huggingface_hub's exceptions -> one-line ModelError (the cause kept for ``--debug``)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError as exc:
        raise ModelError(f"{repo_id}: gated on the hub; accept its terms there and log in (`hf auth login`)") from exc
    except RevisionNotFoundError as exc:
        raise ModelError(f"{repo_id}: the hub has no revision {revision!r}") from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(f"{repo_id}: no such model on the hub (or it is private: `hf auth login`)") from exc
    except LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE is set, so the hub was not asked" if constants.is_offline_mode() else \
            "the hub cannot be reached"
        at = f" at revision {revision}" if revision not in (None, "main") else ""
        raise ModelError(f"{repo_id}: not in the local Hugging Face cache{at} ({constants.HF_HUB_CACHE}), and "
                         f"{why}; {_what_to_do(repo_id, revision, instead)}") from exc
    except ModelError:
        raise
    except Exception as exc:  # network and hub errors of many kinds
        raise ModelError(f"{repo_id}: cannot fetch from the Hugging Face hub ({_first_line(exc)})") from exc


def _definite(exc: Exception) -> bool:
    """Our own error, or the hub answered about the repository itself (not found, no such revision or file)."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    return isinstance(exc, (ModelError, EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError))


def is_cached(repo_id: str, revision: str | None = None) -> bool:
    """Whether a model repository's ``config.json`` and weights are in the local cache (no network)."""
    return all(_cached(repo_id, g, revision, None) for g in (("config.json",), ("model.safetensors",
                                                                                "pytorch_model.bin")))


def _cached(repo_id: str, names: tuple[str, ...], revision: str | None, cache_dir) -> bool:
    """A file of ``names`` is in the cache, or the cache records that the repository has none of them."""
    from huggingface_hub import try_to_load_from_cache

    hits = [try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision) for name in names]
    return any(isinstance(hit, str) for hit in hits) or all(hit is not None for hit in hits)


def _fetch_groups(repo_id: str, groups: list[tuple[tuple[str, ...], bool]], **kwargs) -> dict[str, Path]:
    found = {}
    for group, needed in groups:
        path = _fetch_group(repo_id, group, needed, **kwargs)
        if path is not None:
            found[path.name] = path
    return found


def _fetch_group(repo_id: str, names: tuple[str, ...], needed: bool, **kwargs) -> Path | None:
    """The first of ``names`` the repository has; None for an optional group it lacks."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    not_cached = None
    for name in names:
        try:
            return Path(hf_hub_download(repo_id, name, **kwargs))
        except RemoteEntryNotFoundError:
            continue
        except LocalEntryNotFoundError as exc:
            not_cached = exc
    if not needed:
        return None
    if not_cached is not None:
        raise not_cached
    raise ModelError(f"{repo_id}: the repository has no {' or '.join(names)}")


def _unreachable(repo_id: str, name: str, revision: str | None) -> str | None:
    """Ask the hub once, without retries, for one file's metadata: None when it answers (any answer but a
    server error), else the reason it could not be reached."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision), timeout=PROBE_SECONDS)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        return f"HTTP {status}" if status in (408, 429) or status >= 500 else None
    except Exception as exc:  # connection refused, DNS failure, time-out, proxy errors
        return _first_line(exc)
    return None


def _what_to_do(repo_id: str, revision: str | None, instead: str) -> str:
    pinned = f" --revision {revision}" if revision not in (None, "main") else ""
    return (f"fill the cache on a machine with network (`hf download {repo_id}{pinned}`), then set HF_HUB_OFFLINE=1; "
            f"or {instead}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__
