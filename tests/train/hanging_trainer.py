"""`python -m tests.train.hanging_trainer <train args>`: `python -m train` with rank $HANG_RANK
stuck, alive, once it has finished and checkpointed $HANG_AT_STEP optimizer steps, before it
enters the next micro-batch's all-reduce (as a rank stuck in its forward would be). It sleeps in libc through
`ctypes.PyDLL`, which keeps the GIL, as a deadlock in native code does: no Python thread of that
process runs again (torchft's "deadlock that holds the GIL"). tests/train/test_faults.py starts it."""
import ctypes
import os
import runpy

from train.distributed import HangWatchdog

_plain_beat = HangWatchdog.beat


def _stuck_beat(self, epoch, batch, step):
    if self.env.rank == int(os.environ["HANG_RANK"]) and step >= int(os.environ["HANG_AT_STEP"]):
        _stuck_beat.after += 1  # 1: the step's own beat; 2: the next micro-batch's, after the checkpoint
        if _stuck_beat.after == 2:
            ctypes.PyDLL(None).sleep(3600)
    _plain_beat(self, epoch, batch, step)


_stuck_beat.after = 0


if __name__ == "__main__":
    HangWatchdog.beat = _stuck_beat
    runpy.run_module("train", run_name="__main__", alter_sys=True)
