"""The errors a user meets, and the did-you-mean hint: stdlib only, so the command line can answer a typo or
`--help` without importing torch or transformers."""

import difflib


class UsageError(Exception):
    """A mistake in how a command was called; printed as one line, exit status 2."""


class ConfigError(ValueError):
    """A user-facing configuration mistake. The CLI prints its message without a traceback."""


class DataError(ValueError):
    """A problem with the user's data. The CLI prints its message without a traceback."""


class TrainingStopped(RuntimeError):
    """Training stopped on a numerical fault; the message names the step and the checkpoint to resume from."""


def did_you_mean(value: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def hub_kernels_hint(err: Exception) -> str:
    """transformers (5.25 on) swaps in kernels downloaded from the hub when it loads a model on a machine with CUDA;
    offline, or without the `kernels` package, loading then fails. The same model loads without them."""
    if "kernels" not in str(err).lower():  # "Kernels are not available", "kernels-community/..."
        return ""
    return (" transformers fetches hub kernels for models on a GPU; offline or without the `kernels` package, set the "
            "environment variable USE_HUB_KERNELS=NO to load the model without them.")
