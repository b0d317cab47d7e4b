"""Adapters on the Hugging Face Hub: ``vpeft push`` uploads a saved adapter folder, ``hf-hub:`` ids load one.

A pushed repository holds what :func:`vpeft.save_adapter` writes (``adapter.safetensors``,
``adapter_config.json``), the model card (``README.md``, written with every ``vpeft train`` run) and,
when present, the run's ``result.json`` and ``config.yaml`` and a ``peft/`` export. Loading goes
through ``huggingface_hub.snapshot_download`` (cached; ``HF_HUB_OFFLINE=1`` reads the cache only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vpeft.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_folder_config
from vpeft.errors import ConfigError, VPeftError

#: the prefix that names an adapter (or backbone) on the Hub
HUB_PREFIX = "hf-hub:"
#: what an adapter repository holds: the adapter, its card, and the run's record and config when present
REQUIRED = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md")
OPTIONAL = ("result.json", "config.yaml", "peft/adapter_model.safetensors", "peft/adapter_config.json")


class HubError(VPeftError, RuntimeError):
    """The Hub cannot be used: huggingface_hub missing, offline, not logged in, or the request failed."""


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HubError("the Hub needs huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def upload_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(path in the repository, bytes) of every file ``vpeft push`` uploads from ``folder``; refuses an incomplete one."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"'{folder}' is not a folder; pass the folder vpeft.save_adapter or vpeft train wrote")
    read_folder_config(root)  # a vpeft adapter (a clear error for a peft folder or another one)
    missing = [name for name in REQUIRED if not (root / name).is_file()]
    if missing:
        hint = (
            " (a `vpeft train` run folder has its model card; for another folder write one with "
            "vpeft.card.write_model_card(folder, record))"
            if "README.md" in missing
            else ""
        )
        raise ConfigError(f"'{folder}' lacks {', '.join(missing)}: it is not a complete adapter folder{hint}")
    return [(name, (root / name).stat().st_size) for name in (*REQUIRED, *OPTIONAL) if (root / name).is_file()]


def push_adapter(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    api: Any = None,
) -> dict[str, Any]:
    """Upload an adapter folder to the Hub repository ``repo_id`` (created if absent).

    Returns ``{"repo_id", "files": [(path, bytes)], "url"}``; with ``dry_run`` nothing is contacted
    and ``url`` is None. ``api`` is an ``HfApi``-like object (tests pass a fake one)."""
    repo_id = repo_id.removeprefix(HUB_PREFIX)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"'{repo_id}' is not a Hub repository id; use <user or organisation>/<name>")
    files = upload_files(folder)
    result: dict[str, Any] = {"repo_id": repo_id, "files": files, "url": None}
    if dry_run:
        return result
    if api is None:
        if _offline():
            raise HubError("HF_HUB_OFFLINE is set: pushing needs the network; unset it (or use --dry-run)")
        hub = _hub()
        if token is None and hub.get_token() is None:
            raise HubError(
                "not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN, or pass --token)"
            )
        api = hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=[name for name, _ in files],
            commit_message=commit_message or f"vpeft adapter: {', '.join(name for name, _ in files)}",
            repo_type="model",
        )
    except OSError as exc:  # requests' connection errors are OSErrors
        raise HubError(f"could not reach the Hugging Face Hub ({exc}); check the network and try again") from None
    except Exception as exc:
        if type(exc).__name__ in ("HfHubHTTPError", "RepositoryNotFoundError", "GatedRepoError"):
            raise HubError(
                f"the Hub refused the upload to '{repo_id}' ({exc}); check that your token may write there"
            ) from None
        raise
    result["url"] = str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
    return result


def resolve_adapter(source: str | os.PathLike) -> Path:
    """A local adapter folder for ``source``: the folder itself, or for ``hf-hub:<repo id>[@revision]`` a
    snapshot downloaded (or read from the cache) through ``huggingface_hub.snapshot_download``."""
    text = str(source)
    if not text.startswith(HUB_PREFIX):
        return Path(source)
    repo_id, _, revision = text[len(HUB_PREFIX) :].partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"'{text}' is not a Hub adapter id; use hf-hub:<user or organisation>/<name>[@revision]")
    hub = _hub()
    try:
        path = hub.snapshot_download(
            repo_id, revision=revision or None, allow_patterns=[*REQUIRED, *OPTIONAL], repo_type="model"
        )
    except Exception as exc:
        where = "HF_HUB_OFFLINE is set and it is not in the local cache" if _offline() else str(exc)
        raise HubError(
            f"could not get adapter '{repo_id}' from the Hugging Face Hub: {where}; check the id, the network "
            "(unset HF_HUB_OFFLINE to download) and your login for a private repository"
        ) from None
    return Path(path)
