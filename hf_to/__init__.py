"""hf_to: the Trainable Optimizer (Wang & Klabjan, arXiv:2508.01764) for PyTorch and Hugging Face."""

from .estimators import ESTIMATORS
from .optimizer import TrainableOptimizer, trainable_to
from .reference import ReferenceTrainableOptimizer
from .registry import VARIANTS, create_optimizer, load_optimizer

__all__ = [
    "ESTIMATORS",
    "VARIANTS",
    "ReferenceTrainableOptimizer",
    "TrainableOptimizer",
    "create_optimizer",
    "load_optimizer",
    "trainable_to",
]
__version__ = "0.1.0"
