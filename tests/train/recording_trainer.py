"""`python -m tests.train.recording_trainer <train args>`: `python -m train` with the loader's
`iterate` wrapped to append, per training batch it hands the trainer, "<epoch> <batch>
<index>:<hash of the sample's tensor> ..." to $SAMPLES_LOG (written before the batch is trained
on). The trainer has no hook that reports the samples it trains on; this relies on
EpochLoader.iterate and EpochLoader.order (tests/train/test_faults.py reads the log)."""
import hashlib
import os
import runpy

from data_pipelines.loaders import EpochLoader

_plain = EpochLoader.iterate


def _recording_iterate(self, epoch, start_batch=0):
    order = self.order(epoch)
    with open(os.environ["SAMPLES_LOG"], "a") as log:
        for i, (x, y) in enumerate(_plain(self, epoch, start_batch), start=start_batch):
            if self.train:
                ids = order[i * self.batch_size:(i + 1) * self.batch_size]
                digest = (hashlib.blake2b(s.numpy().tobytes(), digest_size=4).hexdigest() for s in x)
                log.write(f"{epoch} {i} {' '.join(f'{n}:{d}' for n, d in zip(ids, digest))}\n")
                log.flush()
            yield x, y


if __name__ == "__main__":
    EpochLoader.iterate = _recording_iterate
    runpy.run_module("train", run_name="__main__", alter_sys=True)
