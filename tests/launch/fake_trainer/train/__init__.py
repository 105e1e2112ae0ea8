"""A stand-in for the real trainer, used to test launch/ fast and deterministically: same command
line (`python -m train --config FILE key=value ...`), same contract (SIGUSR2/SIGTERM: save at the
next step, exit 3; rerun of a run directory: resume), no torch. Tests put this directory first
on the job's path by submitting from it."""
REQUEUE_EXIT_CODE = 3
