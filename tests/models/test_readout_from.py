"""`readout_from`: the classifier's readout (mean of per-step logits, or the per-step output) counts
only the steps from `readout_from` on, and the model factory takes it from the data set's Meta."""

import pytest
import timm
import torch

import models.zoo  # noqa: F401  (registers the spiking networks)
from data_pipelines.meta import Meta
from train.build import build_model
from train.config import load_config

T, B, CLASSES, START = 6, 3, 4, 4


def _with_fixed_logits(logits: torch.Tensor):
    model = timm.create_model("spiking_mlp", T=T, num_classes=CLASSES, in_chans=5, hidden=(8,), norm="none")
    model.forward_head = lambda s, per_step=False: logits
    return model


def test_readout_averages_only_the_steps_from_readout_from():
    logits = torch.randn(T, B, CLASSES)
    model = _with_fixed_logits(logits)
    x = torch.rand(T, B, 5)
    assert torch.equal(model(x), logits.mean(0))  # default: every step
    model.set_readout(START)
    out = model(x)
    assert torch.allclose(out, logits[START:].mean(0))
    logits[:START] = torch.randn(START, B, CLASSES) * 100  # earlier steps do not count
    assert torch.equal(model(x), out)
    model.set_output("per_step")
    assert torch.equal(model(x), logits[START:])
    assert model.forward_steps(x).shape == (T, B, CLASSES)  # a stream still sees every step


def test_loss_gradient_reaches_no_logit_before_readout_from():
    logits = torch.randn(T, B, CLASSES, requires_grad=True)
    model = _with_fixed_logits(logits)
    model.set_readout(START)
    torch.nn.functional.cross_entropy(model(torch.rand(T, B, 5)), torch.tensor([0, 1, 2])).backward()
    assert torch.count_nonzero(logits.grad[:START]) == 0 and torch.count_nonzero(logits.grad[START:]) > 0


def test_readout_past_the_last_step_is_refused():
    model = _with_fixed_logits(torch.randn(T, B, CLASSES))
    model.set_readout(T)
    with pytest.raises(ValueError, match="readout_from=6"):
        model(torch.rand(T, B, 5))
    with pytest.raises(ValueError):
        model.set_readout(-1)


def test_build_model_takes_readout_from_from_meta():
    cfg = load_config(None, ["model.name=spiking_mlp", f"model.T={T}", "data.dataset=delayed_xor",
                             "data.path=nowhere"])
    meta = Meta(dataset="delayed_xor", num_classes=2, classes=["0", "1"], in_chans=20,
                counts={"train": 1, "val": 1}, T=T, readout_from=START)
    model = build_model(cfg, meta)
    assert model.readout_from == START and model.num_classes == 2
