"""`python -m risda.train`: one run of the trainer (risda.trainer.cli)."""
import sys

from .trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
