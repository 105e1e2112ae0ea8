"""`python -m train.tracking replay RUN_DIR [--uri URI]`: send a run's fallback file to MLflow."""
import sys

from train.tracking.fallback import main

sys.exit(main())
