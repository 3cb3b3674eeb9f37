"""BottleFit's two-stage training (docs/training.md): GHND head distillation, then KD or CE fine-tuning.

    config = load_config("cfg.yaml", {"train.stage1.num_epochs": 2})
    best = train(config)          # single process, or under torchrun with DDP
"""

from bottlefit.training.config import StageConfig, TrainConfig, load_config
from bottlefit.training.data import DataSplits, image_folder_splits, mnist_splits, write_mnist_image_folder
from bottlefit.training.loop import Metrics, evaluate, train, train_teacher

__all__ = [
    "DataSplits",
    "Metrics",
    "StageConfig",
    "TrainConfig",
    "evaluate",
    "image_folder_splits",
    "load_config",
    "mnist_splits",
    "train",
    "train_teacher",
    "write_mnist_image_folder",
]
