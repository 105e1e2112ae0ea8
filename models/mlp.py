"""A small spiking MLP (Linear-norm-LIF layers, optional recurrence), registered with timm.

Layout inside the network is ``[T, B, features]``; linear layers and the norm fold time into the
batch, LIF layers consume the whole sequence. Recurrence (none, self, lateral) comes from the
neuron config, as in the functional-roles study (Yin et al. 2024).

Input is either a sequence ``[T', B, F]`` (e.g. sequential digits: T' = 8 rows of F = 8 pixels),
which is run for its own ``T'`` steps, or a static batch ``[B, F]`` (direct encoding: the same
input at each of ``model.T`` steps); image batches ``[B, C, H, W]`` and frame sequences
``[T', B, C, H, W]`` are flattened to ``F = C*H*W`` features. ``F`` must equal ``in_chans``.
Output: logits ``[B, num_classes]`` averaged over time (``forward``), or per step
``[T, B, num_classes]`` (``forward_steps``).

    timm.create_model("spiking_mlp", T=8, in_chans=8, neuron=dict(recurrence="lateral"))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from timm.models import register_model
from torch import Tensor, nn

from models.checkpointing import checkpointed
from models.classifier import SpikingClassifier, create_checked
from models.neurons import LIF, LIFState, NeuronConfig
from models.tdbn import TdBN

__all__ = ["NORMS", "TdBN1d", "LinearBlock", "SpikingMLP", "SpikingMLPArgumentError"]

NORMS = ("tdbn", "bn", "none")


class SpikingMLPArgumentError(TypeError):
    """A model factory got an argument it does not know."""


class TdBN1d(TdBN):
    """tdBN on features ``[N, C] -> [N, C]`` (N = T*B folded): mean and variance per feature
    over N, the 1-d case of ``TdBN`` (same parameters, statistics and folding)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"TdBN1d expects [T*B, C] input, got shape {tuple(x.shape)}")
        return super().forward(x[:, :, None, None]).flatten(1)


def _norm(kind: str, features: int, v_threshold: float) -> nn.Module:
    if kind == "tdbn":
        return TdBN1d(features, 1.0, v_threshold)
    if kind == "bn":
        return nn.BatchNorm1d(features)
    return nn.Identity()


class LinearBlock(nn.Module):
    """Linear -> norm over the folded ``T*B`` batch -> LIF: ``[T, B, in] -> spikes [T, B, out]``.

    Args:
        in_features, out_features: sizes of the linear layer (the LIF has ``out_features``).
        norm: ``"tdbn"`` (alpha = 1), ``"bn"`` (``nn.BatchNorm1d``) or ``"none"``; the linear
            layer has a bias only without a norm (a norm's beta makes it redundant).
        neuron: the LIF configuration (and tdBN's V_th).
    """

    def __init__(self, in_features: int, out_features: int, norm: str, neuron: NeuronConfig):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features, bias=norm == "none")
        self.bn = _norm(norm, out_features, neuron.v_threshold)
        self.lif = LIF(out_features, neuron)

    def forward(
        self, x: Tensor, steps: int | None = None, state: LIFState | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, LIFState]:
        """Spikes ``[T, B, out]`` for a sequence ``x [T, B, in]``, or for ``x [B, in]`` presented
        at each of ``steps`` steps (its current is computed once and broadcast over time: the
        norm's batch mean and biased variance are those of the repeated input).
        ``state``/``return_state`` as in ``LIF``."""
        if x.dim() == 2:
            if steps is None:
                raise ValueError("LinearBlock: a static input [B, in] needs steps")
            current = self.bn(self.fc(x))
            current = current.unsqueeze(0).expand(steps, *current.shape)
        else:
            current = self.bn(self.fc(x.flatten(0, 1))).unflatten(0, (x.shape[0], -1))
        return self.lif(current, state=state, return_state=return_state)


class SpikingMLP(SpikingClassifier):
    """Spiking MLP: ``LinearBlock`` per hidden width, then a linear classifier on the spikes of
    the last one, per step; built by the factory at the bottom of this module.

    Args:
        hidden: widths of the hidden (spiking) layers, at least one.
        norm: ``"tdbn"``, ``"bn"`` or ``"none"`` after each hidden linear layer.
        T: time steps for a static input (direct encoding).
        num_classes: classifier outputs.
        in_chans: input features per step (``C*H*W`` for images).
        neuron: ``NeuronConfig``, a mapping of its fields, or None (defaults) for every LIF;
            its ``recurrence`` makes the hidden layers recurrent.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (128, 128),
        *,
        norm: str = "tdbn",
        T: int = 8,
        num_classes: int = 10,
        in_chans: int = 8,
        neuron: NeuronConfig | Mapping[str, Any] | None = None,
    ):
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must list at least one width >= 1, got {hidden}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
        super().__init__(T, num_classes, neuron)
        self.in_chans = in_chans
        self.num_features = hidden[-1]

        widths = (in_chans, *hidden)
        self.layers = nn.Sequential(
            *(LinearBlock(i, o, norm, self.neuron) for i, o in zip(widths[:-1], widths[1:]))
        )
        self.fc = nn.Linear(hidden[-1], num_classes)

    def checkpointed_parts(self) -> list[nn.Module]:
        """The hidden layers: recomputed in backward under activation checkpointing (under
        ``blocks+time`` the spike inputs of layers 2.. are kept at 1 bit each)."""
        return list(self.layers)

    def _as_features(self, x: Tensor) -> Tensor:
        """``[B, F]``/``[B, C, H, W]`` -> ``[B, F]``; ``[T', B, F]``/``[T', B, C, H, W]`` ->
        ``[T', B, F]``."""
        if x.dim() in (2, 4):
            x = x.flatten(1)
        elif x.dim() in (3, 5):
            x = x.flatten(2)
        else:
            raise ValueError(
                f"{type(self).__name__} input must be [B, F], [T, B, F], [B, C, H, W] or "
                f"[T, B, C, H, W], got shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.in_chans:
            raise ValueError(
                f"{type(self).__name__}: the input has {x.shape[-1]} features per step but the "
                f"model was built with in_chans={self.in_chans}; set model.in_chans to {x.shape[-1]}"
            )
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Input (see the module docstring) -> spikes of the last hidden layer
        ``[T, B, num_features]``."""
        x = self._as_features(x)
        steps = self.T if x.dim() == 2 else None
        self._record_first_layer(self.layers[0].lif, 1 if steps is not None else x.shape[0], (x.shape[-1],))
        s = x
        for i, block in enumerate(self.layers):
            # Layers after the first read spikes.
            s = checkpointed(self, block, s, steps, spikes=i > 0)
            steps = None
        return s

    def forward_head(self, s: Tensor, per_step: bool = False) -> Tensor:
        """Spikes ``[T, B, num_features]`` -> logits ``[B, num_classes]`` averaged over T, or the
        per-step logits ``[T, B, num_classes]`` with ``per_step``."""
        logits = self.fc(s)
        return logits if per_step else logits.mean(0)

    def spike_consumers(self) -> dict[str, list[str]]:
        """Neuron layer name -> names of the linear layers its spikes feed."""
        consumers = {f"layers.{i}.lif": [f"layers.{i + 1}.fc"] for i in range(len(self.layers) - 1)}
        consumers[f"layers.{len(self.layers) - 1}.lif"] = ["fc"]
        return consumers

    def _first_layer_macs(self, shape: tuple[int, ...]) -> int:
        """Dense MACs of the first linear layer on one sample (``shape`` is ``(in_chans,)``)."""
        first = self.layers[0].fc
        return first.in_features * first.out_features


def _create(name: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> SpikingMLP:
    return create_checked(SpikingMLP, name, pretrained, model_args, kwargs,
                          ("T", "num_classes", "in_chans", "neuron", "hidden", "norm"), SpikingMLPArgumentError)


@register_model
def spiking_mlp(pretrained: bool = False, **kwargs: Any) -> SpikingMLP:
    """Spiking MLP, by default in_chans-128-128-classes with tdBN (sized for sequential digits:
    8 rows of 8 pixels; 19,210 parameters with 10 classes and no recurrence)."""
    model_args = dict(hidden=(128, 128), norm="tdbn", T=8, num_classes=10, in_chans=8)
    return _create("spiking_mlp", pretrained, model_args, **kwargs)
