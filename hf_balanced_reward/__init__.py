"""Reward models from human preferences (pairs, ties, rankings, graded scores), on the Hugging Face Trainer.

Names are imported on first use (PEP 562), so `import hf_balanced_reward` and the command line's `--help` do not
pay for torch, transformers and trl until something needs them.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BalancedRewardConfig": "config",
    "BalancedRewardTrainer": "trainer",
    "ConfigError": "errors",
    "DataError": "errors",
    "LOSSES": "losses",
    "PairCollator": "collator",
    "RewardCollator": "collator",
    "balanced": "losses",
    "bradley_terry": "losses",
    "davidson": "losses",
    "exploit_probes": "probes",
    "graded": "losses",
    "hinge": "losses",
    "load_preference_dataset": "data",
    "pair_metrics": "metrics",
    "pairwise": "losses",
    "plackett_luce": "losses",
    "prepare_dataset": "preparation",
    "ranking_metrics": "ranking",
    "rao_kupper": "losses",
    "reward_function": "scoring",
    "score_file": "scoring",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_balanced_reward' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
