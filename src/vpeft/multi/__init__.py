"""Multi-task use: many named adapters on one frozen backbone, mixed batches, joint training, delta-m."""

from vpeft.multi.model import BASE, NOT_SHAREABLE, MixedOutput, MultiAdapterModel
from vpeft.multi.single_pass import ROUTABLE, routable_wrappers
from vpeft.multi.train import delta_m, multitask_loss

__all__ = [
    "BASE",
    "NOT_SHAREABLE",
    "ROUTABLE",
    "MixedOutput",
    "MultiAdapterModel",
    "delta_m",
    "multitask_loss",
    "routable_wrappers",
]
