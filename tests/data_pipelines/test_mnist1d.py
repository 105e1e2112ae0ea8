"""MNIST-1D: generated locally by the mnist1d package (nothing downloaded), 4000/1000 samples of
40 steps with one feature each, read back by the loader as the package made them."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import torch

from data_pipelines import DataConfig, create_loader
from data_pipelines.build import main as build_main
from data_pipelines.mnist1d import load_split


@pytest.fixture(scope="module")
def reference():
    return load_split()


@pytest.fixture(scope="module")
def mnist1d_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist1d")
    with pytest.MonkeyPatch.context() as patch:  # any download would fail the build
        patch.setattr(requests, "get", lambda *a, **k: pytest.fail(f"downloaded {a}"))
        patch.setattr(requests.Session, "request", lambda *a, **k: pytest.fail(f"downloaded {a}"))
        assert build_main(["mnist1d", "--out", str(out), "--workers", "1"]) == 0
    return out


def test_generated_set_has_the_published_shape(reference):
    (x, y), (x_val, y_val) = reference["train"], reference["val"]
    assert x.shape == (4000, 40, 1) and x_val.shape == (1000, 40, 1) and x.dtype == np.float32
    assert set(np.unique(y)) == set(range(10)) and len(y_val) == 1000
    both = np.concatenate([x, x_val])
    assert abs(both.mean()) < 1e-3 and abs(both.std() - 1) < 1e-3  # the package standardises


def test_generation_is_a_function_of_the_seed_and_keeps_global_rngs(reference):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    again = load_split()
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(again["val"][0], reference["val"][0])


def test_loader_yields_the_package_values_time_major(mnist1d_dir, reference):
    loader = create_loader(DataConfig(dataset="mnist1d", path=str(mnist1d_dir), batch_size=250), "val")
    assert (loader.meta.T, loader.meta.in_chans, loader.meta.counts) == (40, 1, {"train": 4000, "val": 1000})
    assert loader.spec.kind == "sequence"
    batches = [(x.clone(), y.clone()) for x, y in loader.iterate(0)]
    x = torch.cat([b[0] for b in batches], dim=1)
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (40, 1000, 1)
    expected = torch.from_numpy(reference["val"][0]).transpose(0, 1)
    assert torch.allclose(x, expected, atol=1e-5)  # stored shifted by the minimum, shifted back
    assert torch.equal(y, torch.from_numpy(reference["val"][1]))
    assert 0 <= loader.meta.mean[0] and loader.meta.pixel_max >= float(x.max() + loader.meta.mean[0]) - 1e-4
