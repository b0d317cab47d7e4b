"""Training: the trainer loop, the protocol runner and the result record."""

from vpeft.train.run import RESULT, RunSpec, evaluate_adapter, run
from vpeft.train.trainer import TrainConfig, Trainer, TrainingDivergedError

__all__ = ["RESULT", "RunSpec", "TrainConfig", "Trainer", "TrainingDivergedError", "evaluate_adapter", "run"]
