"""What every benchmark shares: where it ran, and SpikingJelly 2.0's LIF with our dynamics."""
from __future__ import annotations

import os
import platform
import re
import socket
from pathlib import Path

import torch

from models.neurons import NeuronConfig, Reset


def cpu_name() -> str:
    try:  # Linux names the model here; platform.processor() often says only "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    """Where the numbers were measured."""
    info = {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def machine_name(device: str) -> str:
    """File-name tag of this machine: the GPU model on CUDA, else host name and core count."""
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"{socket.gethostname()}-{os.cpu_count()}cpu"


def spikingjelly_lif_kwargs(cfg: NeuronConfig) -> dict:
    """SpikingJelly 2.0 `LIFNode` arguments with our neuron's dynamics: with decay_input=False
    its charge is h = v - v / tau + x, i.e. decay = 1 - 1/tau. Its sigmoid surrogate stands in
    for our rectangular one (same elementwise cost; all its fused implementations support it).
    SpikingJelly 2.0 picks its implementation from $SJ_LIF_CUDA_IMPLEMENTATION, not an argument."""
    from spikingjelly.activation_based import surrogate

    return dict(tau=1.0 / (1.0 - cfg.tau_decay), decay_input=False, v_threshold=cfg.v_threshold,
                v_reset=cfg.v_reset if cfg.reset is Reset.hard else None,
                detach_reset=cfg.detach_reset, surrogate_function=surrogate.Sigmoid())
