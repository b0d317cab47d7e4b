"""vpeft: parameter-efficient fine-tuning for pre-trained timm vision backbones."""

import vpeft.train.trainer  # noqa: F401  (registers the trainer that method stages train with)
from vpeft.api import (
    apply,
    count_parameters,
    count_trainable,
    get_state,
    list_methods,
    load_adapter,
    make_config,
    merge,
    read_adapter_config,
    save_adapter,
    trainable_parameters,
    unmerge,
)
from vpeft.backbones.anatomy import Anatomy
from vpeft.backbones.registry import describe
from vpeft.errors import (
    AdapterMismatchError,
    ConfigError,
    NotMergeableError,
    UnknownMethodError,
    UnsupportedBackboneError,
    VPeftError,
)
from vpeft.interop import export_to_peft, import_from_peft
from vpeft.methods import Method, MethodConfig, get_method, register
from vpeft.multi import MultiAdapterModel
from vpeft.version import __version__ as __version__

__all__ = [
    "AdapterMismatchError",
    "Anatomy",
    "ConfigError",
    "Method",
    "MethodConfig",
    "MultiAdapterModel",
    "NotMergeableError",
    "UnknownMethodError",
    "UnsupportedBackboneError",
    "VPeftError",
    "__version__",
    "apply",
    "count_parameters",
    "count_trainable",
    "describe",
    "export_to_peft",
    "get_method",
    "get_state",
    "import_from_peft",
    "list_methods",
    "load_adapter",
    "make_config",
    "merge",
    "read_adapter_config",
    "register",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]
