"""Delayed spiking XOR: a memory task, every sample a pure function of (seed, split, index).

The setting of DH-SNN's generator (Zheng et al. 2024, the functional-roles paper's lab): 20 input
channels; a first pattern of 10 steps at the start and a second in the last 10 steps, each
Bernoulli spikes at rate 0.2 ("low") or 0.6 ("high") per channel and step, with background
noise at rate 0.01 in the `delay` steps between; the label is XOR(level 1, level 2): 1 when the
two levels differ. A sample has T = 10 + delay + 10 steps (delay 180 -> 200). The answer exists
only once the second pattern begins, so the readout counts the steps from there on
(`Meta.readout_from` = 10 + delay): a network must remember the first level across the delay.

Stored as uint8 spikes `[T, 20]` in the field `sequence`, with mean 0 and std 1 so the loader
yields the spikes as float32 `[T, B, 20]`. FFCV is imported inside the builder only: the registry
imports this module on a login node.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import TRAIN_FILE, VAL_FILE, DataError, staged_output, summary_line
from .meta import Meta
from .seqdigits import sequence_pipelines
from .spec import DatasetSpec

CHANNELS = 20
PATTERN_STEPS = 10
RATES = (0.2, 0.6)        # spikes per channel and step of a low / high pattern
NOISE_RATE = 0.01         # between the patterns
SPLITS = {"train": 0, "val": 1}  # the split's number in each sample's seed


@dataclass(frozen=True)
class XorOptions:
    """What the builder generates."""

    delay: int = 180      # steps between the end of the first pattern and the second
    train: int = 4000     # samples
    val: int = 1000
    seed: int = 0         # with (split, index), the seed of every sample

    @property
    def T(self) -> int:
        """Steps per sample: both patterns and the delay."""
        return PATTERN_STEPS + self.delay + PATTERN_STEPS

    @property
    def readout_from(self) -> int:
        """The first step of the second pattern."""
        return PATTERN_STEPS + self.delay


def sample(seed: int, split: str, index: int, delay: int = XorOptions.delay
           ) -> tuple[np.ndarray, int, tuple[int, int]]:
    """Sample `index` of `split`: spikes uint8 `[10 + delay + 10, CHANNELS]` in {0, 1}, its label
    (XOR of the two levels) and the levels (0 = low, 1 = high) of the first and second pattern.

    A pure function of its arguments: its own generator, seeded with (seed, split, index)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    first, second = (int(level) for level in rng.integers(0, 2, size=2))
    rate = np.full(PATTERN_STEPS + delay + PATTERN_STEPS, NOISE_RATE)
    rate[:PATTERN_STEPS] = RATES[first]
    rate[PATTERN_STEPS + delay:] = RATES[second]
    spikes = rng.random((len(rate), CHANNELS)) < rate[:, None]
    return spikes.astype(np.uint8), first ^ second, (first, second)


def generate(options: XorOptions, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All samples of `split`: spikes uint8 `[N, T, CHANNELS]`, labels int64 `[N]`."""
    count = options.train if split == "train" else options.val
    samples = [sample(options.seed, split, i, options.delay) for i in range(count)]
    spikes = np.stack([s for s, _, _ in samples]) if samples else np.zeros((0, options.T, CHANNELS), np.uint8)
    return spikes, np.array([label for _, label, _ in samples], dtype=np.int64)


def build_delayed_xor(out: Path, workers: int, options: XorOptions) -> Meta:
    """Generate train/val into `out` (.beton files + meta.json); returns their Meta."""
    from ffcv.fields import IntField, NDArrayField

    from .writer import MIN_PAGE_SIZE, ArraySamples, write_beton

    if options.delay < 0 or options.train < 1 or options.val < 1:
        raise DataError(f"--delay {options.delay} / --train {options.train} / --val {options.val}: "
                        f"need delay >= 0 and at least one train and one val sample")
    splits = {split: generate(options, split) for split in ("train", "val")}
    meta = Meta(
        dataset="delayed_xor", source="generated (DH-SNN's delayed spiking XOR)", num_classes=2,
        classes=["same level", "different levels"], in_chans=CHANNELS, T=options.T,
        readout_from=options.readout_from,
        counts={split: int(len(labels)) for split, (_, labels) in splits.items()},
        mean=[0.0], std=[1.0], pixel_max=1,
        details={"delay": options.delay, "seed": options.seed, "pattern_steps": PATTERN_STEPS,
                 "rates": list(RATES), "noise_rate": NOISE_RATE})
    fields = {"sequence": NDArrayField(np.dtype("uint8"), (options.T, CHANNELS)), "label": IntField()}
    with staged_output(out) as stage:
        for split, name in (("train", TRAIN_FILE), ("val", VAL_FILE)):
            write_beton(stage / name, fields, ArraySamples(*splits[split]), workers,
                        page_size=MIN_PAGE_SIZE)
        meta.write(stage)
    print(summary_line("delayed_xor", out, meta.counts, 0))
    return meta


def _options(parser: argparse.ArgumentParser) -> None:
    defaults = XorOptions()
    parser.add_argument("--delay", type=int, default=defaults.delay,
                        help=f"steps between the two patterns (default {defaults.delay}: T = 200)")
    parser.add_argument("--train", type=int, default=defaults.train, help="training samples")
    parser.add_argument("--val", type=int, default=defaults.val, help="validation samples")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="with (split, index), the seed of every sample")


def _build(args: argparse.Namespace, workers: int) -> Meta:
    return build_delayed_xor(args.out, workers, XorOptions(args.delay, args.train, args.val, args.seed))


SPEC = DatasetSpec(
    name="delayed_xor", kind="sequence",
    help="delayed spiking XOR (generated): two 10-step spike patterns, label = XOR of their rates",
    build=_build, train=sequence_pipelines, val=sequence_pipelines, options=_options,
    needs_src=False, no_flip_reason="spike trains are not images")
