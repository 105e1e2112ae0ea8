"""How a model is wrapped, stepped and checkpointed: one small interface, three strategies.

The step loop sees only `Strategy` (below), so DDP and DeepSpeed details never appear in it.
`single` and `ddp` share one class (DDP is a wrapper); `deepspeed` hands precision, ZeRO and
clipping to its engine, and its per-rank shards to the checkpointer as `Sharded` state. A
strategy only supplies state; `train.checkpoints.Checkpointer` owns every checkpoint file.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, ContextManager, Protocol

import torch
from torch import nn

from train.checkpoints import Sharded, Stateful
from train.config import Config
from train.distributed import DistEnv

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_precision_warning(precision: str, device: torch.device) -> str | None:
    """One line when `precision` asks a CPU for a 16-bit type it has no fast kernels for.

    oneDNN runs bf16 convolutions natively or emulated on AVX-512 CPUs; without AVX-512 (e.g. AMD
    EPYC Zen 3) it falls back to a reference path: one 3x3 conv, 128 channels, 32x32, batch 32
    took 5.46 s in bf16 against 76 ms in fp32 there (72x). fp16 has fast CPU kernels only with
    AVX-512-FP16/AMX-FP16; elsewhere the same conv took ~100x its fp32 time (both measured on the
    project's 2-core VMs). None when nothing is to be expected.
    """
    if device.type != "cpu" or precision == "fp32":
        return None
    supported = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}[precision]()
    if supported:
        return None
    slower = "35-70x" if precision == "bf16" else "~100x"
    return (f"warning: train.precision={precision} on a CPU without native {precision} kernels: "
            f"convolutions run emulated, expect them {slower} slower than fp32 "
            "(train.precision=fp32 is the fast choice on this machine)")


class Strategy(Protocol):
    """What the step loop needs from single/DDP/DeepSpeed."""

    module: nn.Module  # the unwrapped model: evaluated, and what `best_model.pt` holds

    def forward(self, model: nn.Module | None = None, *, sync: bool = True) -> ContextManager[Callable]:
        """A context yielding the forward to call on a batch (autocast, input dtype, and DDP's
        gradient sync only when `sync`, i.e. on the last micro-batch); `model` defaults to the
        wrapped training model."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> dict[str, float]:
        """Clip, step, zero the gradients, advance the schedule; returns grad norm (and loss scale)."""

    def skip_step(self) -> None:
        """Drop the accumulated gradients (a non-finite loss): no update, no schedule step."""

    def lr(self) -> float: ...

    def state(self) -> tuple[dict[str, Stateful], Sharded | None]:
        """The checkpoint parts this strategy holds, and the engine shards if any."""

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights (a collective under ZeRO-3: call it on every rank)."""


class TorchStrategy:
    """`single` (one process) and `ddp` (DistributedDataParallel, NCCL or gloo)."""

    def __init__(self, cfg: Config, env: DistEnv, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.env, self.optimizer, self.scheduler = env, optimizer, scheduler
        self.module = model
        self.model = model
        if cfg.train.strategy == "ddp" and env.world_size > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.dtype = _DTYPES[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
        self.grad_clip = cfg.optim.grad_clip
        self.accumulate = cfg.optim.accumulate

    @contextlib.contextmanager
    def forward(self, model: nn.Module | None = None, *, sync: bool = True):
        with contextlib.ExitStack() as stack:
            if self.dtype != torch.float32:
                stack.enter_context(torch.autocast(self.env.device.type, dtype=self.dtype))
            if not sync and isinstance(self.model, nn.parallel.DistributedDataParallel) and model is None:
                stack.enter_context(self.model.no_sync())
            yield model if model is not None else self.model

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accumulate).backward()

    def step(self) -> dict[str, float]:
        self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        stats = {"grad_norm": float(norm)}
        if self.scaler.is_enabled():
            stats["loss_scale"] = float(self.scaler.get_scale())
        return stats

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state(self) -> tuple[dict[str, Stateful], Sharded | None]:
        return {"model": self.module, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler}, None

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


class DeepSpeedStrategy:
    """DeepSpeed engine: ZeRO stage, bf16/fp16 and clipping come from our config."""

    def __init__(self, cfg: Config, env: DistEnv, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler):
        import deepspeed  # heavy; only this strategy needs it

        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": cfg.optim.accumulate,
            # DeepSpeed's own default became 1.0; ours is explicit (0 = off).
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": cfg.train.deepspeed.zero_stage},
            "bf16": {"enabled": cfg.train.precision == "bf16"},
            "fp16": {"enabled": cfg.train.precision == "fp16", "initial_scale_power": 16},
            # Our SGD/AdamW are plain torch optimizers; ZeRO shards them fine.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        self.env, self.scheduler, self.module = env, scheduler, model
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.dtype = _DTYPES[cfg.train.precision]

    @contextlib.contextmanager
    def forward(self, model: nn.Module | None = None, *, sync: bool = True):
        # The engine holds the model in bf16/fp16 already: only the input is cast. We say which
        # micro-batch ends the step, rather than letting the engine count calls.
        self.engine.set_gradient_accumulation_boundary(sync)
        run = model if model is not None else self.engine
        yield lambda x: run(x.to(self.dtype) if x.is_floating_point() else x)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # the engine divides by the accumulation steps itself

    def step(self) -> dict[str, float]:
        self.engine.step()  # optimizer, clipping, zero_grad and lr schedule at the boundary
        stats = {}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            stats["grad_norm"] = float(norm)
        if self.dtype == torch.float16:
            stats["loss_scale"] = float(self.engine.optimizer.cur_scale)
        return stats

    def skip_step(self) -> None:
        self.engine.zero_grad()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state(self) -> tuple[dict[str, Stateful], Sharded | None]:
        return {}, self  # model, optimizer and scheduler live in the engine's shards

    def save_shards(self, folder: Path, tag: str) -> None:
        # No `latest` file: DeepSpeed writes it without a rename, and our manifest names the tag.
        self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False)

    def load_shards(self, folder: Path, tag: str) -> None:
        self.engine.load_checkpoint(str(folder), tag=tag)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        if self.engine.zero_optimization_partition_weights():  # ZeRO-3 shards the weights
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()


def build_strategy(cfg: Config, env: DistEnv, model: nn.Module, optimizer, scheduler) -> Strategy:
    cls = DeepSpeedStrategy if cfg.train.strategy == "deepspeed" else TorchStrategy
    return cls(cfg, env, model, optimizer, scheduler)
