"""Surrogate gradients: closed-form values, and the LIF op's backward against autograd of an
independently unrolled reference in float64.

The unrolled reference builds each spike as ``H(z) + S(z) - S(z).detach()`` with ``S`` the smooth
step whose derivative is the surrogate (written here in closed form), so its forward is the
Heaviside and autograd differentiates it with ``S'`` -- no custom backward involved.
"""

import math

import pytest
import torch

from models.neurons import Leak, NeuronConfig, Recurrence, Reset, lif_multistep
from models.surrogates import Surrogate, spike, surrogate_grad


def _smooth_step(z: torch.Tensor, kind: Surrogate, w: float) -> torch.Tensor:
    """Closed-form primitive S with S(-inf) = 0, S(inf) = 1, S' = surrogate."""
    if kind is Surrogate.rectangular:
        return (z / w + 0.5).clamp(0, 1)
    if kind is Surrogate.sigmoid:
        return torch.sigmoid(w * z)
    if kind is Surrogate.atan:
        return torch.atan(math.pi / 2 * w * z) / math.pi + 0.5
    if kind is Surrogate.triangle:
        left = (z + w).clamp(min=0) ** 2 / (2 * w * w)
        right = 1 - (w - z).clamp(min=0) ** 2 / (2 * w * w)
        return torch.where(z < 0, left, right)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, width, z, expected",
    [
        (Surrogate.rectangular, 1.0, [0.0, 0.3, -0.49, 0.6], [1.0, 1.0, 1.0, 0.0]),
        (Surrogate.rectangular, 0.5, [0.2, 0.3], [2.0, 0.0]),
        (Surrogate.sigmoid, 4.0, [0.0], [1.0]),  # 4 * 1/2 * 1/2
        (Surrogate.atan, 2.0, [0.0, 1 / math.pi], [1.0, 0.5]),  # 1 / (1 + (pi/2 * 2/pi)^2) = 1/2
        (Surrogate.triangle, 1.0, [0.0, 0.5, -0.25, 1.5], [1.0, 0.5, 0.75, 0.0]),
        (Surrogate.triangle, 2.0, [1.0], [0.25]),  # (2 - 1) / 4
    ],
)
def test_surrogate_closed_form_values(kind, width, z, expected):
    got = surrogate_grad(torch.tensor(z, dtype=torch.float64), kind, width)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("kind", list(Surrogate))
@pytest.mark.parametrize("width", [0.5, 1.0, 3.0])
def test_surrogate_is_derivative_of_a_unit_step(kind, width):
    z = torch.linspace(-4, 4, 4001, dtype=torch.float64, requires_grad=True)
    (autograd,) = torch.autograd.grad(_smooth_step(z, kind, width).sum(), z)
    inside = (z.detach().abs() - width / 2).abs() > 1e-3  # skip the rectangle's jump points
    torch.testing.assert_close(surrogate_grad(z.detach(), kind, width)[inside], autograd[inside])
    # area under the surrogate: 1, up to the tails of sigmoid/atan beyond |z| = 400
    z_wide = torch.linspace(-400, 400, 800_001, dtype=torch.float64)
    area = torch.trapezoid(surrogate_grad(z_wide, kind, width), z_wide).item()
    assert area == pytest.approx(1.0, abs=0.01)


def test_spike_is_heaviside_with_surrogate_backward():
    z = torch.tensor([-0.3, 0.0, 0.2, 0.7], requires_grad=True)
    out = spike(z, Surrogate.rectangular, 1.0)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0]
    (g,) = torch.autograd.grad(out.sum(), z)
    assert g.tolist() == [1.0, 1.0, 1.0, 0.0]


def _unrolled_reference(x, cfg: NeuronConfig, decay, v_threshold, w):
    """STBP-tdBN's iterative LIF written out directly, with the straight-through spike."""
    kind, width = cfg.surrogate, cfg.surrogate_width
    v = torch.zeros_like(x[0])
    o = torch.zeros_like(x[0])
    shape = (-1,) + (1,) * (x.ndim - 3)
    d, th = decay.view(shape), v_threshold.view(shape)
    out = []
    for t in range(x.shape[0]):
        rec = 0.0
        if cfg.recurrence is Recurrence.self:
            rec = w.view(shape) * o
        elif cfg.recurrence is Recurrence.lateral:
            rec = torch.einsum("ij,bj...->bi...", w, o)
        elif cfg.recurrence is Recurrence.full:  # 3x3, padding 1: a sum of shifted 1x1 maps
            padded = torch.nn.functional.pad(o, (1, 1, 1, 1))
            height, width_ = o.shape[-2:]
            rec = sum(torch.einsum("ij,bjhw->bihw", w[:, :, dy, dx], padded[..., dy:dy + height, dx:dx + width_])
                      for dy in range(3) for dx in range(3))
        h = d * v + x[t] + rec
        z = h - th
        smooth = _smooth_step(z, kind, width)
        o = (z > 0).to(z.dtype) + (smooth - smooth.detach())  # exactly H(z) forward
        r = o.detach() if cfg.detach_reset else o
        if cfg.reset is Reset.hard:
            v = h * (1 - r) + cfg.v_reset * r
        elif cfg.reset is Reset.soft:
            v = h - th * r
        else:
            v = h
        out.append(o)
    return torch.stack(out)


VARIANTS = [
    dict(),
    dict(detach_reset=True),
    dict(reset="soft", recurrence="self"),
    dict(reset="none", leak=False, recurrence="lateral"),
    dict(leak="complete", recurrence="full"),
    dict(reset="hard", v_reset=-0.2, recurrence="lateral", detach_reset=True),
]


@pytest.mark.parametrize("surrogate", list(Surrogate))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_lif_gradients_equal_autograd_of_unrolled_reference_in_float64(surrogate, variant):
    torch.manual_seed(0)
    cfg = NeuronConfig(surrogate=surrogate, surrogate_width=1.5 if surrogate is Surrogate.rectangular else 2.0, **variant)
    channels = 3
    x = (torch.rand(6, 2, channels, 2, 2, dtype=torch.float64) * 1.2).requires_grad_()
    leaky = cfg.leak is Leak.normal
    decay = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64, requires_grad=leaky)
    if not leaky:
        decay = torch.full((channels,), cfg.decay, dtype=torch.float64)
    v_threshold = torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64, requires_grad=True)
    w = None
    if cfg.recurrence is Recurrence.self:
        w = (torch.rand(channels, dtype=torch.float64) * 0.6 - 0.3).requires_grad_()
    elif cfg.recurrence is Recurrence.lateral:
        w = (torch.rand(channels, channels, dtype=torch.float64) * 0.6 - 0.3).requires_grad_()
    elif cfg.recurrence is Recurrence.full:  # on feature maps: a 3x3 convolution
        w = (torch.rand(channels, channels, 3, 3, dtype=torch.float64) * 0.6 - 0.3).requires_grad_()
    inputs = [t for t in (x, decay, v_threshold, w) if t is not None and t.requires_grad]
    upstream = torch.randn(6, 2, channels, 2, 2, dtype=torch.float64)

    got = lif_multistep(
        x, cfg, decay=decay if leaky else None, v_threshold=v_threshold, recurrent_weight=w
    )
    want = _unrolled_reference(x, cfg, decay, v_threshold, w)
    assert torch.equal(got, want.detach())
    assert 0 < got.mean() < 1  # some spikes, some silence: the gradients go through both
    grads_got = torch.autograd.grad((got * upstream).sum(), inputs)
    grads_want = torch.autograd.grad((want * upstream).sum(), inputs)
    for g, e in zip(grads_got, grads_want):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
        assert e.abs().sum() > 0
