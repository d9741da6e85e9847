"""`python -m hf_balanced_reward train ...` (also `accelerate launch -m hf_balanced_reward train ...`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
