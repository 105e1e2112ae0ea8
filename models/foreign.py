"""Networks a researcher brings: ``model.name=package.module:factory`` builds any ``nn.Module``
that maps ``[T, B, ...]`` to logits, and ``ForeignModel`` gives it the interface the trainer,
the evaluation and the firing report use for our own networks.

The user's module (``ForeignModel.net``) receives every input time-major, ``[T, B, *step]``: a
static input (an image ``[B, C, H, W]``) is repeated over ``T`` steps (direct encoding), a
sequence (DVS frames, feature sequences) is passed as it comes. It returns logits ``[B,
classes]`` or per step ``[T, B, classes]``; ``forward`` then returns their mean over T (or the
steps with ``set_output("per_step")``, for TET and the per-step accuracy).

SpikingJelly networks (``spikingjelly.activation_based``, multi-step: ``step_mode="m"``) keep
their membrane on the modules; ``functional.reset_net`` runs before every forward, so each batch,
training or evaluation, starts from rest (our own neurons are stateless and need none of this).
Their neuron modules (``neuron.BaseNode``) report spikes through the network's
``NeuronContext`` from forward hooks, as our LIF layers do, so firing rates, the firing-rate
penalty and SOPs work unchanged. SOPs count a spike once per synapse of each ``Conv2d``/``Linear``
its tensor reaches directly or through a view (flatten, reshape), found by the hooks; a spike
that passes another op first (pooling, an attention product) is not counted. A plain module
without SpikingJelly neurons is trained and evaluated as it is, with no firing statistics.

What needs our own blocks is refused in one line (``ForeignModelError``): activation
checkpointing (``blocks``, ``blocks+time``: a stateful SpikingJelly neuron recomputed in
backward would start from its final state), NIR export and tdBN folding (``models.deploy``).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from models.checkpointing import OUTPUTS
from models.firing import conv_macs
from models.names import FACTORY_FORM, is_factory_path
from models.neuron_context import NeuronContext

__all__ = ["FACTORY_FORM", "ForeignModelError", "is_factory_path", "load_factory", "ForeignModel", "build_foreign"]


class ForeignModelError(ValueError):
    """A brought model that cannot be built or used as asked; the message is one line."""


def load_factory(path: str) -> Callable[..., nn.Module]:
    """The callable ``path`` (``package.module:factory``) names, imported now.

    Raises:
        ForeignModelError: the module does not import or has no such callable (one line).
    """
    if not is_factory_path(path):
        raise ForeignModelError(f"{path!r} is not of the form {FACTORY_FORM}")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ForeignModelError(f"{path}: cannot import {module_name} ({e}); put the directory "
                                "holding it on PYTHONPATH (or install its package)") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ForeignModelError(f"{path}: {module_name} ({getattr(module, '__file__', '?')}) has "
                                f"no callable {attr}")
    return factory


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: pass nothing it may not take
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _spikingjelly_modules(net: nn.Module) -> bool:
    return any(type(m).__module__.startswith("spikingjelly.") for m in net.modules())


class ForeignModel(nn.Module):
    """A brought network with our networks' interface (``T``, ``num_classes``, ``forward`` /
    ``forward_steps`` / ``set_output``, ``set_checkpointing``, ``spike_consumers``,
    ``first_layer_macs_per_image``). Its state dict is the user module's under ``net.``."""

    def __init__(self, net: nn.Module, *, T: int, num_classes: int, step_dims: int, name: str = "") -> None:
        """``net``: the user's module; ``T``: steps for a static input; ``step_dims``: dims of one
        step of one sample (3 for ``[C, H, W]``, 1 for ``[F]``), which tells a static input
        ``[B, *step]`` from a sequence ``[T, B, *step]``; ``name``: ``model.name``, for messages."""
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ForeignModelError(f"{name}: the factory returned {type(net).__name__}, not an nn.Module")
        self.net = net
        self.T, self.num_classes, self.step_dims, self.name = T, num_classes, step_dims, name
        self.output = "mean"
        self.readout_from = 0
        self.checkpointing = "none"
        self.context = NeuronContext()
        self._reset: Callable[[nn.Module], None] | None = None
        self._neurons: list[tuple[str, nn.Module]] = []
        if _spikingjelly_modules(net):
            self._attach_spikingjelly()
        self._consumers: dict[str, list[str]] = {name: [] for name, _ in self.neuron_layers()}
        self._first_layer_macs = 0.0  # of the last counted forward, per sample
        self._names = {m: n for n, m in self.named_modules()}
        # Storage of a counted forward's spikes -> (neuron name, the spikes, held so that no later
        # tensor of the same forward reuses the memory).
        self._outputs: dict[int, tuple[str, Tensor]] = {}
        self._first_seen, self._batch = False, 1
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.register_forward_pre_hook(self._synapse_hook)

    def _attach_spikingjelly(self) -> None:
        from spikingjelly.activation_based import base, functional, neuron

        single = sorted(n for n, m in self.net.named_modules()
                        if isinstance(m, base.StepModule) and m.step_mode != "m")
        if single:
            raise ForeignModelError(f"{self.name}: SpikingJelly module {single[0]} runs step_mode="
                                    "'s'; build the network multi-step (functional.set_step_mode(net, 'm'))")
        self._reset = functional.reset_net
        for name, module in self.net.named_modules():
            if isinstance(module, neuron.BaseNode):
                self._neurons.append((f"net.{name}", module))
                module.register_forward_hook(self._neuron_hook)

    @property
    def fc(self) -> nn.Linear | None:
        """The classifier: the brought network's last ``nn.Linear`` (t-SNE reads its input)."""
        linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None

    def neuron_layers(self) -> list[tuple[str, nn.Module]]:
        """The spiking layers (SpikingJelly neurons), by qualified name, in module order."""
        return list(self._neurons)

    # ------------------------------------------------------------------ what a forward records

    def _neuron_hook(self, module: nn.Module, args: Any, out: Tensor) -> None:
        if self.context.recording:
            self.context.record(module, out)
            self._outputs[out.untyped_storage().data_ptr()] = (self._names[module], out)

    def _synapse_hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if not self.context.counting:
            return
        x = args[0]
        source = self._outputs.get(x.untyped_storage().data_ptr())
        if source is not None:
            consumers = self._consumers[source[0]]
            if self._names[module] not in consumers:
                consumers.append(self._names[module])
        elif not self._first_seen:  # the first layer the input reaches: its dense MACs
            self._first_seen = True
            if isinstance(module, nn.Conv2d):
                shape = tuple(x.shape[-3:])
                calls = x.numel() // math.prod(shape)
                self._first_layer_macs = conv_macs(module, shape) * calls
            else:
                self._first_layer_macs = module.in_features * module.out_features * (x.numel() // module.in_features)
            self._first_layer_macs /= self._batch

    def spike_consumers(self) -> dict[str, list[str]]:
        """Neuron layer name -> the Conv2d/Linear layers its spikes reached in counted forwards."""
        return {name: list(c) for name, c in self._consumers.items()}

    def first_layer_macs_per_image(self) -> float:
        """Dense MACs per sample of the first Conv2d/Linear the input reached in the last counted
        forward (T times for a repeated static input: the brought network computes every step)."""
        return float(self._first_layer_macs)

    # ------------------------------------------------------------------ our networks' interface

    def set_output(self, output: str) -> None:
        """What ``forward`` returns: ``"mean"`` logits over time or ``"per_step"`` logits (when the
        brought network returns per-step logits; ``[B, classes]`` comes back as it is)."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        self.output = output

    def set_readout(self, readout_from: int) -> None:
        """The first time step whose logits ``forward`` reads out (0 = every step); per-step
        logits only, as from our networks."""
        if readout_from < 0:
            raise ValueError(f"readout_from must be >= 0, got {readout_from}")
        self.readout_from = int(readout_from)

    def set_checkpointing(self, mode: str, time_chunk: int = 2) -> None:
        """Only ``none``: activation checkpointing recomputes our own blocks (``models.checkpointing``)."""
        if mode != "none":
            raise ForeignModelError(f"{mode}: activation checkpointing needs our networks' blocks, and "
                                    f"{self.name} is a brought model; use train.checkpointing=none")

    def time_major(self, x: Tensor) -> Tensor:
        """``[B, *step]`` repeated over T, or ``[T', B, *step]`` unchanged -> ``[T, B, *step]``."""
        if x.dim() == self.step_dims + 1:
            return x.unsqueeze(0).repeat(self.T, *([1] * x.dim()))
        if x.dim() == self.step_dims + 2:
            return x
        raise ValueError(f"{self.name}: input of shape {list(x.shape)}; expected [B, *step] or [T, B, *step] "
                         f"with a step of {self.step_dims} dims")

    def forward_steps(self, x: Tensor) -> Tensor:
        """Input as in ``forward`` -> logits ``[T, B, classes]`` (the brought network must return
        per-step logits)."""
        logits = self._run(x)
        if logits.dim() != 3:
            raise ForeignModelError(f"{self.name} returns logits {list(logits.shape)}, not per step "
                                    "[T, B, classes]; per-step measures need per-step logits")
        return logits

    def forward(self, x: Tensor) -> Tensor:
        """``[B, *step]`` (static, repeated over T) or ``[T, B, *step]`` -> logits ``[B, classes]``
        (the mean over the steps ``readout_from ..``), or those steps ``[T', B, classes]`` with
        ``output="per_step"``; a network returning ``[B, classes]`` gives them as they are."""
        logits = self._run(x)
        if logits.dim() == 2:
            if self.readout_from:
                raise ForeignModelError(f"{self.name} returns [B, classes]; reading out from step "
                                        f"{self.readout_from} needs per-step logits [T, B, classes]")
            return logits
        if self.readout_from >= logits.shape[0]:
            raise ValueError(f"readout_from={self.readout_from} leaves no step of a "
                             f"{logits.shape[0]}-step input to read out")
        logits = logits[self.readout_from:]
        return logits if self.output == "per_step" else logits.mean(0)

    def _run(self, x: Tensor) -> Tensor:
        if self._reset is not None:
            self._reset(self.net)  # every batch starts from rest
        x = self.time_major(x)
        self._batch, self._first_seen = x.shape[1], False
        try:
            logits = self.net(x)
        finally:
            self._outputs.clear()
        if not isinstance(logits, Tensor) or logits.dim() not in (2, 3) or logits.shape[-1] != self.num_classes:
            shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ForeignModelError(f"{self.name} returned {shape} for input {list(x.shape)}; expected logits "
                                    f"[B, {self.num_classes}] or [T, B, {self.num_classes}]")
        return logits

    def extra_repr(self) -> str:
        return f"name={self.name}, T={self.T}, num_classes={self.num_classes}, neuron layers={len(self._neurons)}"


def build_foreign(path: str, *, T: int, num_classes: int, in_chans: int, step_dims: int,
                  args: Mapping[str, Any] | None = None) -> ForeignModel:
    """``ForeignModel`` around ``factory(**args)`` for ``path`` = ``package.module:factory``;
    ``num_classes``, ``in_chans`` and ``T`` are passed too where the factory takes them (by
    name or ``**kwargs``) and ``args`` does not set them.

    Raises:
        ForeignModelError: an import, a factory call or its result that does not fit (one line).
    """
    factory = load_factory(path)
    kwargs = dict(args or {})
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans), ("T", T)):
        if key not in kwargs and _accepts(factory, key):
            kwargs[key] = value
    try:
        net = factory(**kwargs)
    except TypeError as e:  # wrong arguments: the factory's own words
        raise ForeignModelError(f"{path}: {path.partition(':')[2]}(**{kwargs}) failed: "
                                f"{str(e).splitlines()[0]}") from None
    return ForeignModel(net, T=T, num_classes=num_classes, step_dims=step_dims, name=path)
