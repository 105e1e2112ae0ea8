"""Epoch plans and core counting, without FFCV: shards, orders and worker limits."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.common import available_cores, resolve_workers
from data_pipelines.loaders import train_order, val_shard


@pytest.mark.parametrize("num_samples", [1, 7, 100, 1437])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_val_shards_cover_every_sample_once_in_order(num_samples, world_size):
    shards = [val_shard(num_samples, r, world_size) for r in range(world_size)]
    np.testing.assert_array_equal(np.concatenate(shards), np.arange(num_samples))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("world_size, batch_size", [(1, 32), (2, 32), (3, 10), (8, 7)])
def test_train_shards_are_disjoint_equal_and_drop_less_than_one_global_batch(world_size, batch_size):
    n = 1000
    shards = [train_order(n, batch_size, 5, 3, r, world_size) for r in range(world_size)]
    assert {len(s) for s in shards} == {n // (batch_size * world_size) * batch_size}
    seen = np.concatenate(shards)
    assert len(np.unique(seen)) == len(seen)  # disjoint, no duplicates
    assert n - len(seen) < batch_size * world_size


def test_train_order_depends_only_on_seed_and_epoch():
    a = train_order(500, 16, seed=1, epoch=2, rank=0, world_size=2)
    np.testing.assert_array_equal(a, train_order(500, 16, seed=1, epoch=2, rank=0, world_size=2))
    assert not np.array_equal(a, train_order(500, 16, seed=1, epoch=3, rank=0, world_size=2))
    assert not np.array_equal(a, train_order(500, 16, seed=2, epoch=2, rank=0, world_size=2))


def test_workers_never_exceed_the_slurm_allocation(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert available_cores() == 3
    assert resolve_workers(-1) == 3 and resolve_workers(64) == 3 and resolve_workers(2) == 2


def test_torchrun_ranks_split_the_affinity_mask(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cores = available_cores()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))
    assert available_cores() == 1  # never 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_workers(cores + 5) == cores
