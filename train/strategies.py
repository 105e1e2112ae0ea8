"""How a model is wrapped, stepped and saved: one small interface, three strategies.

The engine's step loop calls only `forward_context`, `backward`, `step`, `save` and `load`, so
DDP and DeepSpeed details never appear in it. `single` and `ddp` share one class (DDP is a
wrapper plus rank-0 saving); `deepspeed` hands precision, ZeRO, clipping and saving to its engine.
"""
from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from train.checkpoints import Checkpointer
from train.config import Config, ConfigError
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


class TorchStrategy:
    """`single` (one process) and `ddp` (DistributedDataParallel, NCCL or gloo)."""

    def __init__(self, cfg: Config, env: DistEnv, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.env, self.optimizer, self.scheduler = env, optimizer, scheduler
        self.module = model  # the unwrapped model: what is saved and evaluated
        self.model = model
        if cfg.train.strategy == "ddp" and env.world_size > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.dtype = _DTYPES[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
        self.grad_clip = cfg.optim.grad_clip
        self.accumulate = cfg.optim.accumulate

    def forward_context(self, boundary: bool):
        """Autocast for bf16/fp16; DDP's gradient sync only on the last micro-batch."""
        stack = contextlib.ExitStack()
        if self.dtype != torch.float32:
            stack.enter_context(torch.autocast(self.env.device.type, dtype=self.dtype))
        if not boundary and isinstance(self.model, nn.parallel.DistributedDataParallel):
            stack.enter_context(self.model.no_sync())
        return stack

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accumulate).backward()

    def step(self) -> dict[str, float]:
        """Clip, step, zero grads, advance the schedule; returns grad norm and loss scale."""
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

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights (a collective under ZeRO-3: call it on every rank)."""
        return self.module.state_dict()

    def save(self, ckpt: Checkpointer, step: int, client_state: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        ckpt.save({**client_state,
                   "model": self.module.state_dict(),
                   "optimizer": self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict(),
                   "scaler": self.scaler.state_dict()}, step)

    def load(self, ckpt: Checkpointer) -> dict[str, Any] | None:
        found = ckpt.load_latest(map_location=self.env.device)
        if found is None:
            return None
        state, path = found
        try:
            self.module.load_state_dict(state.pop("model"))
        except RuntimeError as e:  # missing/unexpected keys or shapes: another model's weights
            raise ConfigError(f"{path} holds the weights of another model ({str(e).splitlines()[1].strip()}); "
                              "resume with the settings it was trained with, or choose a new run.name") from None
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        self.scaler.load_state_dict(state.pop("scaler"))
        return state


class DeepSpeedStrategy(TorchStrategy):
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
        self.env, self.scheduler = env, scheduler
        self.module = model
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.model = self.engine
        self.dtype = _DTYPES[cfg.train.precision]
        self.accumulate = cfg.optim.accumulate

    def forward_context(self, boundary: bool):
        return contextlib.nullcontext()  # the engine already holds the model in bf16/fp16

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) if x.is_floating_point() else x

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

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        if self.engine.zero_optimization_partition_weights():  # ZeRO-3 shards the weights
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()

    def save(self, ckpt: Checkpointer, step: int, client_state: dict[str, Any]) -> None:
        # Every rank writes its shard through the engine; rank 0 then writes our small manifest
        # last, so a manifest only exists for a complete engine checkpoint.
        tag = f"step-{step:09d}"
        self.engine.save_checkpoint(str(ckpt.dir / "deepspeed"), tag=tag)
        if self.env.is_main:
            ckpt.save({**client_state, "deepspeed_tag": tag}, step)
            live = {p.stem for p in ckpt.paths()}
            for d in (ckpt.dir / "deepspeed").glob("step-*"):
                if d.is_dir() and d.name not in live:
                    shutil.rmtree(d, ignore_errors=True)

    def load(self, ckpt: Checkpointer) -> dict[str, Any] | None:
        found = ckpt.load_latest()
        if found is None:
            return None
        state, _ = found
        self.engine.load_checkpoint(str(ckpt.dir / "deepspeed"), tag=state.pop("deepspeed_tag"))
        return state


def build_strategy(cfg: Config, env: DistEnv, model: nn.Module, optimizer, scheduler) -> TorchStrategy:
    cls: Callable[..., TorchStrategy] = DeepSpeedStrategy if cfg.train.strategy == "deepspeed" else TorchStrategy
    return cls(cfg, env, model, optimizer, scheduler)
