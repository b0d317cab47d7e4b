"""Multi-task use: many named adapters on one frozen backbone, mixed batches, joint training, delta-m."""

from vpeft.multi.model import BASE, NOT_SHAREABLE, MixedOutput, MultiAdapterModel

__all__ = ["BASE", "NOT_SHAREABLE", "MixedOutput", "MultiAdapterModel"]
