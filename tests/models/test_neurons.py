"""LIF dynamics against hand-computed sequences, state carrying, dtypes, dispatch, config,
torch.compile.

Hand-computed inputs are dyadic fractions, so every membrane value below is exact in fp32 and the
expected numbers are the arithmetic written in the comments.
"""

import pytest
import torch
from omegaconf import OmegaConf

from models import dispatch
from models.firing import firing_counts, firing_report, set_firing_recording
from models.neurons import (
    LIF,
    Leak,
    LIFSpec,
    LIFState,
    NeuronConfig,
    NeuronConfigError,
    Recurrence,
    Reset,
    Surrogate,
    as_neuron_config,
    lif_multistep,
    neuron_impl_for,
    neuron_impls,
    register_neuron_impl,
)


def _trajectory(x: torch.Tensor, cfg: NeuronConfig, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes and post-reset membrane at every step, the membrane read from the state returned
    by runs over each prefix of the sequence."""
    spikes = lif_multistep(x, cfg, **params)
    membrane = torch.stack(
        [lif_multistep(x[: t + 1], cfg, return_state=True, **params)[1].v for t in range(x.shape[0])]
    )
    return spikes, membrane


def _seq(*values: float) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1)  # [T, B=1, C=1]


def test_default_neuron_is_stbp_tdbn_lif_with_hard_reset_and_strict_threshold():
    # decay 0.25, V_th 0.5: h = 0.25 * v + x; spike iff h > 0.5; v = h * (1 - o)
    x = _seq(0.25, 0.5, 0.375, 0.0625, 0.5, 0.5)
    spikes, v = _trajectory(x, NeuronConfig())
    # h: .25 | .0625+.5=.5625 (spike) | 0+.375 | .09375+.0625=.15625 | .0390625+.5=.5390625 (spike)
    #    | 0+.5=.5 (equal to V_th: no spike)
    assert spikes.flatten().tolist() == [0, 1, 0, 0, 1, 0]
    assert v.flatten().tolist() == [0.25, 0.0, 0.375, 0.15625, 0.0, 0.5]


def test_if_neuron_without_leak_integrates_fully():
    x = _seq(0.25, 0.125, 0.25, 0.5, 0.0)
    spikes, v = _trajectory(x, NeuronConfig(leak=False))
    # h: .25 | .375 | .625 (spike) | 0+.5 | .5+0
    assert spikes.flatten().tolist() == [0, 0, 1, 0, 0]
    assert v.flatten().tolist() == [0.25, 0.375, 0.0, 0.5, 0.5]


def test_soft_reset_subtracts_threshold():
    x = _seq(0.75, 0.5, 0.25)
    spikes, v = _trajectory(x, NeuronConfig(reset="soft"))
    # h: .75 (spike, v=.25) | .0625+.5=.5625 (spike, v=.0625) | .015625+.25=.265625
    assert spikes.flatten().tolist() == [1, 1, 0]
    assert v.flatten().tolist() == [0.25, 0.0625, 0.265625]


def test_no_reset_keeps_membrane_after_spike():
    x = _seq(0.75, 0.5, 0.0)
    spikes, v = _trajectory(x, NeuronConfig(reset="none"))
    # h: .75 (spike) | .1875+.5=.6875 (spike) | .171875
    assert spikes.flatten().tolist() == [1, 1, 0]
    assert v.flatten().tolist() == [0.75, 0.6875, 0.171875]


def test_hard_reset_goes_to_v_reset():
    x = _seq(0.75, 0.5, 0.5)
    spikes, v = _trajectory(x, NeuronConfig(v_reset=-0.25))
    # h: .75 (spike, v=-.25) | -.0625+.5=.4375 | .109375+.5=.609375 (spike, v=-.25)
    assert spikes.flatten().tolist() == [1, 0, 1]
    assert v.flatten().tolist() == [-0.25, 0.4375, -0.25]


def test_complete_leak_membrane_equals_the_current_input():
    # decay 0: h[t] = x[t]; with reset none the membrane after each step is exactly x[t], and the
    # neuron fires where x[t] alone exceeds V_th (0.5), whatever came before.
    x = _seq(0.25, 0.375, 0.75, 0.125, 0.5, 0.625)
    spikes, v = _trajectory(x, NeuronConfig(leak="complete", reset="none"))
    assert v.flatten().tolist() == x.flatten().tolist()
    assert spikes.flatten().tolist() == [0, 0, 1, 0, 0, 1]
    # The same on a random conv-shaped input, through the layer, with the default hard reset.
    torch.manual_seed(0)
    x = torch.rand(5, 2, 3, 4, 4)
    lif = LIF(3, dict(leak="complete"))
    assert lif.decay() == 0.0
    assert torch.equal(lif(x), (x > 0.5).float())
    _, state = lif(x, return_state=True)
    assert torch.equal(state.v, x[-1] * (x[-1] <= 0.5))


def test_leak_levels_fix_the_decay():
    assert NeuronConfig().decay == 0.25
    assert NeuronConfig(leak="none").decay == 1.0
    assert NeuronConfig(leak="complete", tau_decay=0.75).decay == 0.0


@pytest.mark.parametrize("value, level", [(True, Leak.normal), (False, Leak.none), ("true", Leak.normal),
                                          ("False", Leak.none), ("normal", Leak.normal), ("complete", Leak.complete)])
def test_leak_reads_the_booleans_of_older_configs(value, level):
    assert as_neuron_config(dict(leak=value)).leak is level


def test_self_recurrence_feeds_back_own_previous_spike():
    x = _seq(0.75, 0.25, 0.0)
    w = torch.tensor([0.375])
    spikes, v = _trajectory(x, NeuronConfig(recurrence="self"), recurrent_weight=w)
    # h: .75 (spike) | 0+.25+.375=.625 (spike) | 0+0+.375
    assert spikes.flatten().tolist() == [1, 1, 0]
    assert v.flatten().tolist() == [0.0, 0.0, 0.375]


def test_lateral_recurrence_mixes_previous_spikes_across_channels():
    # channel 0 receives 0.5 * spike of channel 1, channel 1 receives 0.25 * spike of channel 0
    w = torch.tensor([[0.0, 0.5], [0.25, 0.0]])
    x = torch.tensor([[0.0, 0.75], [0.25, 0.0], [0.0, 0.0]]).view(3, 1, 2)
    spikes, v = _trajectory(x, NeuronConfig(recurrence="lateral"), recurrent_weight=w)
    # ch0 h: 0 | .25+.5*1=.75 (spike) | 0+.5*0=0      ch1 h: .75 (spike) | 0+.25*0=0 | 0+.25*1=.25
    assert spikes[:, 0].tolist() == [[0, 1], [1, 0], [0, 0]]
    assert v[:, 0].tolist() == [[0.0, 0.0], [0.0, 0.0], [0.0, 0.25]]


def test_lateral_recurrence_on_conv_maps_acts_as_1x1_conv():
    torch.manual_seed(0)
    x = torch.rand(4, 2, 3, 5, 5)
    w = torch.randn(3, 3) * 0.3
    cfg = NeuronConfig(recurrence="lateral", leak=False, reset="none")
    spikes = lif_multistep(x, cfg, recurrent_weight=w)
    # Explicit loop with a real 1x1 convolution for the recurrent input.
    v, o, expected = torch.zeros(2, 3, 5, 5), torch.zeros(2, 3, 5, 5), []
    for t in range(4):
        v = v + x[t] + torch.nn.functional.conv2d(o, w.view(3, 3, 1, 1))
        o = (v > 0.5).float()
        expected.append(o)
    torch.testing.assert_close(spikes, torch.stack(expected))


def test_full_recurrence_on_vectors_is_the_dense_matrix_on_previous_spikes():
    # Fixed previous spikes carried in; no input and an unreachable threshold: the membrane after
    # one step with reset none is exactly the recurrent input V @ o[t-1].
    torch.manual_seed(0)
    v_mat = torch.randn(4, 4)
    o_prev = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    cfg = NeuronConfig(recurrence="full", reset="none", v_threshold=1e9)
    _, state = lif_multistep(torch.zeros(1, 2, 4), cfg, recurrent_weight=v_mat,
                             state=LIFState(torch.zeros(2, 4), o_prev), return_state=True)
    torch.testing.assert_close(state.v, o_prev @ v_mat.T)
    lif = LIF(4, cfg)  # a vector layer: the [C, C] matrix, the same as lateral
    assert lif.recurrent_weight.shape == (4, 4)


def test_full_recurrence_on_feature_maps_is_a_3x3_convolution_of_previous_spikes():
    torch.manual_seed(0)
    lif = LIF(3, dict(recurrence="full", reset="none", v_threshold=1e9), spatial=True)
    assert lif.recurrent_weight.shape == (3, 3, 3, 3)
    with torch.no_grad():
        lif.recurrent_weight.normal_()
    o_prev = (torch.rand(2, 3, 5, 6) > 0.5).float()
    _, state = lif(torch.zeros(1, 2, 3, 5, 6), state=LIFState(torch.zeros(2, 3, 5, 6), o_prev), return_state=True)
    expected = torch.nn.functional.conv2d(o_prev, lif.recurrent_weight, padding=1)
    torch.testing.assert_close(state.v, expected)
    # Built for maps: a vector input is refused, and so is a map input to a vector layer.
    with pytest.raises(ValueError, match="feature maps"):
        lif(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="vectors"):
        LIF(3, dict(recurrence="full"))(torch.zeros(1, 2, 3, 5, 6))


class _FullRecurrentNet(torch.nn.Module):
    """LIF (full recurrence, C = 2 on 4x4 maps) -> linear(32 -> 5): SOPs by hand."""

    def __init__(self):
        super().__init__()
        self.lif = LIF(2, dict(recurrence="full"), spatial=True)
        self.fc = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.lif(x).flatten(2)).mean(0)

    def spike_consumers(self):
        return {"lif": ["fc"]}

    def first_layer_macs_per_image(self):
        return 0.0


def test_full_recurrence_sops_count_its_convolution_synapses():
    net = _FullRecurrentNet()
    set_firing_recording(net, True)
    x = torch.zeros(1, 1, 2, 4, 4)
    x[0, 0, 0, 0, 0] = x[0, 0, 1, 1, 2] = 1.0  # two spikes, one at a corner, one inside
    net(x)
    counts = firing_counts(net)
    assert counts["lif"].tolist() == [2.0, 32.0]
    # Each spike: 5 synapses into fc, plus its recurrent fan-out into the layer: a 3x3 conv over
    # 2 channels with padding 1 on 4x4 has, per axis, 2 + 3 + 3 + 2 = 10 taps inside the map, so
    # a mean of 2 * 10 * 10 / 16 = 12.5 synapses per neuron (a corner neuron has 2 * 4 = 8, an
    # inner one 2 * 9 = 18: the mean over the map is what is counted, as for a conv).
    assert firing_report(counts, net, images=1)["sops_per_image"] == 2 * (5 + 12.5)


def test_per_channel_threshold_and_decay():
    x = torch.tensor([[0.375, 0.375], [0.25, 0.25]]).view(2, 1, 2)
    spikes, v = _trajectory(
        x, NeuronConfig(), decay=torch.tensor([0.5, 0.25]), v_threshold=torch.tensor([0.5, 0.25])
    )
    # ch0 (d .5, V_th .5): .375 | .1875+.25=.4375      ch1 (d .25, V_th .25): .375 (spike) | 0+.25=.25
    assert spikes[:, 0].tolist() == [[0, 1], [0, 0]]
    assert v[:, 0].tolist() == [[0.375, 0.0], [0.4375, 0.25]]


def test_detach_reset_changes_gradient_not_spikes():
    torch.manual_seed(0)
    x = torch.rand(6, 4, 3, requires_grad=True)
    grads, outs = [], []
    for detach in (False, True):
        out = lif_multistep(x, NeuronConfig(detach_reset=detach))
        (g,) = torch.autograd.grad(out.sum(), x)
        outs.append(out)
        grads.append(g)
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize(
    "cfg",
    [
        NeuronConfig(),
        NeuronConfig(reset="soft", recurrence="self"),
        NeuronConfig(leak=False, reset="none", recurrence="lateral"),
    ],
)
def test_chunked_sequence_with_carried_state_equals_one_call(cfg):
    torch.manual_seed(0)
    x = torch.rand(7, 2, 3, 4) * 0.8
    weight = {Recurrence.none: None, Recurrence.self: torch.rand(3), Recurrence.lateral: torch.rand(3, 3)}
    w = weight[cfg.recurrence]
    full, full_state = lif_multistep(x, cfg, recurrent_weight=w, return_state=True)
    state, parts = None, []
    for chunk in (x[:3], x[3:4], x[4:]):
        out, state = lif_multistep(chunk, cfg, recurrent_weight=w, state=state, return_state=True)
        parts.append(out)
    assert torch.equal(torch.cat(parts), full)
    assert torch.equal(state.v, full_state.v)
    assert torch.equal(state.spike, full_state.spike)


def test_spikes_keep_input_dtype_and_membrane_is_fp32():
    x = torch.rand(3, 2, 4, dtype=torch.bfloat16)
    spikes, state = lif_multistep(x, return_state=True)
    assert spikes.dtype == torch.bfloat16
    assert state.v.dtype == torch.float32
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}


def test_bf16_input_of_bf16_representable_values_gives_identical_spikes_and_membrane():
    torch.manual_seed(0)
    x = (torch.randn(32, 8, 16) * 0.4).to(torch.bfloat16)
    cfg = NeuronConfig(reset="soft")
    s16, st16 = lif_multistep(x, cfg, return_state=True)
    s32, st32 = lif_multistep(x.float(), cfg, return_state=True)
    assert torch.equal(s16.float(), s32)
    assert torch.equal(st16.v, st32.v)  # fp32 accumulation: no bf16 rounding in the membrane


def test_bf16_rounded_inputs_change_spikes_only_where_membrane_is_near_threshold():
    torch.manual_seed(0)
    cfg = NeuronConfig()
    x = torch.randn(8, 64, 256) * 0.4
    x16 = x.to(torch.bfloat16)
    # fp32 membrane before firing, by the STBP-tdBN recursion u[t] = d u[t-1] (1 - o[t-1]) + x[t]
    u, o, margin = torch.zeros(64, 256), torch.zeros(64, 256), []
    for t in range(8):
        u = cfg.tau_decay * u * (1 - o) + x[t]
        o = (u > cfg.v_threshold).float()
        margin.append((u - cfg.v_threshold).abs())
    # Input rounding moves the membrane by at most sum_k d^k |dx| < max|dx| / (1 - d).
    tol = 2 * (x - x16.float()).abs().max() / (1 - cfg.tau_decay)
    safe = (torch.stack(margin) > tol).all(dim=0)  # neurons never near threshold
    assert safe.float().mean() > 0.8
    s32 = lif_multistep(x, cfg)
    s16 = lif_multistep(x16, cfg)
    assert torch.equal(s16.float()[:, safe], s32[:, safe])


def test_lif_module_forward_matches_functional_and_checks_channels():
    torch.manual_seed(0)
    lif = LIF(3, dict(recurrence="self", learnable_threshold=True, learnable_decay=True))
    with torch.no_grad():
        lif.recurrent_weight.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = torch.rand(4, 2, 3, 5, 5)
    expected = lif_multistep(
        x, lif.neuron, decay=torch.sigmoid(lif.decay_logit), v_threshold=lif.v_threshold,
        recurrent_weight=lif.recurrent_weight,
    )
    assert torch.equal(lif(x), expected)
    torch.testing.assert_close(lif.decay(), torch.full((3,), 0.25))
    with pytest.raises(ValueError, match="C = 3"):
        lif(torch.rand(4, 2, 5, 5, 5))


def test_lif_module_holds_only_the_parameters_its_config_asks_for():
    assert list(LIF(8).parameters()) == []
    shapes = {
        n: tuple(p.shape)
        for n, p in LIF(8, dict(learnable_decay=True, learnable_threshold=True, recurrence="lateral")).named_parameters()
    }
    assert shapes == {"decay_logit": (8,), "v_threshold": (8,), "recurrent_weight": (8, 8)}
    assert list(LIF(8).buffers()) == []  # no state survives between calls


def test_recurrence_needs_weight_in_functional_call():
    with pytest.raises(ValueError, match="recurrent_weight"):
        lif_multistep(torch.rand(2, 1, 3), NeuronConfig(recurrence="self"))


def test_config_from_dict_with_strings_and_from_omegaconf():
    cfg = as_neuron_config(dict(reset="soft", recurrence="self", surrogate="atan", tau_decay=1))
    assert cfg.reset is Reset.soft and cfg.recurrence is Recurrence.self
    assert cfg.surrogate is Surrogate.atan and cfg.tau_decay == 1.0
    schema = OmegaConf.structured(NeuronConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["reset=none", "surrogate=triangle"]))
    assert as_neuron_config(merged).reset is Reset.none  # DictConfig accepted as a mapping
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, NeuronConfig) and obj.surrogate is Surrogate.triangle
    assert LIF(2, merged).spec.surrogate is Surrogate.triangle


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(reset="hardd"), "neuron.reset"),
        (dict(tau_decay=1.5), "neuron.tau_decay"),
        (dict(v_threshold=0.0), "neuron.v_threshold"),
        (dict(learnable_decay=True, leak=False), "neuron.learnable_decay"),
        (dict(learnable_decay=True, leak="complete"), "neuron.learnable_decay"),
        (dict(learnable_decay=True, tau_decay=0.0), "neuron.tau_decay"),
        (dict(leak="sometimes"), "neuron.leak"),
        (dict(leak=1), "neuron.leak"),
        (dict(recurrence="dense"), "neuron.recurrence"),
        (dict(surogate="atan"), "unknown key"),
    ],
)
def test_invalid_config_raises_one_line_naming_the_key(bad, key):
    with pytest.raises(NeuronConfigError, match=key) as info:
        as_neuron_config(bad)
    assert "\n" not in str(info.value)


def test_dispatch_uses_first_accepting_registered_impl_and_reports_it(monkeypatch):
    monkeypatch.setattr(dispatch, "_NEURON_IMPLS", [])
    calls = []

    def fake(x, decay, v_threshold, recurrent_weight, state, spec, *, return_state=True):
        calls.append(spec)
        return torch.full_like(x, 7.0), LIFState(x[0].float(), x[0].float())

    register_neuron_impl("fake_fp64", lambda x, spec: x.dtype == torch.float64, fake)
    spec = LIFSpec.from_config(NeuronConfig())
    x64, x32 = torch.rand(2, 1, 3, dtype=torch.float64), torch.rand(2, 1, 3)
    assert neuron_impls() == ["fake_fp64", "reference"]
    assert neuron_impl_for(x64, spec) == "fake_fp64"
    assert neuron_impl_for(x32, spec) == "reference"
    assert (lif_multistep(x64) == 7).all()
    assert (LIF(3)(x64) == 7).all()
    assert len(calls) == 2
    assert lif_multistep(x64, impl="reference").max() <= 1  # forced reference
    with pytest.raises(ValueError, match="does not accept"):
        lif_multistep(x32, impl="fake_fp64")
    with pytest.raises(ValueError, match="unknown neuron implementation"):
        lif_multistep(x32, impl="triton")
    with pytest.raises(ValueError, match="already registered"):
        register_neuron_impl("fake_fp64", lambda x, spec: True, fake)


def test_dispatch_says_once_which_variant_a_registered_impl_leaves_to_the_reference(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_NEURON_IMPLS", [])
    monkeypatch.setattr(dispatch, "_NOTED", set())

    def fake(x, decay, v_threshold, recurrent_weight, state, spec, *, return_state=True):
        raise AssertionError("the fake kernel must not run")

    register_neuron_impl("fake", lambda x, spec: spec.recurrence is Recurrence.none, fake,
                         lambda x, spec: f"recurrence={spec.recurrence.value} runs the reference loop"
                         if spec.recurrence is not Recurrence.none else None)
    lif = LIF(3, dict(recurrence="full"))
    with caplog.at_level("WARNING", logger="models.dispatch"):
        for _ in range(3):
            lif(torch.rand(2, 1, 3))
    assert neuron_impl_for(torch.rand(2, 1, 3), lif.spec) == "reference"
    assert [r.getMessage() for r in caplog.records] == ["neuron dispatch: recurrence=full runs the reference loop"]


def test_reference_under_torch_compile_matches_eager():
    torch.manual_seed(0)
    lif = LIF(4, dict(recurrence="lateral", learnable_threshold=True, reset="soft", surrogate="sigmoid", surrogate_width=4.0))
    with torch.no_grad():
        lif.recurrent_weight.copy_(torch.randn(4, 4) * 0.2)
    x = torch.rand(3, 2, 4, 3, 3, requires_grad=True)
    compiled = torch.compile(lif, fullgraph=True)
    out_c = compiled(x)
    grads_c = torch.autograd.grad((out_c * torch.arange(3.0).view(3, 1, 1, 1, 1)).sum(), [x, *lif.parameters()])
    out_e = lif(x)
    grads_e = torch.autograd.grad((out_e * torch.arange(3.0).view(3, 1, 1, 1, 1)).sum(), [x, *lif.parameters()])
    assert torch.equal(out_c, out_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)
