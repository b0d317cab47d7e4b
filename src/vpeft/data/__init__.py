"""Datasets and transforms: VTAB-1k, FGVC, ImageFolder trees and the protocol presets."""

from vpeft.data.datasets import (
    SPLITS,
    BadImageError,
    DataError,
    ImageDataset,
    Task,
    decode_image,
    load_fgvc,
    load_folder,
    load_task,
    load_vtab1k,
    register_loader,
)
from vpeft.data.mini import load_mini_task, mini_task_names, suite_sheet  # registers the "mini" loader
from vpeft.data.transforms import PRESETS, InputConfig, build_transform, input_config, is_deterministic

__all__ = [
    "PRESETS",
    "SPLITS",
    "BadImageError",
    "DataError",
    "ImageDataset",
    "InputConfig",
    "Task",
    "build_transform",
    "decode_image",
    "input_config",
    "is_deterministic",
    "load_fgvc",
    "load_folder",
    "load_mini_task",
    "load_task",
    "load_vtab1k",
    "mini_task_names",
    "register_loader",
    "suite_sheet",
]
