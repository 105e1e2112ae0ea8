"""`SpikingResNet.compile()`: the whole model without activation checkpointing, each residual
block on its own with it; the checkpointed, compiled model trains as the eager one does."""
import copy

import pytest
import timm
import torch
from torch._dynamo.utils import counters

import models.zoo  # noqa: F401  (registers the spiking models)
from models import checkpointing
from models.firing import firing_counts, set_firing_recording


def _step(model, x, y):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["blocks", "blocks+time"])
def test_checkpointed_model_compiles_block_by_block_and_trains_as_eager(mode, monkeypatch):
    packed = []
    real = checkpointing.pack_spikes
    monkeypatch.setattr(checkpointing, "pack_spikes", lambda t: packed.append(t.numel()) or real(t))
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = timm.create_model("spiking_resnet_tiny", T=4, neuron=dict(recurrence="self")).train()
    eager.set_checkpointing(mode, time_chunk=2)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    # The checkpoint stays outside the compiled code: the model itself is not compiled, each block is.
    assert compiled._compiled_call_impl is None
    assert all(b._compiled_call_impl is not None for b in compiled.blocks())
    set_firing_recording(eager, True)
    set_firing_recording(compiled, True)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])

    counters.clear()
    graphs = []
    for _ in range(3):
        packed.clear()
        loss_e, grads_e = _step(eager, x, y)
        eager_packed = list(packed)
        packed.clear()
        loss_c, grads_c = _step(compiled, x, y)
        # blocks+time still stores each block input at 1 bit per spike under compilation.
        assert packed == eager_packed and len(packed) == (2 if mode == "blocks+time" else 0)
        assert loss_c == pytest.approx(loss_e, rel=1e-6)
        for n in grads_e:
            torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6, msg=n)
        graphs.append(counters["stats"]["unique_graphs"])
    # Inductor compiled the blocks; by the third step nothing new is compiled: a recomputation
    # in backward runs the graph its forward pass ran.
    assert graphs[0] >= 2 and graphs[2] == graphs[1]

    # Running statistics and firing counts are updated once per step, as in eager mode (a
    # recomputation inside one compiled graph would update them twice).
    for (n, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        if n.endswith("num_batches_tracked"):
            assert int(b) == int(a) == 3, n
        else:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=n)
    counts_e, counts_c = firing_counts(eager), firing_counts(compiled)
    assert counts_e.keys() == counts_c.keys()
    assert all(torch.equal(counts_c[k], counts_e[k]) for k in counts_e)


def test_checkpointing_after_a_whole_model_compile_is_refused():
    model = timm.create_model("spiking_resnet_tiny", T=2)
    model.compile()  # checkpointing none: one compiled region for the whole model
    assert model._compiled_call_impl is not None
    with pytest.raises(ValueError, match="compile"):
        model.set_checkpointing("blocks+time")
    model.set_checkpointing("none")
    assert model.checkpointing == "none"
