"""Forward+backward time of the LIF neuron op (not a test).

For T in {4, 6, 32}, fp32 and bf16 inputs, it times one forward and backward pass of:

- ``reference``: the eager PyTorch reference loop (``lif_multistep(..., impl="reference")``);
- ``reference_compiled``: the same loop under ``torch.compile`` (compile time reported apart);
- ``dispatch``: what ``lif_multistep`` picks by itself, when that is not the reference (e.g. a
  fused CUDA kernel registered with ``models.neurons.register_neuron_impl``);
- ``spikingjelly``: SpikingJelly's multi-step ``LIFNode`` with the same dynamics, if
  ``import spikingjelly`` works (otherwise a note says it was skipped).

on CPU, and on CUDA when present. Each row also gives the fraction of a memory roofline it
reaches: the time to move 5 tensors of the input's size and dtype (x, spikes, x-or-h saved for
backward, grad_spikes, grad_x) at the device-to-device copy bandwidth measured in the same run
(``Tensor.copy_`` of a tensor that size, read + write counted), over the measured minimum time.
Results go to ``benchmarks/results/lif-<machine>.json`` with
the machine named. Default neuron: STBP-tdBN's (decay 0.25, V_th 0.5, hard reset, rectangular).

    python -m benchmarks.lif                 # CPU (+ CUDA if available)
    python -m benchmarks.lif --devices cuda --repeats 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.common import machine, machine_name, spikingjelly_lif_kwargs
from models.neurons import REFERENCE_IMPL, LIFSpec, NeuronConfig, lif_multistep, neuron_impl_for

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STEPS = (4, 6, 32)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# [B, C, H, W] per step: a mid-network ResNet feature map, scaled to what each device runs in
# seconds (CPU: 262 k neurons per step, CUDA: 4.2 M).
SHAPES = {"cpu": (16, 64, 16, 16), "cuda": (32, 128, 32, 32)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor,
                  warmup: int, repeats: int) -> dict[str, float]:
    """Median and minimum milliseconds of ``fn(x).backward(grad)`` (the minimum is the figure
    least disturbed by other load on a shared machine)."""
    device = x.device.type
    for _ in range(warmup):
        fn(x).backward(grad)
    times = []
    for _ in range(repeats):
        x.grad = None
        _sync(device)
        start = time.perf_counter()
        fn(x).backward(grad)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"fwd_bwd_ms": round(statistics.median(times), 3), "fwd_bwd_ms_min": round(min(times), 3)}


ROOFLINE_PASSES = 5  # x, spikes, x-or-h, grad_spikes, grad_x


def copy_bandwidth(nbytes: int, device: str, repeats: int) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes`` (read + write), best of ``repeats``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(repeats + 2):  # two warm-up copies
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def add_roofline(rows: list[dict], nbytes: int, bandwidth: float) -> None:
    """Roofline time of the op (ms) and the fraction of it each row reaches, in place."""
    roofline_ms = ROOFLINE_PASSES * nbytes / bandwidth * 1e3
    for r in rows:
        r["copy_GBps"] = round(bandwidth / 1e9, 1)
        r["roofline_ms"] = round(roofline_ms, 4)
        r["roofline_fraction"] = round(roofline_ms / r["fwd_bwd_ms_min"], 3)


def _spikingjelly_fn(cfg: NeuronConfig, device: str):
    """SpikingJelly's multi-step LIF with our dynamics (or None), and a note for the report."""
    try:
        from spikingjelly.activation_based import functional, neuron
    except ImportError as err:
        return None, f"spikingjelly not importable ({err}); its LIF node was skipped"
    node = neuron.LIFNode(**spikingjelly_lif_kwargs(cfg), step_mode="m").to(device)
    note = (f"SpikingJelly implementation: ${'{'}SJ_LIF_CUDA_IMPLEMENTATION{'}'}="
            f"{os.environ.get('SJ_LIF_CUDA_IMPLEMENTATION', 'auto (its default)')}") if device == "cuda" else None

    def run(x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(node)  # SpikingJelly keeps the membrane on the module
        return node(x)

    return run, note


def bench_device(device: str, repeats: int, warmup: int, compile_: bool) -> dict:
    cfg = NeuronConfig()
    spec = LIFSpec.from_config(cfg)
    shape = SHAPES[device]
    results, notes = [], []
    load_before = os.getloadavg()[0]
    sj_fn, sj_note = _spikingjelly_fn(cfg, device)
    if sj_note:
        notes.append(sj_note)
    for steps in STEPS:
        for dtype_name, dtype in DTYPES.items():
            torch.manual_seed(0)
            x = (torch.randn(steps, *shape, device=device) * 0.5 + 0.3).to(dtype).requires_grad_()
            grad = torch.randn(steps, *shape, device=device).to(dtype)
            row = {"T": steps, "dtype": dtype_name, "shape": [steps, *shape]}
            impls: dict[str, Callable] = {
                "reference": lambda t: lif_multistep(t, cfg, impl=REFERENCE_IMPL),
            }
            chosen = neuron_impl_for(x, spec)
            if chosen != REFERENCE_IMPL:
                impls[f"dispatch:{chosen}"] = lambda t: lif_multistep(t, cfg)
            if sj_fn is not None:
                impls["spikingjelly"] = sj_fn
            rows = [
                {**row, "impl": name, **_time_fwd_bwd(fn, x, grad, warmup, repeats)}
                for name, fn in impls.items()
            ]
            if compile_:
                torch._dynamo.reset()  # each entry times its own compilation
                compiled = torch.compile(lambda t: lif_multistep(t, cfg, impl=REFERENCE_IMPL))
                start = time.perf_counter()
                compiled(x).backward(grad)
                _sync(device)
                compile_s = time.perf_counter() - start
                timing = _time_fwd_bwd(compiled, x, grad, warmup, repeats)
                rows.append({**row, "impl": "reference_compiled", **timing,
                             "compile_s": round(compile_s, 2)})
            nbytes = x.numel() * x.element_size()
            add_roofline(rows, nbytes, copy_bandwidth(nbytes, device, repeats))
            for r in rows:
                print(f"{device:4s} T={steps:2d} {dtype_name} {r['impl']:20s} "
                      f"median {r['fwd_bwd_ms']:9.2f} ms  min {r['fwd_bwd_ms_min']:9.2f} ms  "
                      f"roofline {r['roofline_fraction']:6.1%}", flush=True)
            results += rows
    return {
        "benchmark": "lif forward+backward",
        "device": device,
        "machine": machine(device),
        # Other processes compete for a shared machine's cores: 1-minute load before and after.
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "neuron": {k: getattr(v, "value", v) for k, v in vars(cfg).items()},
        "warmup": warmup,
        "repeats": repeats,
        "timing": "wall-clock milliseconds of one forward + backward (median and min); "
                  "compile_s is the first compiled call, which may hit Inductor's on-disk cache",
        "roofline": f"roofline_ms = {ROOFLINE_PASSES} passes x input bytes / copy bandwidth (copy_GBps: "
                    "best Tensor.copy_ of the input's size, read + write, same run); "
                    "roofline_fraction = roofline_ms / fwd_bwd_ms_min (target >= 0.8 on an H100)",
        "notes": notes,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None,
                        help="default: cpu, plus cuda when available")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd loop")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device is available")
    args.out.mkdir(parents=True, exist_ok=True)
    for device in devices:
        report = bench_device(device, args.repeats, args.warmup, not args.no_compile)
        path = args.out / f"lif-{machine_name(device)}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
