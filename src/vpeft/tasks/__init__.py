"""Task types (classification, segmentation, detection): head, loss, metrics and data of each.

Importing this package registers the built-in task types; a new one is a module with a
:class:`TaskType` subclass decorated with :func:`register_task_type`.
"""

from vpeft.tasks import classification, segmentation
from vpeft.tasks.base import (
    DEFAULT_TASK_TYPE,
    IMPORT_ERRORS,
    DataOptions,
    Schedule,
    TaskOptions,
    TaskType,
    get_task_type,
    inner_module,
    load_task_model,
    register_task_type,
    save_task_model,
    task_type_names,
)

try:
    from vpeft.tasks import detection
except ImportError as exc:  # detection needs torchvision's detection models; reported when it is asked for
    if "vpeft.tasks.detection" in str(exc):
        raise
    IMPORT_ERRORS["detection"] = str(exc)

__all__ = [
    "DEFAULT_TASK_TYPE",
    "DataOptions",
    "Schedule",
    "TaskOptions",
    "TaskType",
    "classification",
    "detection",
    "get_task_type",
    "inner_module",
    "load_task_model",
    "register_task_type",
    "save_task_model",
    "segmentation",
    "task_type_names",
]
