"""The fused Triton LIF kernels (``models.kernels.lif_triton``) against the PyTorch reference.

Every check runs the same inputs through ``lif_multistep(..., impl="triton")`` and
``impl="reference"`` and compares: spikes and final state identical (the kernel does the
reference's fp32 operations in the same order, without fused multiply-adds), gradients of x, the
per-channel decay, threshold and recurrent weight and the initial state within 1e-5 relative in
fp32. "Relative" is ``max |kernel - reference| / max |reference|`` over the tensor. bf16/fp16
inputs: spikes identical, ``grad_x`` (stored in the input dtype) within one unit in the last
place of the largest element (2^-7 bf16, 2^-10 fp16), the fp32 parameter gradients within 1e-5.

CPU (always): the kernels run under Triton's interpreter. ``TRITON_INTERPRET=1`` must be set
before the kernels are decorated, and this pytest process has already imported them through
``import models.zoo``, so one subprocess (this file run as a script, with the variable set) makes
every interpreted measurement and prints them as JSON; the tests assert on them. The cases cover
the full product of leak x reset x recurrence (none, self) x surrogate x detach_reset with
learnable per-channel decay and threshold, plus scalar parameters, state in and out, sequences
longer than one backward chunk, channels-last / [T, B, C] / [T, B] / non-time-major inputs,
bf16 and fp16, autocast, torch.compile (aot_eager) and ``torch.library.opcheck``.

GPU (skipped without CUDA): the full product in fp32, bf16 and fp16 on larger tensors, long
sequences, channels-last, autocast and torch.compile with Inductor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import pytest
import torch

from models.neurons import (
    LIF,
    LIFSpec,
    Leak,
    LIFState,
    NeuronConfig,
    Recurrence,
    Surrogate,
    lif_multistep,
    neuron_impl_for,
    neuron_impls,
)

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

REPO = Path(__file__).resolve().parents[2]
FP32_TOL = 1e-5
GRAD_X_TOL = {"float32": FP32_TOL, "bfloat16": 2.0**-7, "float16": 2.0**-10}
SURROGATE_WIDTH = {"rectangular": 1.0, "sigmoid": 4.0, "atan": 2.0, "triangle": 1.0}

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")


@dataclass(frozen=True)
class Case:
    """One comparison of the kernel with the reference.

    Attributes:
        neuron: ``NeuronConfig`` fields.
        shape: input ``[T, B, ...]``.
        dtype: input dtype name.
        layout: ``contiguous``, ``channels_last`` (5-D: each step NHWC in memory) or ``batch_major``
            (a ``[B, T, ...]`` tensor transposed: time is not the outermost axis).
        per_channel: learnable per-channel threshold, and decay when the neuron leaks.
        state: an initial state in, and the final state in the loss.
    """

    neuron: dict = field(default_factory=dict)
    shape: tuple = (4, 3, 8, 4, 4)
    dtype: str = "float32"
    layout: str = "contiguous"
    per_channel: bool = True
    state: bool = False

    @property
    def id(self) -> str:
        n = self.neuron
        parts = [
            {True: "leak", False: "if"}.get(n.get("leak", True), f"leak_{n.get('leak')}"),
            n.get("reset", "hard") + (f"{n['v_reset']}" if n.get("v_reset") else ""),
            "rec-" + n.get("recurrence", "none"),
            n.get("surrogate", "rectangular"),
            "detach" if n.get("detach_reset") else "nodetach",
            "x".join(map(str, self.shape)),
            self.dtype,
            self.layout,
            "perchannel" if self.per_channel else "scalar",
        ]
        if self.state:
            parts.append("state")
        return "-".join(parts)


def _neuron(leak=True, reset="hard", recurrence="none", surrogate="rectangular", detach=False, **extra) -> dict:
    return dict(leak=leak, reset=reset, recurrence=recurrence, surrogate=surrogate,
                surrogate_width=SURROGATE_WIDTH[surrogate], detach_reset=detach, **extra)


def product_cases(**case_fields) -> list[Case]:
    """Every leak x reset x recurrence (none, self) x surrogate x detach_reset combination."""
    return [
        Case(neuron=_neuron(leak, reset, rec, sur, detach), **case_fields)
        for leak, reset, rec, sur, detach in product(
            (True, False), ("hard", "soft", "none"), ("none", "self"),
            tuple(s.value for s in Surrogate), (False, True),
        )
    ]


def cpu_cases() -> list[Case]:
    cases = product_cases()
    # Scalar decay and threshold, and hard reset to a nonzero v_reset.
    cases += [Case(neuron=_neuron(reset=r, surrogate=s), per_channel=False)
              for r in ("hard", "soft", "none") for s in ("rectangular", "sigmoid")]
    cases += [Case(neuron=_neuron(v_reset=-0.125, recurrence=rec, detach=d)) for rec in ("none", "self") for d in (False, True)]
    # Complete leak (decay 0: the membrane is the current input), the paper's third level.
    cases += [Case(neuron=_neuron(leak="complete", reset=r, recurrence=rec)) for r in ("hard", "none") for rec in ("none", "self")]
    # State in and out, with gradients through both.
    cases += [Case(neuron=_neuron(reset=r, recurrence=rec, surrogate="atan"), state=True)
              for r in ("hard", "soft", "none") for rec in ("none", "self")]
    # Longer than one backward chunk: 37 steps replay as 3 chunks of 13, the last one short;
    # 17 as 9 + 8. And a single step.
    cases += [Case(neuron=_neuron(reset=r, recurrence=rec, surrogate="triangle"), shape=(37, 2, 4, 3, 3), state=rec == "self")
              for r in ("hard", "soft", "none") for rec in ("none", "self")]
    cases += [Case(neuron=_neuron(recurrence="self", detach=True), shape=(17, 2, 4, 3, 3)),
              Case(neuron=_neuron(reset="soft", surrogate="sigmoid"), shape=(1, 4, 8, 5, 5), state=True)]
    # Layouts and ranks.
    cases += [
        Case(neuron=_neuron(recurrence="self", surrogate="sigmoid"), layout="channels_last"),
        Case(neuron=_neuron(reset="soft"), shape=(20, 3, 8, 4, 4), layout="channels_last", state=True),
        Case(neuron=_neuron(reset="soft", recurrence="self"), layout="batch_major"),
        Case(neuron=_neuron(recurrence="self"), shape=(5, 6, 40)),  # linear layer [T, B, C]
        Case(neuron=_neuron(reset="soft"), shape=(5, 200), per_channel=False),  # [T, B]
        Case(neuron=_neuron(reset="soft"), shape=(4, 2, 3, 7, 7)),  # 49 positions per channel
    ]
    cases += [Case(neuron=_neuron(reset="soft", recurrence="self", surrogate="atan"), dtype=dt, layout=lay)
              for dt in ("bfloat16", "float16") for lay in ("contiguous", "channels_last")]
    return cases


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, x.shape[:2])
    if layout == "batch_major":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x.contiguous()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def measure(case: Case, device: str) -> dict:
    """Run the case through both implementations; spikes/state equality, the relative error of
    every gradient and the reference gradient's size (so a comparison is never vacuous)."""
    gen = torch.Generator().manual_seed(0)
    cfg = NeuronConfig(**case.neuron)
    dtype = getattr(torch, case.dtype)
    shape = case.shape
    channels = shape[2] if len(shape) > 2 else None

    def rand(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=gen) * scale + shift).to(device)

    x = _layout(rand(*shape, scale=0.6, shift=0.3).to(dtype), case.layout)
    inputs = {"x": x}
    if case.per_channel and channels is not None:
        if cfg.leak is Leak.normal:
            inputs["decay"] = (torch.rand(channels, generator=gen) * 0.6 + 0.2).to(device)
        inputs["v_threshold"] = (torch.rand(channels, generator=gen) * 0.4 + 0.3).to(device)
    if cfg.recurrence is Recurrence.self:
        inputs["recurrent_weight"] = rand(channels, scale=0.4)
    if case.state:
        inputs["v"] = rand(*shape[1:], scale=0.3)
        if cfg.recurrence is Recurrence.self:  # without recurrence the initial spike is unused
            inputs["spike"] = (torch.rand(*shape[1:], generator=gen) > 0.5).float().to(device)
    grad_spikes = rand(*shape).to(dtype)
    grad_v, grad_o = rand(*shape[1:]), rand(*shape[1:])

    out = {}
    for impl in ("triton", "reference"):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        leaves["x"] = _layout(inputs["x"].detach().clone(), case.layout).requires_grad_()
        state = None
        if case.state:
            state = LIFState(leaves["v"], leaves.get("spike", torch.zeros_like(leaves["v"])))
        spikes, final = lif_multistep(
            leaves["x"], cfg, decay=leaves.get("decay"), v_threshold=leaves.get("v_threshold"),
            recurrent_weight=leaves.get("recurrent_weight"), state=state, return_state=True, impl=impl,
        )
        loss = (spikes.float() * grad_spikes.float()).sum()
        if case.state:
            loss = loss + (final.v * grad_v).sum() + (final.spike * grad_o).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        out[impl] = (spikes, final, dict(zip(leaves, grads)), leaves["x"])

    (s_k, st_k, g_k, x_k), (s_r, st_r, g_r, _) = out["triton"], out["reference"]
    return {
        "spikes_equal": torch.equal(s_k, s_r),
        "state_equal": torch.equal(st_k.v, st_r.v) and torch.equal(st_k.spike, st_r.spike),
        "spike_dtype": str(s_k.dtype).removeprefix("torch."),
        "strides_kept": case.layout == "batch_major" or (s_k.stride() == x_k.stride() and g_k["x"].stride() == x_k.stride()),
        "firing_rate": s_r.float().mean().item(),
        "grad_rel": {k: _rel(g_k[k], g_r[k]) for k in g_r},
        "grad_max": {k: g_r[k].abs().max().item() for k in g_r},
    }


def check_measurement(case: Case, m: dict) -> list[str]:
    """What is wrong with a measurement, as readable lines (empty when it passes)."""
    problems = []
    if not m["spikes_equal"]:
        problems.append("spikes differ from the reference")
    if not m["state_equal"]:
        problems.append("final state differs from the reference")
    if m["spike_dtype"] != case.dtype:
        problems.append(f"spikes are {m['spike_dtype']}, input {case.dtype}")
    if not m["strides_kept"]:
        problems.append("spikes or grad_x do not keep the input's strides")
    if not 0.05 < m["firing_rate"] < 0.95:
        problems.append(f"firing rate {m['firing_rate']:.3f}: the case does not exercise both branches")
    for name, err in m["grad_rel"].items():
        tol = GRAD_X_TOL[case.dtype] if name == "x" else FP32_TOL
        if err > tol:
            problems.append(f"grad {name}: relative error {err:.2e} > {tol:.0e}")
        if m["grad_max"][name] == 0:
            problems.append(f"grad {name} is zero in the reference: vacuous comparison")
    return problems


# ---------------------------------------------------------------------------------------------
# Interpreted (CPU) checks, made in a subprocess
# ---------------------------------------------------------------------------------------------


def _interpreted_extras() -> dict:
    """Dispatch, return_state, torch.compile, autocast and opcheck under the interpreter."""
    from models.kernels import lif_triton as kernel

    res = {}
    spec = LIFSpec.from_config(NeuronConfig())
    res["dispatch_cpu"] = neuron_impl_for(torch.rand(2, 2, 3), spec)
    res["dispatch_lateral"] = neuron_impl_for(torch.rand(2, 2, 3), LIFSpec.from_config(NeuronConfig(recurrence="lateral")))
    full = LIFSpec.from_config(NeuronConfig(recurrence="full"))
    res["dispatch_full"] = neuron_impl_for(torch.rand(2, 2, 3), full)
    res["declines_full"] = kernel.declines(torch.rand(2, 2, 3), full)
    res["declines_self"] = kernel.declines(torch.rand(2, 2, 3), LIFSpec.from_config(NeuronConfig(recurrence="self")))
    res["dispatch_fp64"] = neuron_impl_for(torch.rand(2, 2, 3, dtype=torch.float64), spec)

    x = torch.rand(4, 2, 3, 5)
    spikes, state = kernel.lif_triton(x, 0.25, 0.5, None, None, spec, return_state=False)
    res["no_state"] = state is None and torch.equal(spikes, lif_multistep(x, impl="reference"))

    torch.manual_seed(0)
    lif = LIF(4, dict(recurrence="self", learnable_threshold=True, learnable_decay=True, reset="soft",
                      surrogate="sigmoid", surrogate_width=4.0))
    with torch.no_grad():
        lif.recurrent_weight.copy_(torch.randn(4) * 0.3)
    x = torch.rand(3, 2, 4, 3, 3, requires_grad=True)
    weights = torch.arange(1.0, 4.0).view(3, 1, 1, 1, 1)
    compiled = torch.compile(lif, backend="aot_eager", fullgraph=True)
    out_c = compiled(x)
    grads_c = torch.autograd.grad((out_c * weights).sum(), [x, *lif.parameters()])
    out_r = lif_multistep(x, lif.neuron, decay=lif.decay(), v_threshold=lif.threshold(),
                          recurrent_weight=lif.recurrent_weight, impl="reference")
    grads_r = torch.autograd.grad((out_r * weights).sum(), [x, *lif.parameters()])
    res["compile_spikes_equal"] = torch.equal(out_c, out_r)
    res["compile_grad_rel"] = max(_rel(a, b) for a, b in zip(grads_c, grads_r))

    # One channels-last step broadcast over T (direct encoding's stem output): the spikes keep
    # the step's memory order, and values and gradients match the reference.
    step = torch.randn(2, 6, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    outs = {}
    for impl in ("triton", "reference"):
        s = lif_multistep(step.unsqueeze(0).expand(4, *step.shape), NeuronConfig(), impl=impl)
        (g,) = torch.autograd.grad((s * torch.arange(1.0, 5.0).view(4, 1, 1, 1, 1)).sum(), [step])
        outs[impl] = (s, g)
    res["broadcast_step_channels_last"] = outs["triton"][0][0].is_contiguous(memory_format=torch.channels_last)
    res["broadcast_spikes_equal"] = torch.equal(outs["triton"][0], outs["reference"][0])
    res["broadcast_grad_rel"] = _rel(outs["triton"][1], outs["reference"][1])

    linear = torch.nn.Linear(16, 8)
    xin = torch.randn(5, 4, 16)
    autocast = {}
    for impl in ("triton", "reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            current = linear(xin)  # bf16 under autocast
            current.retain_grad()
            spikes = lif_multistep(current, NeuronConfig(reset="soft", surrogate="atan", surrogate_width=2.0), impl=impl)
        spikes.float().mul(torch.arange(5.0).view(5, 1, 1)).sum().backward()
        autocast[impl] = (spikes, current.grad)
    res["autocast_dtype"] = str(autocast["triton"][0].dtype).removeprefix("torch.")
    res["autocast_spikes_equal"] = torch.equal(autocast["triton"][0], autocast["reference"][0])
    res["autocast_grad_rel"] = _rel(autocast["triton"][1], autocast["reference"][1])

    op = torch.ops.spikescale.lif_forward.default
    opcheck_args = [
        (torch.randn(4, 2, 3, 5), None, None, None, None, None, 0.25, 0.5, "hard", 0.0, False, "rectangular", 1.0,
         False, False),
        (torch.randn(20, 2, 3, 5, requires_grad=True), torch.rand(3, requires_grad=True),
         torch.rand(3).add(0.2).requires_grad_(), torch.randn(3, requires_grad=True),
         torch.randn(2, 3, 5, requires_grad=True), torch.rand(2, 3, 5, requires_grad=True),
         0.0, 0.0, "soft", 0.0, True, "sigmoid", 4.0, True, True),
        (torch.randn(4, 2, 3, 5, requires_grad=True), None, torch.rand(3).add(0.2).requires_grad_(), None, None,
         None, 0.25, 0.0, "hard", -0.125, False, "triangle", 1.0, False, True),
    ]
    res["opcheck"] = [torch.library.opcheck(op, args) for args in opcheck_args]
    return res


def _run_interpreted() -> dict:
    from models.kernels import lif_triton as kernel

    assert kernel.INTERPRET, "run with TRITON_INTERPRET=1"
    results = {"cases": {}}
    for case in cpu_cases():
        try:
            results["cases"][case.id] = measure(case, "cpu")
        except Exception as err:  # reported per case by the test that reads it
            results["cases"][case.id] = {"error": f"{type(err).__name__}: {err}"}
    try:
        results["extras"] = _interpreted_extras()
    except Exception as err:  # fails the tests that read the extras, not the per-case ones
        results["extras"] = {"error": f"{type(err).__name__}: {err}"}
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"interpreted run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("case", cpu_cases(), ids=lambda c: c.id)
def test_interpreted_kernel_matches_reference(interpreted, case):
    m = interpreted["cases"][case.id]
    assert "error" not in m, m.get("error")
    assert check_measurement(case, m) == []


def _extras(interpreted: dict) -> dict:
    extras = interpreted["extras"]
    assert "error" not in extras, extras.get("error")
    return extras


@pytest.mark.slow
@needs_triton
def test_interpreted_kernel_is_dispatched_for_supported_specs_only(interpreted):
    extras = _extras(interpreted)
    assert extras["dispatch_cpu"] == "triton"  # CPU tensors only under the interpreter
    assert extras["dispatch_lateral"] == "reference"
    assert extras["dispatch_full"] == "reference"
    assert extras["declines_full"] == ("recurrence=full runs the PyTorch reference loop on cpu "
                                       "(the fused Triton kernel covers recurrence none and self)")
    assert extras["declines_self"] is None
    assert extras["dispatch_fp64"] == "reference"
    assert extras["no_state"]


@pytest.mark.slow
@needs_triton
def test_interpreted_kernel_under_torch_compile_matches_eager_reference(interpreted):
    extras = _extras(interpreted)
    assert extras["compile_spikes_equal"]
    assert extras["compile_grad_rel"] <= FP32_TOL


@pytest.mark.slow
@needs_triton
def test_interpreted_kernel_keeps_the_step_layout_of_an_input_broadcast_over_time(interpreted):
    extras = _extras(interpreted)
    assert extras["broadcast_step_channels_last"]
    assert extras["broadcast_spikes_equal"]
    assert extras["broadcast_grad_rel"] <= FP32_TOL


@pytest.mark.slow
@needs_triton
def test_interpreted_kernel_under_autocast_keeps_bf16_and_matches_reference(interpreted):
    extras = _extras(interpreted)
    assert extras["autocast_dtype"] == "bfloat16"
    assert extras["autocast_spikes_equal"]
    assert extras["autocast_grad_rel"] <= GRAD_X_TOL["bfloat16"]


@pytest.mark.slow
@needs_triton
def test_custom_op_passes_opcheck(interpreted):
    for report in _extras(interpreted)["opcheck"]:
        assert set(report.values()) == {"SUCCESS"}, report


# ---------------------------------------------------------------------------------------------
# In-process (no interpreter)
# ---------------------------------------------------------------------------------------------


def test_interpreted_cases_have_distinct_ids():
    ids = [case.id for case in cpu_cases()]
    assert len(set(ids)) == len(ids)


@needs_triton
def test_triton_impl_is_registered_and_cpu_tensors_keep_the_reference():
    spec = LIFSpec.from_config(NeuronConfig())
    assert neuron_impls()[0] == "triton"
    x = torch.rand(3, 2, 4)
    assert neuron_impl_for(x, spec) == "reference"
    with pytest.raises(ValueError, match="does not accept"):
        lif_multistep(x, impl="triton")


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_kernel_matches_reference_for_every_combination(dtype):
    failures = []
    for per_channel, shape in ((True, (4, 8, 16, 12, 12)), (False, (6, 8, 16, 12, 12))):
        for case in product_cases(shape=shape, dtype=dtype, per_channel=per_channel):
            problems = check_measurement(case, measure(case, "cuda"))
            failures += [f"{case.id}: {p}" for p in problems]
    assert failures == []


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    Case(neuron=_neuron(reset="soft", recurrence="self", surrogate="sigmoid"), shape=(32, 4, 32, 16, 16), state=True),
    Case(neuron=_neuron(surrogate="atan"), shape=(37, 4, 32, 8, 8), layout="channels_last", dtype="bfloat16"),
    Case(neuron=_neuron(), shape=(6, 32, 64, 28, 28), layout="channels_last", dtype="bfloat16"),
    Case(neuron=_neuron(), shape=(6, 32, 64, 28, 28), dtype="bfloat16", per_channel=False),
    Case(neuron=_neuron(reset="soft", recurrence="self"), shape=(4, 16, 96, 7, 7), layout="channels_last"),
    Case(neuron=_neuron(reset="none", detach=True), shape=(4, 64, 256), dtype="float16"),
    Case(neuron=_neuron(reset="soft"), shape=(6, 4, 16, 8, 8), layout="batch_major", state=True),
], ids=lambda c: c.id)
def test_gpu_kernel_matches_reference_on_large_and_long_inputs(case):
    assert check_measurement(case, measure(case, "cuda")) == []


@needs_cuda
@pytest.mark.gpu
def test_gpu_dispatch_picks_the_kernel_for_cuda_tensors():
    spec = LIFSpec.from_config(NeuronConfig(recurrence="self"))
    assert neuron_impl_for(torch.rand(2, 2, 3, device="cuda"), spec) == "triton"
    assert neuron_impl_for(torch.rand(2, 2, 3, device="cuda", dtype=torch.float64), spec) == "reference"
    for rec in ("lateral", "full"):
        spec = LIFSpec.from_config(NeuronConfig(recurrence=rec))
        assert neuron_impl_for(torch.rand(2, 2, 3, device="cuda"), spec) == "reference"


@needs_cuda
@pytest.mark.gpu
def test_gpu_kernel_under_autocast_with_channels_last_conv_matches_reference():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4 * 8, 16, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    cfg = NeuronConfig(reset="soft", surrogate="sigmoid", surrogate_width=4.0)
    results = {}
    for impl in ("triton", "reference"):
        conv.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            current = conv(x).unflatten(0, (4, 8))
            spikes = lif_multistep(current, cfg, impl=impl)
        assert spikes.dtype == torch.bfloat16
        spikes.float().mul(torch.arange(1.0, 5.0, device="cuda").view(4, 1, 1, 1, 1)).sum().backward()
        results[impl] = (spikes, conv.weight.grad.clone())
    assert torch.equal(results["triton"][0], results["reference"][0])
    assert _rel(results["triton"][1], results["reference"][1]) <= 1e-2  # conv backward in bf16


@needs_cuda
@pytest.mark.gpu
def test_gpu_kernel_under_torch_compile_matches_eager_reference():
    torch.manual_seed(0)
    lif = LIF(16, dict(recurrence="self", learnable_threshold=True, learnable_decay=True,
                       reset="soft", surrogate="atan", surrogate_width=2.0)).cuda()
    with torch.no_grad():
        lif.recurrent_weight.copy_(torch.randn(16) * 0.3)
    x = (torch.randn(6, 8, 16, 10, 10, device="cuda") * 0.6 + 0.3).requires_grad_()
    weights = torch.arange(1.0, 7.0, device="cuda").view(6, 1, 1, 1, 1)
    compiled = torch.compile(lif, fullgraph=True)
    out_c = compiled(x)
    grads_c = torch.autograd.grad((out_c * weights).sum(), [x, *lif.parameters()])
    out_r = lif_multistep(x, lif.neuron, decay=lif.decay(), v_threshold=lif.threshold(),
                          recurrent_weight=lif.recurrent_weight, impl="reference")
    grads_r = torch.autograd.grad((out_r * weights).sum(), [x, *lif.parameters()])
    assert torch.equal(out_c, out_r)
    for gc, gr in zip(grads_c, grads_r):
        assert _rel(gc, gr) <= FP32_TOL


if __name__ == "__main__":  # the interpreted run of the ``interpreted`` fixture
    print(json.dumps(_run_interpreted()))
