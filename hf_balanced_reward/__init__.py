"""Reward models from human preferences (pairs, ties, rankings, graded scores), on the Hugging Face Trainer."""

from .collator import PairCollator
from .config import BalancedRewardConfig, ConfigError
from .data import DataError, load_preference_dataset, prepare_dataset
from .listwise import prepare_lists
from .losses import LOSSES, balanced, bradley_terry, davidson, graded, hinge, pairwise, plackett_luce, rao_kupper
from .metrics import pair_metrics
from .ranking_metrics import ranking_metrics
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
    "davidson",
    "graded",
    "hinge",
    "load_preference_dataset",
    "pair_metrics",
    "pairwise",
    "plackett_luce",
    "prepare_dataset",
    "prepare_lists",
    "ranking_metrics",
    "rao_kupper",
    "reward_function",
    "score_file",
]
