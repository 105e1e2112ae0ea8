import sys

from train.engine import main

sys.exit(main())
