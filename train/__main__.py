"""`python -m train`: run the trainer, then exit with its code.

With several ranks (torchrun, srun) the process ends with `os._exit` once the exit handlers have
run and the output is flushed: gloo's worker threads can still hold work objects whose teardown
during interpreter finalisation aborts the process (SIGABRT, "terminate called without an active
exception"), which would turn a finished run into a failed job. Seen once in CI, on rank 1 after a
finished DeepSpeed ZeRO-1 run; every checkpoint and MLflow record is written before this point.
"""

import atexit
import os
import sys

from train.distributed import env_from_environment
from train.engine import main

code = main()
if env_from_environment()[1] > 1:
    atexit._run_exitfuncs()  # the MLflow tracker's close-at-exit, logging.shutdown, ...
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
