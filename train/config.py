"""One typed schema for every experiment: YAML + dotted overrides, validated, resolved, saved.

`load_config(path, overrides)` is the only place a config is parsed and checked. Each room owns
the dataclass of its section (the neuron in `models.neuron_config`, the data in
`data_pipelines.config`, tracking in `train.tracking.config`), in modules that import neither
torch nor timm, FFCV, Triton or DeepSpeed, so the launcher reads a config on a login node in a
second. The lists of choices come from where they are defined (the data set registry, the
checkpointing modes, the model names). A mistake a user can make (unknown key, wrong type,
invalid choice, out-of-range value, a data set that does not fit the model) raises `ConfigError`
with one line naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipelines.common import META_FILE, DataError
from data_pipelines.config import DataConfig, check_data_config
from data_pipelines.registry import read_meta
from data_pipelines.registry import spec as data_spec
from models.names import CHECKPOINTING_MODES, FACTORY_FORM, MODEL_NAMES, OUTPUTS, is_factory_path
from models.neuron_config import Leak, NeuronConfig, NeuronConfigError
from train.tracking.config import TrackingConfig


class ConfigError(ValueError):
    """A user-fixable problem with the config: the message names the key and the remedy."""


def choice(default: str, *allowed: str) -> Any:
    """A str field restricted to `allowed` (checked after merging, message lists the values)."""
    return field(default=default, metadata={"choices": (default, *allowed)})


def at_least(default: int | float, minimum: int | float = 1) -> Any:
    """A number field with a lower bound (checked after merging)."""
    return field(default=default, metadata={"minimum": minimum})


def fraction(default: float, *, one: bool = False) -> Any:
    """A float in [0, 1), or [0, 1] with `one` (checked after merging): momenta, decays, rates."""
    return field(default=default, metadata={"minimum": 0.0, "maximum": 1.0, "one": one})


def nonnegative_floats(*default: float) -> Any:
    """A list of floats, each >= 0 (checked after merging)."""
    return field(default_factory=lambda: list(default), metadata={"each_minimum": 0.0})


@dataclass
class RunConfig:
    name: str = "default"          # run directory = <root>/<name>; reruns of a name resume it
    root: str = "runs"             # also holds the embedded MLflow store (mlflow.db)
    seed: int = at_least(0, 0)     # model init, data order (with the epoch), augmentation
    deterministic: bool = False    # torch.use_deterministic_algorithms, for bit-exact resume tests


@dataclass
class ModelConfig:
    # A registered network (models.zoo), or a brought one: package.module:factory (models.foreign;
    # imported when the model is built, so the launcher needs no access to it).
    name: str = field(default="spiking_resnet_tiny", metadata={
        "choices": ("spiking_resnet_tiny", *(n for n in MODEL_NAMES if n != "spiking_resnet_tiny")),
        "or_factory": True})
    T: int = at_least(4)                # timesteps; DVS data brings its own T, which must match
    num_classes: int = at_least(0, 0)   # 0: take it from the dataset's meta.json
    in_chans: int = at_least(0, 0)      # 0: take it from the dataset's meta.json
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    output: str = choice(*OUTPUTS)      # forward's logits: mean over T, or per step [T, B, classes] (TET)
    args: dict[str, Any] = field(default_factory=dict)  # more factory arguments, e.g. {connect: IAND} for
    #                                     sew_resnet*, {hidden: [256, 256], norm: bn} for spiking_mlp


@dataclass
class OptimConfig:
    name: str = choice("sgd", "adamw")
    lr: float = at_least(0.1, 0.0)      # peak learning rate, for the global batch
    momentum: float = fraction(0.9)
    nesterov: bool = False
    weight_decay: float = at_least(5e-4, 0.0)
    no_decay_norm_bias: bool = True     # no weight decay on tdBN parameters and biases
    betas_1: float = fraction(0.9)
    betas_2: float = fraction(0.999)
    epochs: int = at_least(10)
    warmup_epochs: float = at_least(0.0, 0.0)  # linear warmup, then cosine to min_lr
    min_lr: float = at_least(0.0, 0.0)
    label_smoothing: float = fraction(0.0)
    loss: str = choice("ce", "tet")     # tet: Temporal Efficient Training (Deng et al. 2022), model.output=per_step
    tet_lambda: float = fraction(1e-3, one=True)  # TET's weight of the MSE term pulling every step's output to tet_phi
    tet_phi: float = 1.0                # TET's target of that MSE term
    firing_reg: float = at_least(0.0, 0.0)  # weight of (mean firing rate - firing_target)^2 in the loss; 0 = off
    firing_target: float = fraction(0.0, one=True)  # the mean firing rate (spikes / neuron / step) the penalty pulls to
    grad_clip: float = at_least(0.0, 0.0)  # max global grad norm; 0 disables clipping
    accumulate: int = at_least(1)       # micro-batches per optimizer step
    ema_decay: float = fraction(0.0)    # EMA of weights (e.g. 0.9998), evaluated beside the model; 0 = off
    mixup_alpha: float = at_least(0.0, 0.0)  # timm Mixup on image batches; 0 = off
    cutmix_alpha: float = at_least(0.0, 0.0)  # timm CutMix on image batches; 0 = off


@dataclass
class DeepSpeedConfig:
    zero_stage: int = field(default=1, metadata={"choices": (0, 1, 2, 3)})


@dataclass
class TrainConfig:
    strategy: str = choice("single", "ddp", "deepspeed")
    precision: str = choice("fp32", "bf16", "fp16")
    checkpointing: str = choice(*CHECKPOINTING_MODES)  # activation checkpointing
    time_chunk: int = at_least(2)       # steps per recomputed chunk under blocks+time
    device: str = choice("auto", "cpu", "cuda")
    compile: bool = False               # torch.compile the model (Inductor); blocks alone when checkpointing
    sync_bn: bool = False               # tdBN statistics over every rank's batch (DDP/DeepSpeed, > 1 rank)
    checkpoint_every_steps: int = at_least(0, 0)  # 0: only at epoch ends and on SIGTERM/SIGUSR2
    keep_checkpoints: int = at_least(3)
    resume: str = choice("auto", "never")
    max_nonfinite_steps: int = at_least(5)  # consecutive non-finite losses before the run stops
    # Seconds without a training step (an epoch-end validation and checkpoint included) after
    # which every rank ends, one line naming the rank that stopped, exit code 3 for requeue.
    hang_timeout_s: float = at_least(600.0, 1.0)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class EvalConfig:
    """`python -m train.evaluate RUN_DIR`: what the functional-roles study measures of a run.

    Perturbation sizes are fractions of the input's valid range (pixel scale, before
    normalisation: 0.1 on CIFAR is 25.5 grey levels, on the digits 1.6 of 16), so one grid
    suits every image set; on DVS frames they are event counts per (frame, polarity, pixel).
    Every random draw (noise, PGD start) is a function of (run.seed, measurement, batch, rank);
    the loss-landscape directions of run.seed alone (the same on every rank).
    """
    checkpoint: str = choice("best", "last")  # best_model.pt, or the newest step checkpoint
    batches: int = at_least(0, 0)       # validation batches per measurement; 0 = all
    train_batches: int = at_least(0, 0)  # training-split batches for the generalisation gap; 0 = all
    noise_sigmas: list[float] = nonnegative_floats(0.0, 0.05, 0.1, 0.2, 0.4)  # Gaussian noise std
    epsilons: list[float] = nonnegative_floats(0.0, 0.01, 0.03, 0.1)  # FGSM/PGD L-inf budgets
    attack_batches: int = at_least(0, 0)  # validation batches attacked (FGSM, PGD); 0 = all
    pgd_steps: int = at_least(10)
    pgd_step_size: float = at_least(2.5, 0.0)  # per-step size as a multiple of eps / pgd_steps (Madry et al.)
    pgd_random_start: bool = True       # start PGD uniformly inside the eps ball
    pgd_best_iterate: bool = True       # each sample keeps its most damaging PGD iterate, not the last
    image_attack: bool = False          # also FGSM/PGD at the field's image setting: eps 8/255, PGD 7 steps of 2/255
    transfer_surrogate: str = choice("auto", "rectangular", "sigmoid", "atan", "triangle")  # PGD's gradient
    #                                     through this surrogate (same weights); auto: atan, or sigmoid for an atan model
    transfer_surrogate_width: float = at_least(0.0, 0.0)  # its width; 0 = its usual one (measure.USUAL_WIDTH)
    flip_budgets: list[int] = field(default_factory=lambda: [10, 100], metadata={"each_minimum": 0})  # event/spike
    #                                     input: spikes flipped per sample (flip_top1_<k>)
    flip_rounds: int = at_least(5)      # gradient steps the flip budget is spread over
    landscape_points: int = at_least(5, 0)  # loss curve: points each side of the trained weights; 0 = none
    landscape_surface_points: int = at_least(3, 0)  # 2-D surface: points each side per axis; 0 = none
    landscape_radius: float = at_least(1.0, 0.0)  # the step alpha spans [-r, r] (filter norms)
    landscape_batches: int = at_least(2)  # validation batches per loss of the landscape
    tsne_samples: int = at_least(300, 0)  # validation samples in the t-SNE plot; 0 = none
    stream_length: int = at_least(8)    # temporal data: samples fed back to back per stream
    after_train: bool = False           # `python -m train` evaluates the run when training ends


# The functional-roles grids (Yin et al. 2024, ../shared/PAPER2.md). `paper`: its 12 variants;
# `extended`: ours, adding soft reset and self/lateral recurrence (36 variants).
STUDY_PRESETS: dict[str, dict[str, list[str]]] = {
    "paper": {"model.neuron.leak": ["normal", "none", "complete"],
              "model.neuron.reset": ["hard", "none"],
              "model.neuron.recurrence": ["none", "full"]},
    "extended": {"model.neuron.leak": ["normal", "none", "complete"],
                 "model.neuron.reset": ["hard", "soft", "none"],
                 "model.neuron.recurrence": ["none", "self", "lateral", "full"]},
}


@dataclass
class StudyConfig:
    """The functional-roles study: `python -m study run` trains and evaluates every variant x seed
    here, `python -m launch.submit --study` submits them as one job array (see study/grid.py).

    preset: paper | extended (STUDY_PRESETS) | custom (then `grid` is the grid: config keys ->
    the values to cross; a key kept at one value drops an axis). seeds: a count n (seeds 0..n-1)
    or a list of seeds; each variant x seed is its own run with `run.seed` set to the seed."""
    preset: str = choice("paper", "extended", "custom")
    grid: dict[str, list[str]] = field(default_factory=dict)
    seeds: Any = 3

    def axes(self) -> dict[str, list[str]]:
        """The grid to cross: the preset's, or `grid` with preset custom."""
        return dict(self.grid) if self.preset == "custom" else STUDY_PRESETS[self.preset]

    def seed_list(self) -> list[int]:
        """The seeds every variant runs with, in order."""
        seeds = self.seeds
        return list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]


def _check_study(study: StudyConfig) -> None:
    seeds = study.seeds
    if isinstance(seeds, bool) or not (
            (isinstance(seeds, int) and seeds >= 1)
            or (isinstance(seeds, (list, tuple)) and seeds and all(isinstance(s, int) and not isinstance(s, bool)
                                                                   and s >= 0 for s in seeds)
                and len(set(seeds)) == len(seeds))):
        raise ConfigError(f"config key 'study.seeds': a count >= 1 or a list of distinct seeds >= 0, got {seeds!r}")
    if study.preset == "custom" and not study.grid:
        raise ConfigError("config key 'study.grid': study.preset=custom needs a grid (config key -> values)")
    if study.preset != "custom" and study.grid:
        raise ConfigError(f"config key 'study.grid': used only with study.preset=custom (the preset is "
                          f"{study.preset}); set study.preset=custom or drop the grid")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


def load_config(paths: str | Path | list[str | Path] | None, overrides: list[str] = ()) -> Config:
    """Schema defaults <- YAML file(s), later ones winning <- `key=value` overrides, validated.

    Several files compose an experiment from blocks, e.g. a paper config plus
    `configs/blocks/deepspeed_zero2.yaml`.
    """
    layers = [OmegaConf.structured(Config)]
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in map(Path, paths or []):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # YAML syntax errors from several libraries
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.05)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None
    except NeuronConfigError as e:  # NeuronConfig checks its values itself; name the whole key
        key, _, problem = str(e).partition(": ")
        raise ConfigError(f"config key 'model.{key}': {problem}") from None
    _check_choices(cfg)
    _check_study(cfg.study)
    _check_combinations(cfg)
    return cfg


def _check_combinations(cfg: Config) -> None:
    """What no single field's bounds say: settings that do not go together, and the data set on
    disk (when `data.path` is readable here) against the model and the batch."""
    try:
        check_data_config(cfg.data)
    except DataError as e:  # "data.<key>=<value>: why" names the key already
        raise ConfigError(f"config key {e}") from None
    o = cfg.optim
    if o.loss == "tet" and cfg.model.output != "per_step":
        raise ConfigError("config key 'optim.loss': tet needs every step's output; set model.output=per_step")
    if o.mixup_alpha > 0 or o.cutmix_alpha > 0:
        if data_spec(cfg.data.dataset).kind != "image":
            raise ConfigError(f"config keys 'optim.mixup_alpha'/'optim.cutmix_alpha': mixup applies to image "
                              f"data sets, not {cfg.data.dataset}; set them to 0")
        if cfg.data.batch_size % 2:
            raise ConfigError(f"config key 'data.batch_size': mixup needs an even batch size, got {cfg.data.batch_size}")
    if o.min_lr > o.lr:
        raise ConfigError(f"config key 'optim.min_lr': {o.min_lr} is above optim.lr={o.lr}")
    if not (Path(cfg.data.path) / META_FILE).is_file():
        return  # not built yet, or on the cluster's file system only: the loader says so there
    try:
        meta = read_meta(cfg.data.path, cfg.data.dataset)
    except DataError as e:
        raise ConfigError(f"config key 'data.path': {e}") from None
    if meta.dataset != cfg.data.dataset:
        raise ConfigError(f"config key 'data.dataset': {cfg.data.dataset}, but {cfg.data.path} holds "
                          f"{meta.dataset}; point data.path at a {cfg.data.dataset} build")
    steps = meta.T
    if steps and steps != cfg.model.T:  # sequences run their own T: the logged T must be it
        raise ConfigError(f"config key 'model.T': {cfg.model.T}, but {cfg.data.path} holds sequences of "
                          f"{steps} steps; set model.T={steps} (or rebuild the data with {cfg.model.T} steps)")
    samples = meta.counts.get("train")
    if samples and cfg.data.batch_size * o.accumulate > samples:
        key = "optim.accumulate" if o.accumulate > 1 else "data.batch_size"
        raise ConfigError(f"config key '{key}': data.batch_size {cfg.data.batch_size} x optim.accumulate "
                          f"{o.accumulate} exceeds the training set ({samples} samples in {cfg.data.path})")


def _explain(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if type(e).__name__ == "ConfigKeyError" or "not in" in msg:
        return f"unknown config key '{key}' ({msg}); see train/config.py for the schema"
    return f"config key '{key}': {msg}"


def _check_choices(node: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"config key '{key}': must be a finite number, got {value}")
        elif "choices" in f.metadata and value not in f.metadata["choices"] and not (
                f.metadata.get("or_factory") and is_factory_path(value)):
            allowed = ", ".join(map(str, f.metadata["choices"]))
            also = f" (or a brought network's {FACTORY_FORM})" if f.metadata.get("or_factory") else ""
            raise ConfigError(f"config key '{key}': {value!r} is not one of: {allowed}{also}")
        elif "each_minimum" in f.metadata and any(v < f.metadata["each_minimum"] for v in value):
            raise ConfigError(f"config key '{key}': every value must be >= {f.metadata['each_minimum']}, "
                              f"got {list(value)}")
        elif "minimum" in f.metadata and value < f.metadata["minimum"]:
            raise ConfigError(f"config key '{key}': must be >= {f.metadata['minimum']}, got {value}")
        elif "maximum" in f.metadata and (value > 1 or (value == 1 and not f.metadata["one"])):
            raise ConfigError(f"config key '{key}': must be in [0, 1{']' if f.metadata['one'] else ')'}, got {value}")


def grid_points(grid: dict[str, list[str]]) -> list[list[str]]:
    """{'a': ['1', '2'], 'b': ['x']} -> [['a=1', 'b=x'], ['a=2', 'b=x']] (the first key varies slowest)."""
    keys = list(grid)
    for key in keys:
        if not grid[key]:
            raise ConfigError(f"config key 'study.grid.{key}': give at least one value")
    return [[f"{k}={v}" for k, v in zip(keys, point)] for point in itertools.product(*(grid[k] for k in keys))]


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (enums as their values) — what is saved, logged and hashed."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def flat_items(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs. A key the saved config
    lacks (added to the schema after that run started) counts as unchanged while the current
    value is its default: the run behaved that way. An older spelling of a value is the value:
    `leak: true` / `false` (saved before leak had three levels) is today's `normal` / `none`."""
    a, b = flat_items(saved), flat_items(current)
    if "model.neuron.leak" in a:
        a["model.neuron.leak"] = str(Leak.parse(a["model.neuron.leak"]))
    defaults = flat_items(to_dict(Config()))
    for k in b.keys() - a.keys():
        if k in defaults:
            a[k] = defaults[k]
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
