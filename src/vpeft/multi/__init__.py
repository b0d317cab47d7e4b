"""Multi-task use: many named adapters on one frozen backbone, mixed batches, joint training, delta-m."""

from vpeft.multi.model import BASE, MixedOutput, MultiAdapterModel, check_shareable
from vpeft.multi.single_pass import routable_wrappers
from vpeft.multi.train import delta_m, multitask_loss

__all__ = [
    "BASE",
    "MixedOutput",
    "MultiAdapterModel",
    "check_shareable",
    "delta_m",
    "multitask_loss",
    "routable_wrappers",
]
