"""Spiking ResNets: parameter counts, shapes, encodings, tdBN placement, timm registration,
and the demo net learning digits (checkpointing: test_checkpointing.py)."""

import math

import pytest
import timm
import torch
import torchvision
from omegaconf import OmegaConf

import models.zoo  # noqa: F401  (registers the timm entry points)
from models.firing import firing_counts, set_firing_recording
from models.neurons import LIF, NeuronConfig, Reset
from models.resnet import BasicBlock, Bottleneck, SpikingResNetArgumentError
from models.tdbn import TdBN

NAMES = [
    "spiking_resnet19",
    "spiking_resnet18",
    "spiking_resnet34",
    "spiking_wide_resnet34",
    "spiking_resnet50",
    "spiking_resnet_tiny",
]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_spiking_resnets_are_registered_with_timm():
    assert set(NAMES) <= set(timm.list_models("spiking_*"))


def test_resnet19_has_the_papers_12_63M_parameters_within_1_percent():
    n = _params(timm.create_model("spiking_resnet19", num_classes=10))
    assert n == 12_697_994  # stem 128, 3x128 / 3x256 / 2x512, FC 512-256-10
    assert abs(n - 12.63e6) / 12.63e6 < 0.01


@pytest.mark.parametrize("name, reference", [
    ("spiking_resnet18", torchvision.models.resnet18),
    ("spiking_resnet34", torchvision.models.resnet34),
    ("spiking_resnet50", torchvision.models.resnet50),
])
def test_imagenet_resnets_have_the_parameter_count_of_their_ann_twin(name, reference):
    # tdBN has lambda and beta per channel, exactly like BatchNorm's affine parameters.
    assert _params(timm.create_model(name)) == _params(reference())


def test_wide_resnet34_doubles_every_width_and_tiny_stays_small():
    wide = timm.create_model("spiking_wide_resnet34")
    assert wide.conv1.out_channels == 128 and wide.num_features == 1024
    conv_params = sum(p.numel() for n, p in timm.create_model("spiking_resnet34").named_parameters() if p.ndim == 4)
    wide_conv_params = sum(p.numel() for n, p in wide.named_parameters() if p.ndim == 4)
    stem = 3 * 7 * 7 * 64  # has 3 input channels in both, so it only doubles
    assert wide_conv_params == 4 * (conv_params - stem) + 2 * stem
    assert 50_000 <= _params(timm.create_model("spiking_resnet_tiny")) <= 150_000


@pytest.mark.parametrize("T", [1, 6])
def test_resnet19_output_shape_for_T_1_and_6(T):
    model = timm.create_model("spiking_resnet19", T=T, num_classes=10)
    assert model.T == T
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", ["spiking_resnet34", "spiking_resnet50"])
@pytest.mark.parametrize("T", [1, 2])
def test_imagenet_resnets_output_shape(name, T):
    model = timm.create_model(name, T=T, num_classes=7)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_sequence_input_runs_for_its_own_number_of_steps():
    model = timm.create_model("spiking_resnet_tiny", T=4)
    set_firing_recording(model, True)
    out = model(torch.randn(3, 2, 1, 8, 8))  # [T'=3, B=2, C, H, W], e.g. DVS frames
    assert out.shape == (2, 10)
    stem_slots = firing_counts(model)["lif1"][1].item()
    assert stem_slots == 3 * 2 * 32 * 8 * 8


@pytest.mark.parametrize("train", [True, False])
def test_direct_encoding_equals_repeating_the_image_over_time(train):
    torch.manual_seed(0)
    model = timm.create_model("spiking_resnet_tiny", T=4).train(train)
    if not train:
        for m in model.modules():  # non-trivial running statistics
            if isinstance(m, TdBN):
                m.norm.running_mean.uniform_(-0.1, 0.1)
                m.norm.running_var.uniform_(0.5, 1.5)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        direct = model(x)
        repeated = model(x.unsqueeze(0).expand(4, -1, -1, -1, -1))
    torch.testing.assert_close(direct, repeated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["none", "blocks+time"])
def test_every_neuron_reads_bf16_current_under_bf16_autocast(mode):
    """Convolutions give bf16 under autocast; nothing between them and the neurons (tdBN, the
    residual add, the head's linear layer) may promote to fp32, or every neuron layer would read
    and write twice the bytes. Spikes come back as exact 0/1 in bf16."""
    model = timm.create_model("spiking_resnet19", T=2, num_classes=10).train()
    model.set_checkpointing(mode)
    seen, spikes = {}, []

    def record(name):
        def hook(module, args):  # returns None: the arguments stay as they are
            seen.setdefault(name, args[0].dtype)
        return hook

    for name, lif in ((n, m) for n, m in model.named_modules() if isinstance(m, LIF)):
        lif.register_forward_pre_hook(record(name))
        lif.register_forward_hook(lambda m, args, out: spikes.append(out) and None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
    logits.float().sum().backward()
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert len(seen) == len(lifs) and set(seen.values()) == {torch.bfloat16}, seen
    out = spikes[0][0] if isinstance(spikes[0], tuple) else spikes[0]
    assert out.dtype == torch.bfloat16 and set(out.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("shape, steps", [((3, 1, 8, 8), 4), ((5, 3, 1, 8, 8), 5)], ids=["image", "sequence"])
@pytest.mark.parametrize("name", ["spiking_resnet_tiny", "spiking_resnet19"])  # without / with FC-LIF head
def test_forward_is_the_mean_over_time_of_forward_steps(name, shape, steps):
    torch.manual_seed(0)
    model = timm.create_model(name, T=4, in_chans=1, num_classes=6).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        per_step = model.forward_steps(x)
        logits = model(x)
    assert per_step.shape == (steps, 3, 6)
    torch.testing.assert_close(logits, per_step.mean(0))


def test_bad_input_rank_is_one_clear_error():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or \[T, B, C, H, W\]"):
        timm.create_model("spiking_resnet_tiny")(torch.randn(8, 8))


def test_tdbn_alpha_is_one_over_sqrt2_exactly_where_branches_are_added():
    model = timm.create_model("spiking_resnet50", neuron=dict(v_threshold=0.3))
    residual = {
        name for name, m in model.named_modules()
        if isinstance(m, (BasicBlock, Bottleneck))
        for name in [f"{name}.{'bn3' if isinstance(m, Bottleneck) else 'bn2'}"]
        + ([f"{name}.downsample.bn"] if m.downsample is not None else [])
    }
    tdbns = {name: m for name, m in model.named_modules() if isinstance(m, TdBN)}
    assert len(residual) == 16 + 4
    for name, bn in tdbns.items():
        assert bn.alpha == (1 / math.sqrt(2) if name in residual else 1.0), name
        assert bn.v_threshold == 0.3


def test_neuron_config_reaches_every_lif_from_dict_dataclass_or_omegaconf():
    for neuron in (
        dict(reset="soft", tau_decay=0.5),
        NeuronConfig(reset="soft", tau_decay=0.5),
        OmegaConf.merge(OmegaConf.structured(NeuronConfig), {"reset": "soft", "tau_decay": 0.5}),
    ):
        model = timm.create_model("spiking_resnet19", T=2, neuron=neuron)
        lifs = [m for m in model.modules() if isinstance(m, LIF)]
        assert len(lifs) == 1 + 2 * 8 + 1
        assert all(m.neuron.reset is Reset.soft and m.neuron.tau_decay == 0.5 for m in lifs)


def test_factory_rejects_unknown_arguments_and_pretrained():
    with pytest.raises(SpikingResNetArgumentError, match="nueron"):
        timm.create_model("spiking_resnet_tiny", nueron=dict(reset="soft"))
    with pytest.raises(SpikingResNetArgumentError, match="pretrained"):
        timm.create_model("spiking_resnet_tiny", pretrained=True)


def test_tiny_demo_net_learns_digits_above_90_percent():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    digits = load_digits()
    x = (torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    y = torch.tensor(digits.target)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    model = timm.create_model("spiking_resnet_tiny", T=4, num_classes=10, in_chans=1)
    epochs, batch = 5, 64
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * math.ceil(len(x_train) / batch)
    )
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train)).split(batch):
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
    assert accuracy >= 0.90
