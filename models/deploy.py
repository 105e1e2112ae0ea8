"""Inference deployment: tdBN folded into the weights, and the network as a NIR graph.

STBP-tdBN's point for neuromorphic hardware is that tdBN, a per-channel affine map in eval mode,
folds into the convolution (or linear layer) before it; what is left is weights, biases and
neurons. ``fold_model`` makes that network, ``to_nir`` writes it in the Neural Intermediate
Representation (``nir`` package, Pedersen et al. 2024), and ``simulate_nir`` runs a NIR graph with
the discrete-time semantics below, so an export can be checked against the model.

Our neuron is discrete in time (``models.neurons``): ``h[t] = d*v[t-1] + I[t]``,
``o[t] = H(h[t] - V_th)``, then the reset. NIR's neurons are ODEs; the export maps them so that
one forward-Euler step of the consumer's time step ``dt`` (seconds; the graph's metadata says
which) is exactly our step::

    NIR LIF   tau*dv/dt = (v_leak - v) + r*I          tau = dt/(1-d), r = 1/(1-d), v_leak = 0
      Euler   v[t] = v[t-1] + dt/tau*(v_leak - v[t-1] + r*I[t]) = d*v[t-1] + I[t]
    NIR IF    dv/dt = r*I                      (no leak, d = 1)   r = 1/dt: v[t] = v[t-1] + I[t]
    spike     z[t] = 1 if v[t] > v_threshold (strictly), after integrating step t
    reset     v[t] = v_reset where z[t] = 1                   (our hard reset, any v_reset)

``r*dt/tau = 1``: the input enters unscaled, which is also the form snnTorch's own NIR export
writes (``tau = dt/(1-beta)``, ``r = tau/dt``). The default ``dt = 1e-4`` s (``DEFAULT_NIR_DT``)
is the step snnTorch 1.0's ``import_from_nir`` hard-codes; Norse's ``from_nir`` takes it as
``dt=``. What each consumer then reproduces is measured in tests/train/test_nir_consumers.py.

Reset none is an LI (or, without leak, an I) integrator followed by a Threshold node. A graph is
evaluated once per time step, every node in topological order, with no delay on edges; a node's
input is the sum of its incoming edges (the residual add). Not expressible, so refused with
``NIRExportError``: soft reset (NIR neurons reset to a value, they do not subtract), recurrence
(a cycle needs a delay NIR leaves to the simulator), max pooling (the ImageNet stem), a learned
per-channel decay that reached exactly 1 beside ones below 1 (a node is LIF or IF), and the
families this module does not map yet (SEW-, MS-ResNet: blocks wired otherwise).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import models.zoo  # noqa: F401  (registers the networks load_folded rebuilds with timm)
from models.foreign import ForeignModel
from models.mlp import SpikingMLP, TdBN1d
from models.neurons import LIF, Recurrence, Reset
from models.resnet import BasicBlock, Bottleneck, SpikingResNet
from models.tdbn import TdBN, fold_tdbn_into_conv

if TYPE_CHECKING:  # nir is imported where it is used, so `import models.deploy` does not load h5py
    import nir

__all__ = [
    "DEFAULT_NIR_DT",
    "NIRExportError",
    "fold_tdbn_into_linear",
    "fold_model",
    "folded_checkpoint",
    "load_folded",
    "to_nir",
    "simulate_nir",
]

FOLDED_FORMAT = "spikescale-folded-v1"
DEFAULT_NIR_DT = 1e-4  # seconds: the step snnTorch 1.0's import_from_nir assumes (it has no dt argument)


class NIRExportError(ValueError):
    """The network has a setting NIR cannot express; the message names it (one line)."""


@torch.no_grad()
def fold_tdbn_into_linear(linear: nn.Linear, bn: TdBN | nn.BatchNorm1d) -> nn.Linear:
    """A linear layer equal to ``bn(linear(x))`` with ``bn`` in eval mode (running statistics).

    The linear analogue of ``fold_tdbn_into_conv``: ``W' = W * s / sigma`` per output feature and
    ``b' = (b - mu) * s / sigma + beta``, with ``s = alpha * V_th * lambda`` for tdBN
    (``TdBN1d``) and ``s = gamma`` (1 without affine) for ``nn.BatchNorm1d``;
    ``sigma = sqrt(running_var + eps)``. The inputs are not modified; the result has a bias and
    the same shape, dtype and device as ``linear``.
    """
    norm = bn.norm if isinstance(bn, TdBN) else bn
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("fold_tdbn_into_linear needs a norm that tracks running statistics")
    if linear.out_features != norm.num_features:
        raise ValueError(f"fold_tdbn_into_linear: linear has {linear.out_features} outputs, "
                         f"the norm has {norm.num_features} features")
    mean = norm.running_mean
    if isinstance(bn, TdBN):
        scale, beta = bn.scale(), bn.bias
    elif bn.affine:
        scale, beta = bn.weight, bn.bias
    else:
        scale, beta = torch.ones_like(mean), torch.zeros_like(mean)
    factor = scale / torch.sqrt(norm.running_var + norm.eps)
    bias = linear.bias if linear.bias is not None else torch.zeros_like(mean)
    dtype = linear.weight.dtype
    folded = nn.Linear(linear.in_features, linear.out_features, bias=True,
                       device=linear.weight.device, dtype=dtype)
    folded.weight.copy_(linear.weight * factor.view(-1, 1).to(dtype))
    folded.bias.copy_(((bias - mean) * factor + beta).to(dtype))
    return folded


def fold_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every norm folded into the layer it normalises.

    Our model families name a norm ``bn<k>`` after the layer whose output it (alone) reads:
    the sibling ``conv<k>`` (``TdBN``) or ``fc<k>`` (``TdBN1d``, ``nn.BatchNorm1d``). That layer
    becomes the folded one (``fold_tdbn_into_conv`` / ``fold_tdbn_into_linear``) and the norm an
    ``nn.Identity``, so the forward code, including direct encoding's stem run once and broadcast
    over T, is unchanged. In eval mode the copy's outputs equal the model's up to fp rounding
    (a neuron within rounding of its threshold may flip). ``model`` is not modified; the copy
    has ``requires_grad`` off.

    Raises:
        ValueError: a norm without such a sibling (a model family this rule does not fit), or a
            brought network (``models.foreign``), whose layers follow no such rule.
    """
    if any(isinstance(m, ForeignModel) for m in model.modules()):
        raise ValueError(f"fold_model: {getattr(model, 'name', type(model).__name__)} is a brought network "
                         "(models.foreign); folding pairs our networks' norms with their layers")
    folded = copy.deepcopy(model).eval()
    names = {m: n for n, m in folded.named_modules()}
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (TdBN, nn.BatchNorm1d)):
                continue
            partner, layer = _fold_partner(parent, name, child, names)
            if isinstance(layer, nn.Conv2d):
                setattr(parent, partner, fold_tdbn_into_conv(layer, child))
            else:
                setattr(parent, partner, fold_tdbn_into_linear(layer, child))
            setattr(parent, name, nn.Identity())
    return folded.requires_grad_(False)


def _fold_partner(parent: nn.Module, name: str, norm: nn.Module,
                  names: Mapping[nn.Module, str]) -> tuple[str, nn.Module]:
    where = f"{names[parent]}.{name}".lstrip(".")
    suffix = name[2:] if name.startswith("bn") else None
    wanted = nn.Linear if isinstance(norm, (TdBN1d, nn.BatchNorm1d)) else nn.Conv2d
    if suffix is not None:
        for partner in (f"conv{suffix}", f"fc{suffix}"):
            layer = getattr(parent, partner, None)
            if isinstance(layer, wanted):
                return partner, layer
    raise ValueError(f"fold_model: {where} ({type(norm).__name__}) has no sibling "
                     f"{wanted.__name__} named conv<k>/fc<k> after its name bn<k> to fold into")


def folded_checkpoint(folded: nn.Module, model_name: str, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What ``load_folded`` rebuilds a folded model from: the timm name and factory arguments of
    the unfolded model, the folded state dict and ``forward``'s output mode. Plain containers
    and tensors only, so it loads with ``torch.load(..., weights_only=True)``."""
    return {
        "format": FOLDED_FORMAT,
        "model_name": model_name,
        "model_kwargs": _plain(dict(model_kwargs)),
        "output": getattr(folded, "output", "mean"),
        "state_dict": {k: v.detach().cpu() for k, v in folded.state_dict().items()},
    }


def load_folded(source: str | Path | Mapping[str, Any]) -> nn.Module:
    """The folded inference model (eval mode, CPU) from a ``folded_checkpoint`` dict or file.

    Builds ``timm.create_model(model_name, **model_kwargs)``, folds it (for the structure) and
    loads the folded weights strictly.
    """
    if isinstance(source, Mapping):
        blob = source
    else:
        blob = torch.load(source, map_location="cpu", weights_only=True)
    if blob.get("format") != FOLDED_FORMAT:
        raise ValueError(f"not a folded SpikeScale model (format {blob.get('format')!r}, "
                         f"expected {FOLDED_FORMAT!r})")
    folded = fold_model(timm.create_model(blob["model_name"], **blob["model_kwargs"]))
    folded.load_state_dict(blob["state_dict"])
    if hasattr(folded, "set_output"):
        folded.set_output(blob["output"])
    return folded


def _plain(value: Any) -> Any:
    """Dataclasses and enums (e.g. a ``NeuronConfig``) as plain dicts and strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value


# --------------------------------------------------------------------------------------- NIR

def to_nir(model: nn.Module, input_shape: Sequence[int], dt: float = DEFAULT_NIR_DT) -> nir.NIRGraph:
    """The folded network as a NIR graph for a consumer stepping at ``dt`` seconds (semantics in
    the module docstring; ``tau`` is in seconds, one model step is one Euler step of ``dt``).

    Node names are the folded model's module names (``conv1``, ``layer1.0.lif2``, ``fc``, ...),
    plus ``input``, ``output``, ``avgpool``, ``flatten``. The output node carries the logits of
    each step; the graph's metadata says how the model reads them out (mean over T or per step)
    and how an input is presented.

    Args:
        model: ``fold_model(...)`` of a ``SpikingResNet`` (CIFAR stem) or ``SpikingMLP``.
        input_shape: one step of one sample, no batch: ``(C, H, W)`` for a ResNet, ``(F,)`` or
            ``(C, H, W)`` (flattened by a Flatten node) for an MLP.
        dt: the consumer's time step in seconds (> 0), written to the metadata as ``dt``.

    Raises:
        NIRExportError: a setting NIR cannot express, an input shape the model cannot take, or
            a ``dt`` that is not a positive finite number.
        ValueError: ``model`` still has norms (fold it first).
    """
    import nir

    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise NIRExportError(f"dt={dt!r}: the consumer's time step must be a positive number of seconds")
    # The family first: a network it does not map (SEW, MS, the transformers) is refused as such,
    # whatever norms fold_model left in it.
    if type(model) not in (SpikingResNet, SpikingMLP):  # subclasses (SEW, MS) wire blocks otherwise
        raise NIRExportError(f"{type(model).__name__} has no NIR mapping (models/deploy.py maps the tdBN "
                             "SpikingResNet and SpikingMLP)")
    leftover = [n for n, m in model.named_modules() if isinstance(m, (TdBN, nn.BatchNorm1d, nn.BatchNorm2d))]
    if leftover:
        raise ValueError(f"to_nir needs a folded model (fold_model); {leftover[0]} is still a norm")
    if isinstance(model, SpikingResNet) and model.maxpool is not None:
        raise NIRExportError("the ImageNet stem's max pooling has no NIR node (NIR pools by sum or "
                             "average only); export a model with the CIFAR stem (e.g. spiking_resnet19)")
    for name, lif in model.named_modules():
        if isinstance(lif, LIF):
            _check_neuron(name, lif)
    graph = _GraphBuilder(nir, _layer_shapes(model, tuple(int(s) for s in input_shape)), float(dt))
    if isinstance(model, SpikingResNet):
        graph.resnet(model)
        encoding = ("an image [C, H, W] is presented unchanged at each of T steps (direct encoding); "
                    "a sequence (e.g. DVS frames) one frame per step")
    else:
        graph.mlp(model)
        encoding = ("a static input is presented unchanged at each of T steps (direct encoding); "
                    "a sequence one element per step")
    metadata = {
        "producer": "spikescale models.deploy.to_nir",
        "model": type(model).__name__,
        "time_steps": int(model.T),
        "dt": float(dt),
        "neuron_discretisation": (
            f"forward Euler with dt = {float(dt)!r} s (one model step) gives the trained discrete neuron "
            "exactly: LIF tau = dt/(1-d) s, r = 1/(1-d), v_leak = 0 -> v[t] = d*v[t-1] + I[t]; "
            "IF r = 1/dt -> v[t] = v[t-1] + I[t]; spike if v[t] > v_threshold after integrating "
            "step t, then v[t] = v_reset"),
        "evaluation": ("every node once per time step in topological order, no delay on edges; a "
                       "node's input is the sum of its incoming edges; neuron state starts at 0"),
        "input_encoding": encoding,
        "readout": ("logits per step" if getattr(model, "output", "mean") == "per_step"
                    else "logits = mean of the output over the T steps"),
    }
    return nir.NIRGraph(nodes=graph.nodes, edges=graph.edges, metadata=metadata)


def _check_neuron(name: str, lif: LIF) -> None:
    cfg = lif.neuron
    if cfg.reset is Reset.soft:
        raise NIRExportError(f"neuron.reset=soft ({name}): NIR neurons reset to v_reset and cannot "
                             "subtract the threshold; export a run trained with reset hard or none")
    if cfg.recurrence is not Recurrence.none:
        raise NIRExportError(f"neuron.recurrence={cfg.recurrence.value} ({name}): a recurrent loop needs "
                             "a one-step delay whose timing NIR leaves to each simulator; export a run "
                             "trained with recurrence none")
    decay = lif.decay()
    if isinstance(decay, Tensor) and bool((decay == 1).any()) and not bool((decay == 1).all()):
        raise NIRExportError(f"neuron.learnable_decay ({name}): some channels learned decay 1 (IF) and "
                             "others less (LIF); one NIR node is either, not both")


def _layer_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of one step: a neuron layer's output and a conv layer's input, by name,
    from one step of a batch of one."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, LIF):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: shapes.__setitem__(name, tuple(out.shape[2:]))))
        elif isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:]))))
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, *input_shape, dtype=param.dtype, device=param.device))
    except (ValueError, RuntimeError) as e:
        raise NIRExportError(f"input shape {list(input_shape)} does not fit the model: "
                             f"{str(e).splitlines()[0]}") from None
    finally:
        for h in hooks:
            h.remove()
    shapes["input"] = input_shape
    return shapes


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class _GraphBuilder:
    """Collects NIR nodes (named after the model's modules) and edges."""

    def __init__(self, nir_module: Any, shapes: dict[str, tuple[int, ...]], dt: float):
        self.nir = nir_module
        self.shapes = shapes
        self.dt = dt
        self.nodes: dict[str, Any] = {"input": nir_module.Input(input_type=np.array(shapes["input"]))}
        self.edges: list[tuple[str, str]] = []

    def add(self, name: str, node: Any, *sources: str) -> str:
        self.nodes[name] = node
        self.edges += [(s, name) for s in sources]
        return name

    def conv(self, name: str, conv: nn.Conv2d, source: str) -> str:
        if conv.padding_mode != "zeros":
            raise NIRExportError(f"{name}: padding_mode={conv.padding_mode!r} has no NIR form (zeros only)")
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        node = self.nir.Conv2d(input_shape=self.shapes[name][1:], weight=_numpy(conv.weight),
                               stride=tuple(conv.stride), padding=padding,
                               dilation=tuple(conv.dilation), groups=conv.groups, bias=_numpy(bias))
        return self.add(name, node, source)

    def linear(self, name: str, linear: nn.Linear, source: str) -> str:
        if linear.bias is None:
            return self.add(name, self.nir.Linear(weight=_numpy(linear.weight)), source)
        return self.add(name, self.nir.Affine(weight=_numpy(linear.weight), bias=_numpy(linear.bias)), source)

    def neuron(self, name: str, lif: LIF, *sources: str) -> str:
        """Add the nodes of a neuron layer fed by ``sources``; returns the node its spikes leave."""
        shape = self.shapes[name]

        def per_neuron(value: Tensor | float, dtype: Any) -> np.ndarray:
            # Per-channel values (learnable decay/threshold) broadcast over the spatial positions.
            if isinstance(value, Tensor):
                array = _numpy(value).astype(dtype).reshape(-1, *([1] * (len(shape) - 1)))
                return np.broadcast_to(array, shape).copy()
            return np.full(shape, value, dtype=dtype)

        # What the model computes with: fp32 decay and threshold (a Python float is rounded to the
        # input's dtype); tau and r in fp64 so that 1 - dt/tau and r*dt/tau give that fp32 decay
        # and an input gain of 1 back.
        decay = per_neuron(lif.decay(), np.float32).astype(np.float64)
        threshold = per_neuron(lif.threshold(), np.float32)
        v_reset = np.full(shape, lif.neuron.v_reset, dtype=np.float32)
        leaky = not bool((decay == 1).all())
        tau = self.dt / (1.0 - decay) if leaky else None
        r = 1.0 / (1.0 - decay) if leaky else np.full(shape, 1.0 / self.dt)
        nir = self.nir
        if lif.neuron.reset is Reset.hard:
            if leaky:
                node = nir.LIF(tau=tau, r=r, v_leak=np.zeros(shape), v_threshold=threshold, v_reset=v_reset)
            else:
                node = nir.IF(r=r, v_threshold=threshold, v_reset=v_reset)
            return self.add(name, node, *sources)
        # Reset none: the membrane integrates without reset; spikes are its thresholded value.
        integrator = nir.LI(tau=tau, r=r, v_leak=np.zeros(shape)) if leaky else nir.I(r=r)
        self.add(name, integrator, *sources)
        return self.add(f"{name}.threshold", nir.Threshold(threshold=threshold), name)

    def resnet(self, model: SpikingResNet) -> None:
        s = self.neuron("lif1", model.lif1, self.conv("conv1", model.conv1, "input"))
        names = {m: n for n, m in model.named_modules()}
        for block in model.blocks():
            prefix = names[block] + "."
            if isinstance(block, BasicBlock):
                branch, last = [("conv1", "lif1")], ("conv2", "lif2")
            elif isinstance(block, Bottleneck):
                branch, last = [("conv1", "lif1"), ("conv2", "lif2")], ("conv3", "lif3")
            else:
                raise NIRExportError(f"{prefix[:-1]}: block type {type(block).__name__} has no NIR mapping")
            x = s
            for conv, lif in branch:
                x = self.neuron(prefix + lif, getattr(block, lif),
                                self.conv(prefix + conv, getattr(block, conv), x))
            out = self.conv(prefix + last[0], getattr(block, last[0]), x)
            shortcut = s if block.downsample is None else self.conv(
                prefix + "downsample.conv", block.downsample.conv, s)
            s = self.neuron(prefix + last[1], getattr(block, last[1]), out, shortcut)  # edges add
        channels, height, width = self.shapes[names[model.blocks()[-1].output_lif]]
        pool = self.add("avgpool", self.nir.AvgPool2d(kernel_size=np.array([height, width]),
                                                      stride=np.array([height, width]),
                                                      padding=np.array([0, 0])), s)
        y = self.add("flatten", self.nir.Flatten(input_type={"input": np.array([channels, 1, 1])},
                                                 start_dim=0), pool)
        if model.fc1 is not None:
            y = self.neuron("lif_fc1", model.lif_fc1, self.linear("fc1", model.fc1, y))
        self.output(self.linear("fc", model.fc, y), model.num_classes)

    def mlp(self, model: SpikingMLP) -> None:
        s = "input"
        if len(self.shapes["input"]) > 1:
            s = self.add("flatten", self.nir.Flatten(input_type={"input": np.array(self.shapes["input"])},
                                                     start_dim=0), s)
        for i, block in enumerate(model.layers):
            s = self.neuron(f"layers.{i}.lif", block.lif, self.linear(f"layers.{i}.fc", block.fc, s))
        self.output(self.linear("fc", model.fc, s), model.num_classes)

    def output(self, source: str, classes: int) -> None:
        self.add("output", self.nir.Output(output_type=np.array([classes])), source)


def simulate_nir(graph: nir.NIRGraph, x: Tensor, *, record: bool = False
                 ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Run a NIR graph over time with the discrete semantics ``to_nir`` documents.

    Each step evaluates every node once in topological order; a node's input is the sum of its
    incoming edges at that step; neurons take one forward-Euler step of the metadata's ``dt``
    (1 when the graph has none) from a zero state (LIF, IF, LI, I, with reset to ``v_reset`` after a spike ``v > v_threshold``). The
    arithmetic is the model's (torch ops in ``x``'s dtype), so a ``to_nir`` export reproduces the
    folded model's spikes exactly.

    Args:
        graph: a graph with one Input and one Output node and no cycle, e.g. ``nir.read(path)``.
        x: input ``[T, B, *input_shape]`` (repeat an image over T for direct encoding).
        record: also return every node's output per step.

    Returns:
        the Output node's values ``[T, B, *output_shape]``, and with ``record`` a dict node name
        -> ``[T, B, ...]``.
    """
    import nir

    order = _topological_order(graph)
    sources: dict[str, list[str]] = {name: [] for name in graph.nodes}
    for src, dst in graph.edges:
        sources[dst].append(src)
    (inp,) = [n for n, node in graph.nodes.items() if isinstance(node, nir.Input)]
    (out,) = [n for n, node in graph.nodes.items() if isinstance(node, nir.Output)]
    dt = float(np.asarray(graph.metadata.get("dt", 1.0)))
    steps = [_NodeSim(graph.nodes[name], dt, x.dtype, x.device) for name in order]
    history: dict[str, list[Tensor]] = {name: [] for name in order}
    for x_t in x.unbind(0):
        values: dict[str, Tensor] = {}
        for name, sim in zip(order, steps):
            if name == inp:
                values[name] = x_t
                continue
            incoming = [values[s] for s in sources[name]]
            total = incoming[0]
            for term in incoming[1:]:
                total = total + term
            values[name] = sim(total)
        for name in order:
            if record or name == out:
                history[name].append(values[name])
    outputs = torch.stack(history[out])
    if record:
        return outputs, {name: torch.stack(v) for name, v in history.items() if v}
    return outputs


def _topological_order(graph: nir.NIRGraph) -> list[str]:
    indegree = {name: 0 for name in graph.nodes}
    for _, dst in graph.edges:
        indegree[dst] += 1
    ready = [name for name, d in indegree.items() if d == 0]
    order = []
    while ready:
        name = ready.pop(0)
        order.append(name)
        for src, dst in graph.edges:
            if src == name:
                indegree[dst] -= 1
                if indegree[dst] == 0:
                    ready.append(dst)
    if len(order) != len(graph.nodes):
        raise ValueError("simulate_nir: the graph has a cycle (recurrence); this simulator runs none")
    return order


class _NodeSim:
    """One node's per-step function; neurons keep their membrane between calls."""

    def __init__(self, node: Any, dt: float, dtype: torch.dtype, device: torch.device):
        import nir

        self.node, self.kind = node, type(node).__name__
        self.v: Tensor | None = None

        def param(value: Any, as_dtype: torch.dtype = dtype) -> Tensor:
            return torch.as_tensor(np.asarray(value), device=device).to(as_dtype)

        self.param = param
        if isinstance(node, (nir.LIF, nir.LI)):
            # Euler step coefficients in fp64, then the model's dtype: 1 - dt/tau is its decay.
            tau, r, v_leak = (param(p, torch.float64) for p in (node.tau, node.r, node.v_leak))
            self.a, self.b, self.c = (param(c) for c in (1 - dt / tau, r * dt / tau, v_leak * dt / tau))
        elif isinstance(node, (nir.IF, nir.I)):
            self.b = param(param(node.r, torch.float64) * dt)
        if isinstance(node, (nir.LIF, nir.IF)):
            self.threshold, self.v_reset = param(node.v_threshold), param(node.v_reset)
        elif isinstance(node, nir.Threshold):
            self.threshold = param(node.threshold)
        elif isinstance(node, (nir.Conv2d, nir.Affine, nir.Linear)):
            self.weight = param(node.weight)
            self.bias = param(node.bias) if hasattr(node, "bias") else None
        elif isinstance(node, nir.Scale):
            self.scale = param(node.scale)
        elif not isinstance(node, (nir.Flatten, nir.AvgPool2d, nir.SumPool2d, nir.Output, nir.Input,
                                   nir.LI, nir.I)):
            raise ValueError(f"simulate_nir: no simulation for NIR node type {self.kind}")

    def __call__(self, x: Tensor) -> Tensor:
        node, kind = self.node, self.kind
        if kind in ("LIF", "IF", "LI", "I"):
            v = torch.zeros_like(x) if self.v is None else self.v
            h = (self.a * v + self.b * x + self.c) if kind in ("LIF", "LI") else v + self.b * x
            if kind in ("LI", "I"):
                self.v = h
                return h
            spikes = h > self.threshold
            self.v = torch.where(spikes, self.v_reset, h)
            return spikes.to(x.dtype)
        if kind == "Threshold":
            return (x > self.threshold).to(x.dtype)
        if kind == "Conv2d":
            padding = node.padding
            padding = padding.decode() if isinstance(padding, bytes) else (
                padding if isinstance(padding, str) else tuple(int(p) for p in np.atleast_1d(padding)))
            return F.conv2d(x, self.weight, self.bias, _ints(node.stride), padding,
                            _ints(node.dilation), int(node.groups))
        if kind in ("Affine", "Linear"):
            return F.linear(x, self.weight, self.bias)
        if kind == "Scale":
            return x * self.scale
        if kind == "Flatten":
            start, end = int(node.start_dim), int(node.end_dim)
            return x.flatten(start + 1, end if end < 0 else end + 1)  # + 1: the batch axis
        if kind in ("AvgPool2d", "SumPool2d"):
            return F.avg_pool2d(x, _ints(node.kernel_size), _ints(node.stride), _ints(node.padding),
                                divisor_override=1 if kind == "SumPool2d" else None)
        return x  # Output


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in np.atleast_1d(value))
