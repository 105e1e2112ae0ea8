"""Training: `python -m train --config FILE [key=value ...]` (also under torchrun and srun)."""
from train.engine import REQUEUE_EXIT_CODE, USER_ERROR_EXIT_CODE, main, run

__all__ = ["main", "run", "REQUEUE_EXIT_CODE", "USER_ERROR_EXIT_CODE"]
