"""`system/*` metrics sampled by MLflow's own monitors, sent through our journal.

MLflow's `SystemMetricsMonitor` is not used as a whole: it logs on its own thread with its own
client, counts its own steps, and stops for good the first time the store does not answer.
Its CPU and GPU monitors are used; their samples become journal records at the latest training
step, so system metrics line up with the training curves and survive an outage like any metric.
"""
from __future__ import annotations

import logging

import psutil
import torch

log = logging.getLogger(__name__)


class SystemSampler:
    """Samples CPU/GPU utilisation and memory on demand (not thread-safe: one caller)."""

    def __init__(self):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        self._monitors = [CPUMonitor()]
        try:  # every NVIDIA GPU on the node, as MLflow logs them: gpu_<i>_utilization_percentage, ...
            self._monitors.append(GPUMonitor())
        except Exception as e:  # no nvidia-ml-py, or no NVML driver
            if torch.cuda.is_available():
                log.info("GPU utilisation is not sampled: %s", e)
        self._process = psutil.Process()
        # CUDA's current device is per thread: take the trainer's, here on its thread
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        psutil.cpu_percent()  # the first reading only sets the baseline for the next

    def sample(self) -> dict[str, float]:
        """{"system/<name>": value}: MLflow's keys and units (MB = 10^6 bytes), plus this
        process's resident memory and the CUDA caching allocator's figures, which MLflow lacks."""
        metrics = {}
        for monitor in self._monitors:
            monitor.collect_metrics()
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        metrics["process_rss_megabytes"] = self._process.memory_info().rss / 1e6
        if torch.cuda.is_initialized():  # never create a CUDA context for a CPU run
            device = self._cuda_device if self._cuda_device is not None else torch.cuda.current_device()
            metrics["gpu_memory_allocated_megabytes"] = torch.cuda.memory_allocated(device) / 1e6
            metrics["gpu_memory_reserved_megabytes"] = torch.cuda.memory_reserved(device) / 1e6
        return {f"system/{key}": value for key, value in metrics.items()}
