"""`python -m train.export --format nir` read by the tool chains users run it in: snnTorch 1.0
(`snntorch.import_nir.import_from_nir`) and Norse 1.1 (`norse.torch.from_nir`, on nirtorch
2.6), against our folded model on the 360 validation digits.

Measured here, and said in the README:
- snnTorch reproduces the default export (dt = 1e-4 s, the step its importer hard-codes): the
  same prediction on every sample. Its defect: its Flatten is `nn.Flatten(start_dim=0)`, which
  flattens the batch axis too (NIR's start_dim counts from the sample), so it runs one sample at
  a time only.
- Norse takes dt (`from_nir(graph, dt=...)`) and decays as we do, but its LIF drops NIR's `r`
  (its LIFBox integrates `dt/tau*(v_leak - v + I)`, i.e. assumes r = 1, and logs a warning), so
  it runs another neuron: the input enters scaled by 1 - d. The same graph with r folded into
  the thresholds (r = 1) is reproduced on every sample. For the ResNet it maps no AvgPool2d and
  nirtorch 2.6's executor then returns an intermediate node's output instead of the logits.
"""
from __future__ import annotations

import copy
from pathlib import Path

import nir
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines.digits import load_split
from data_pipelines.registry import read_meta
from models.deploy import DEFAULT_NIR_DT, fold_model
from train.build import build_model
from train.config import load_config, to_yaml
from train.export import main as export_main

snntorch = pytest.importorskip("snntorch")
norse = pytest.importorskip("norse.torch")
import snntorch.utils  # noqa: E402  (after the skip: a test extra)
from snntorch.import_nir import import_from_nir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _val_digits(meta) -> tuple[torch.Tensor, torch.Tensor]:
    """The 360 validation digits as the loader gives them: `[N, 1, 8, 8]` normalised, labels."""
    images, labels = load_split()["val"]
    x = (images.astype(np.float32) - np.float32(meta.mean[0])) / np.float32(meta.std[0])
    return torch.from_numpy(x), torch.from_numpy(labels)


def _trained_export(root: Path, digits_dir: Path, *overrides: str) -> tuple[torch.nn.Module, Path]:
    """One quick epoch of the demo config's model on the training digits (plain Adam: the point
    is a model whose predictions differ between samples), saved as a run and exported to NIR
    with the default --dt. Returns (the folded model, the .nir file)."""
    run_dir = root / "run"
    run_dir.mkdir()
    cfg = load_config(REPO / "configs/demo_digits.yaml", [f"data.path={digits_dir}", *overrides])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    meta = read_meta(digits_dir)
    torch.manual_seed(0)
    model = build_model(cfg, meta)
    images, labels = load_split()["train"]
    x = torch.from_numpy((images.astype(np.float32) - np.float32(meta.mean[0])) / np.float32(meta.std[0]))
    y = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for i in range(0, len(y), 64):
        loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    torch.save(model.state_dict(), run_dir / "best_model.pt")
    assert export_main([str(run_dir), "--format", "nir"]) == 0
    return fold_model(model), run_dir / "export" / "model.nir"


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory, digits_dir) -> tuple[torch.nn.Module, Path]:
    """The demo's spiking_resnet_tiny, trained one epoch, exported with the default dt."""
    return _trained_export(tmp_path_factory.mktemp("resnet"), digits_dir)


def _one_sample_at_a_time(step, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Mean over `steps` of `step(x_i, t)` for each sample alone -> logits `[N, classes]`."""
    return torch.stack([torch.stack([step(x[i:i + 1], t).reshape(-1) for t in range(steps)]).mean(0)
                        for i in range(len(x))])


@torch.no_grad()
def test_snntorch_reproduces_the_default_export_on_every_validation_digit(resnet_export, digits_dir):
    folded, path = resnet_export
    graph = nir.read(path)
    assert float(graph.metadata["dt"]) == DEFAULT_NIR_DT == 1e-4
    x, labels = _val_digits(read_meta(digits_dir))
    ours = folded(x)
    net = import_from_nir(copy.deepcopy(graph))

    def step(sample, t):
        if t == 0:
            snntorch.utils.reset(net)  # its neurons keep their membrane (init_hidden)
        return net(sample)[0]

    theirs = _one_sample_at_a_time(step, x, folded.T)
    assert torch.equal(theirs.argmax(1), ours.argmax(1))  # 360 of 360
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert len(set(ours.argmax(1).tolist())) == 10 and (ours.argmax(1) == labels).float().mean() > 0.5
    # snnTorch's defect: nn.Flatten(start_dim=0) folds the batch into the features.
    snntorch.utils.reset(net)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        net(x[:2])


def _norse_logits(graph: nir.NIRGraph, x: torch.Tensor, steps: int) -> torch.Tensor:
    # ignore_warnings: Norse would warn for every layer that r is not 1 (the defect tested below)
    net = norse.from_nir(copy.deepcopy(graph), dt=float(graph.metadata["dt"]), ignore_warnings=True)
    state = [None]

    def step(sample, t):
        out, state[0] = net(sample, None if t == 0 else state[0])
        return out

    return _one_sample_at_a_time(step, x, steps)


def test_norse_drops_nir_r_and_reproduces_the_mlp_export_once_r_is_folded_into_the_threshold(
        tmp_path, digits_dir):
    folded, path = _trained_export(tmp_path, digits_dir, "model.name=spiking_mlp", "model.in_chans=64")
    graph = nir.read(path)
    x, _ = _val_digits(read_meta(digits_dir))
    unit_r = copy.deepcopy(graph)  # the same neurons, membrane scaled by 1/r: r = 1
    for node in unit_r.nodes.values():
        if isinstance(node, nir.LIF):
            node.v_threshold = node.v_threshold / node.r
            node.v_reset = node.v_reset / node.r
            node.r = np.ones_like(node.r)
    with torch.no_grad():
        ours = folded(x).argmax(1)
        as_exported = _norse_logits(graph, x, folded.T).argmax(1)
        with_unit_r = _norse_logits(unit_r, x, folded.T).argmax(1)
    assert torch.equal(with_unit_r, ours)  # its dt and tau handling is ours
    assert not torch.equal(as_exported, ours)  # the defect: r ignored, input scaled by 1 - d


@torch.no_grad()
def test_norse_returns_an_intermediate_node_for_the_resnet_export(resnet_export, digits_dir):
    folded, path = resnet_export
    graph = nir.read(path)
    x, _ = _val_digits(read_meta(digits_dir))
    net = norse.from_nir(copy.deepcopy(graph), dt=float(graph.metadata["dt"]), ignore_warnings=True)
    out, _ = net(x[:1], None)
    # Norse maps no AvgPool2d; nirtorch 2.6's executor then stops at the last block's shortcut.
    assert tuple(out.shape) != (1, 10) and "avgpool" not in dict(net.named_children())
