"""The on-disk format of a saved adapter: its file names and the reading of its ``adapter_config.json``.

Below both the API (which writes and loads adapters) and the Hub (which uploads and downloads them),
so each reads a folder's config without the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vpeft.errors import AdapterMismatchError

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1

#: options whose default changed to follow the official code: an adapter saved without the option was
#: trained with the old value, which it keeps (method -> option -> value before the change)
PRE_OFFICIAL_DEFAULTS = {"fact_tk": {"layout": "paper"}, "prefix": {"reparameterization": "per_layer"}}


def read_folder_config(folder: str | os.PathLike, shown: Any = None) -> dict[str, Any]:
    """The JSON config of the adapter in the local ``folder``, with a clear error if the folder is not one.

    ``shown`` is how errors name the folder (the ``hf-hub:`` id it came from); ``folder`` by default."""
    folder = Path(folder)
    directory = folder if shown is None else shown
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        if (folder / "peft" / ADAPTER_CONFIG).is_file():
            raise AdapterMismatchError(
                f"'{directory}' holds no vpeft adapter, only a peft export in its peft/ subfolder; load that with "
                f"vpeft.import_from_peft(model, '{folder / 'peft'}'), or pass the folder vpeft.save_adapter wrote"
            )
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in '{directory}'; pass the folder written by vpeft.save_adapter")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterMismatchError(f"{path} is not valid JSON ({exc}); the adapter folder is damaged") from exc
    if isinstance(config, dict) and "peft_type" in config:
        raise AdapterMismatchError(
            f"'{directory}' holds a Hugging Face peft adapter ({config.get('peft_type')}), not a vpeft one; "
            f"import it with vpeft.import_from_peft(model, '{directory}') (LoRA and DoRA)"
        )
    missing = [k for k in ("method", "options", "backbone") if not isinstance(config, dict) or k not in config]
    if missing:
        raise AdapterMismatchError(
            f"{path} is not a vpeft adapter config (no {', '.join(missing)}); pass a folder written by "
            "vpeft.save_adapter (a peft folder imports with vpeft.import_from_peft)"
        )
    return config


def legacy_defaults(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """A saved config that predates an option gets the value it was trained with, not today's default."""
    return {**PRE_OFFICIAL_DEFAULTS.get(method, {}), **options}
