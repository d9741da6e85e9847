"""Reward models from pairwise human preferences, on the Hugging Face Trainer."""

from .collator import PairCollator
from .config import BalancedRewardConfig, ConfigError
from .data import DataError, load_preference_dataset, prepare_dataset
from .losses import LOSSES, balanced, bradley_terry, hinge
from .metrics import pair_metrics
from .scoring import reward_function, score_file
from .trainer import BalancedRewardTrainer

__version__ = "0.1.0"

__all__ = [
    "LOSSES",
    "BalancedRewardConfig",
    "BalancedRewardTrainer",
    "ConfigError",
    "DataError",
    "PairCollator",
    "balanced",
    "bradley_terry",
    "hinge",
    "load_preference_dataset",
    "pair_metrics",
    "prepare_dataset",
    "reward_function",
    "score_file",
]
