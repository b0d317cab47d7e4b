"""Task types (classification, segmentation, detection): head, loss, metrics and data of each."""

from vpeft.tasks.base import (
    TaskOptions,
    TaskType,
    get_task_type,
    load_task_model,
    register_task_type,
    save_task_model,
    task_type_names,
)

__all__ = [
    "TaskOptions",
    "TaskType",
    "get_task_type",
    "load_task_model",
    "register_task_type",
    "save_task_model",
    "task_type_names",
]
