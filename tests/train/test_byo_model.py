"""Bring your own model: `model.name=package.module:factory` builds a network from a file outside
the package (a SpikingJelly multi-step network, a plain PyTorch module), which trains through the
step loop, checkpoints and resumes exactly, reports SpikingJelly's firing rates and SOPs, starts
every batch from rest, and is refused in one line where our own blocks are needed."""
from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from models.deploy import fold_model
from models.firing import firing_counts, firing_report, reset_firing_counts, set_firing_recording
from models.foreign import ForeignModel
from train import measure
from train.config import ConfigError, load_config, to_yaml
from train.export import main as export_main
from train.loop import REQUEUE_EXIT_CODE
from tests.train.test_loop import META, Loader, Stop, trainer
from tests.train.trainrun import DEMO

functional = pytest.importorskip("spikingjelly.activation_based.functional")

SPIKINGJELLY_NET = """
    import torch
    from spikingjelly.activation_based import functional, layer, neuron, surrogate


    def make(num_classes, in_chans, width=4, step_mode="m"):
        net = torch.nn.Sequential(
            layer.Conv2d(in_chans, width, 3, padding=1, bias=False), layer.BatchNorm2d(width),
            neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True),
            layer.Flatten(), layer.Linear(width * 64, num_classes))
        functional.set_step_mode(net, step_mode)
        return net
"""
PLAIN_NET = """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes, hidden):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, hidden), nn.Linear(hidden, num_classes)

        def forward(self, x):  # [T, B, 1, 8, 8] -> [B, classes]
            return self.fc2(torch.relu(self.fc1(x.flatten(2)))).mean(0)


    def build(num_classes, hidden=16):
        return Net(num_classes, hidden)
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A researcher's directory outside the package, on sys.path: sj_net.py and plain_net.py."""
    root = tmp_path / "user_code"
    root.mkdir()
    (root / "sj_net.py").write_text(textwrap.dedent(SPIKINGJELLY_NET))
    (root / "plain_net.py").write_text(textwrap.dedent(PLAIN_NET))
    monkeypatch.syspath_prepend(str(root))
    return root


def _spikes(model: ForeignModel, x: torch.Tensor) -> torch.Tensor:
    """The LIFNode's spikes of one forward, read by a hook of the test's own."""
    seen = []
    hook = model.net[2].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0]


def test_a_spikingjelly_network_trains_and_its_firing_rates_and_sops_are_its_spikes(tmp_path, user_dir):
    t, tracker = trainer(tmp_path, "model.name=sj_net:make", "model.args.width=4")
    model = t.p.model
    assert isinstance(model, ForeignModel) and [n for n, _ in model.neuron_layers()] == ["net.2"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert t.fit(Stop()) == 0 and tracker.status == "FINISHED"
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    val = tracker.metrics[t.state.epoch]  # epoch metrics are logged at step = epoch
    assert 0 < val["firing_rate/net.2"] < 1 and val["firing_rate_mean"] == val["firing_rate/net.2"]

    model.eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        spikes = _spikes(model, x)  # [T, B, 4, 8, 8]
        set_firing_recording(model, True)
        reset_firing_counts(model)
        model(x)
        report = firing_report(firing_counts(model), model, images=5)
        set_firing_recording(model, False)
    assert spikes.shape == (4, 5, 4, 8, 8) and report["firing_rate/net.2"] == pytest.approx(float(spikes.mean()))
    # Its spikes reach the Linear classifier through a Flatten (a view): 10 synapses each.
    assert model.spike_consumers() == {"net.2": ["net.4"]}
    assert report["sops_per_image"] == pytest.approx(float(spikes.sum()) * 10 / 5)
    # The stem conv runs at each of T = 4 steps: 4 x (4 x 8 x 8 outputs x 9 taps).
    assert model.first_layer_macs_per_image() == 4 * 4 * 64 * 9


def test_every_batch_starts_from_rest_with_reset_net(user_dir):
    cfg = load_config([DEMO], ["model.name=sj_net:make"])
    from train.build import build_model

    model = build_model(cfg, META).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        first, second = model(x), model(x)  # SpikingJelly would carry the membrane over
        functional.reset_net(model.net)
        by_hand = model.net(x.unsqueeze(0).repeat(4, 1, 1, 1, 1)).mean(0)
    assert torch.equal(first, second) and torch.equal(first, by_hand)
    assert float(model.net[2].v.abs().sum()) > 0  # the membrane was not at rest after the call


def test_a_plain_module_from_a_file_trains_with_its_factory_arguments(tmp_path, user_dir):
    t, tracker = trainer(tmp_path, "model.name=plain_net:build", "model.args.hidden=8")
    assert t.p.model.net.fc1.out_features == 8 and t.p.model.fc is t.p.model.net.fc2
    start = t.p.model.net.fc1.weight.detach().clone()
    assert t.fit(Stop()) == 0 and tracker.status == "FINISHED"
    assert not torch.equal(start, t.p.model.net.fc1.weight)
    val = tracker.metrics[t.state.epoch]  # epoch metrics are logged at step = epoch
    assert 0 <= val["val/top1"] <= 1 and val["firing_rate_mean"] == 0.0  # no neuron modules to count


def test_a_spikingjelly_network_stopped_and_resumed_ends_as_an_uninterrupted_run(tmp_path, user_dir):
    name = "model.name=sj_net:make"
    straight, _ = trainer(tmp_path / "straight", name)
    assert straight.fit(Stop()) == 0
    loader = Loader()
    stopped, _ = trainer(tmp_path / "stopped", name, loader=loader)
    assert stopped.fit(Stop(after_batches=11, loader=loader)) == REQUEUE_EXIT_CODE
    resumed, _ = trainer(tmp_path / "stopped", name)
    assert resumed.fit(Stop()) == 0 and resumed.state.global_step == straight.state.global_step
    a, b = straight.p.model.state_dict(), resumed.p.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, message", [
    (["model.name=no_such_module:make"], "cannot import no_such_module"),
    (["model.name=sj_net:missing"], "has no callable missing"),
    (["model.name=sj_net:make", "model.args.step_mode=s"], "step_mode='s'"),
    (["model.name=sj_net:make", "model.args.colour=red"], "unexpected keyword argument 'colour'"),
    (["model.name=sj_net:make", "train.checkpointing=blocks+time"], "config key 'train.checkpointing'"),
])
def test_what_a_brought_model_cannot_do_is_one_config_error_line(user_dir, overrides, message):
    from train.build import build_model

    cfg = load_config([DEMO], overrides)  # the schema takes the form; building checks the rest
    with pytest.raises(ConfigError, match=message) as info:
        build_model(cfg, META)
    assert "\n" not in str(info.value)


def test_the_schema_takes_the_factory_form_and_names_it_for_anything_else():
    assert load_config([DEMO], ["model.name=pkg.sub.mod:factory"]).model.name == "pkg.sub.mod:factory"
    with pytest.raises(ConfigError, match="or a brought network's package.module:factory"):
        load_config([DEMO], ["model.name=pkg.mod"])


def test_export_and_fold_refuse_a_brought_model_in_one_line(tmp_path, user_dir, digits_dir, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config([DEMO], ["model.name=sj_net:make", f"data.path={digits_dir}"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    for fmt in ("nir", "torch"):
        assert export_main([str(run_dir), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert "is a brought network" in err and err.count("\n") == 1
    from train.build import build_model

    with pytest.raises(ValueError, match="brought network"):
        fold_model(build_model(cfg, META))


def test_per_step_logits_give_the_per_step_accuracy(user_dir):
    from train.build import build_model

    model = build_model(load_config([DEMO], ["model.name=sj_net:make"]), META)
    batch = [(torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,)))]
    model.set_output("per_step")
    metrics = measure.clean_metrics(model, batch, device=torch.device("cpu"))
    assert {f"val/top1_t{k}" for k in range(1, 5)} <= set(metrics)
    with torch.no_grad():
        assert model.forward_steps(batch[0][0]).shape == (4, 6, 10)
    assert isinstance(model.net, nn.Sequential)
