"""Images/s and peak memory of one training step of the spiking ResNets (not a test).

A step is what the trainer does per batch: forward (under autocast for bf16/fp16), cross-entropy
loss, backward (through a GradScaler for fp16), SGD step (momentum 0.9, weight decay 1e-4),
``zero_grad(set_to_none=True)``. Measured side by side in one run, on random data already on
the device:

- ``spikescale``: ``timm.create_model("spiking_resnet34", T, num_classes=1000)`` at 224 px and
  ``spiking_resnet19`` (10 classes) at 32 px, for T in {1, 4, 6}, each activation-checkpointing
  mode (``none``, ``blocks``, ``blocks+time`` via ``model.set_checkpointing``) and precision (fp32, bf16
  autocast, and fp16 autocast on CUDA);
- ``spikingjelly``: SpikingJelly 2.0's ``spiking_resnet34`` with multi-step ``LIFNode`` (our
  neuron's decay, threshold and hard reset), same batch and T, direct encoding by repeating the
  image T times as its examples do, and its default LIF implementation (``auto``: native CUDA
  kernels when built from source, else Triton, else PyTorch; its CPU op on CPU). Recorded as
  unavailable, with the reason, if ``spikingjelly`` does not import;
- ``spikescale`` with ``compiled``: with ``--compile [MODE ...]``, our configuration with those
  checkpointing modes (default ``none``) after ``model.compile()`` (Inductor, as
  ``train.compile: true`` runs it: the whole model for ``none``, each block alone otherwise);
  compile time is in ``warmup_s``, and ``speed_vs_eager`` compares it with the eager row;
- ``torchvision_ann`` (CUDA only): torchvision's ResNet-34 at batch T x B; its images/s / T is
  the ANN-equivalent bound of the spiking ResNet-34 (same convolution work per step).

Ratios are taken against anchors measured in the same run: our ``none``/fp32 configuration, our
``none`` configuration at the same precision (memory), SpikingJelly and the ANN bound.

    python -m benchmarks.train_step                      # CUDA if present, else CPU
    python -m benchmarks.train_step --device cpu --quick  # smoke run: T=4, tiny batches
    python -m benchmarks.train_step --device cuda --steps 1 2 4 6 8 16 --precisions bf16

Timing: ``rounds`` rounds of ``iters`` back-to-back steps after ``warmup`` steps, with
``torch.cuda.synchronize()`` around each round on CUDA; the headline is the best round (least
disturbed by other load), the median round is reported too. Each configuration runs in a fresh
worker process, so that its peak memory is its own and no allocator or autotuner state carries
over from the one before. Results go to
``benchmarks/results/train_step-<machine>.json``; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil
import timm
import torch
import torch.nn.functional as F
from torch import nn

import models.zoo  # noqa: F401  (registers the spiking ResNets with timm)
from benchmarks.common import machine, machine_name, spikingjelly_lif_kwargs
from models.checkpointing import CHECKPOINTING_MODES
from models.neurons import LIF, NeuronConfig, neuron_impl_for

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STEPS = (1, 4, 6)
QUICK_STEPS = (4,)
CHECKPOINTING = CHECKPOINTING_MODES  # what SpikingResNet.set_checkpointing offers
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
MiB = 2**20


@dataclass(frozen=True)
class Workload:
    """A spiking model at its benchmark resolution, with batch sizes per situation."""

    model: str
    image_px: int
    num_classes: int
    batch: dict[str, int]       # "cpu", "cuda", "quick" -> images per step
    anchors: bool               # also measure SpikingJelly and the torchvision ANN


WORKLOADS = {
    w.model: w
    for w in (
        # CPU batches keep the whole default CPU run in a few minutes on 2 cores.
        Workload("spiking_resnet34", 224, 1000, {"cpu": 2, "cuda": 32, "quick": 1}, anchors=True),
        Workload("spiking_resnet19", 32, 10, {"cpu": 4, "cuda": 128, "quick": 2}, anchors=False),
    )
}


@dataclass(frozen=True)
class Job:
    """One configuration to measure; plain data so it can be sent to a worker process."""

    impl: str                   # "spikescale" | "spikingjelly" | "torchvision_ann"
    model: str                  # workload name (the spiking model it stands beside)
    T: int
    batch: int                  # images per step (T x B for the ANN)
    image_px: int
    num_classes: int
    checkpointing: str
    precision: str
    backend: str                # SpikingJelly's requested LIF implementation, "cudnn" for the
                                # ANN; ours: filled in with the neuron implementation it used
    device: str
    warmup: int
    rounds: int
    iters: int
    compiled: bool = False      # ours under torch.compile (Inductor)
    channels_last: bool = False  # images and conv weights NHWC in memory (as the CUDA loader delivers)


# ---------------------------------------------------------------- models and their steps


# SpikingJelly 2.0 reads its LIF implementation choice from this variable when it is imported.
SJ_IMPLEMENTATION_ENV = "SJ_LIF_CUDA_IMPLEMENTATION"
SJ_IMPLEMENTATION = "auto"  # its default, whatever the calling environment says


def _place(model: nn.Module, job: Job) -> None:
    """To the job's device, conv weights channels-last when the job's images are (every
    implementation alike, as the trainer does on CUDA)."""
    model.to(job.device, memory_format=torch.channels_last if job.channels_last else torch.preserve_format)


def _build(job: Job) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], Callable[[], None]]:
    """(model on the device, forward images [B, C, H, W] -> logits [B, classes], per-step
    cleanup)."""
    if job.impl == "spikescale":
        model = timm.create_model(job.model, T=job.T, num_classes=job.num_classes)
        model.set_checkpointing(job.checkpointing)
        _place(model, job)
        if job.compiled:
            model.compile()  # in place, as the trainer does
        return model, model, lambda: None
    if job.impl == "spikingjelly":
        os.environ[SJ_IMPLEMENTATION_ENV] = job.backend  # the worker process is the job's own
        from spikingjelly.activation_based import functional, neuron
        from spikingjelly.activation_based.model import spiking_resnet

        model = spiking_resnet.spiking_resnet34(
            spiking_neuron=neuron.LIFNode, num_classes=job.num_classes,
            **spikingjelly_lif_kwargs(NeuronConfig()))
        functional.set_step_mode(model, "m")
        _place(model, job)

        def forward(x: torch.Tensor) -> torch.Tensor:
            # Direct encoding as in SpikingJelly's examples: the image at every step, [T, B, ...].
            return model(x.unsqueeze(0).repeat(job.T, 1, 1, 1, 1)).mean(0)

        # Its neurons keep the membrane on the module: every training loop resets it per batch.
        return model, forward, lambda: functional.reset_net(model)
    if job.impl == "torchvision_ann":
        import torchvision

        model = torchvision.models.resnet34(num_classes=job.num_classes)
        _place(model, job)
        return model, model, lambda: None
    raise ValueError(f"unknown implementation {job.impl!r}")


def _neuron_probe(model: nn.Module, found: dict) -> Callable[[], None]:
    """Record which LIF implementation and input dtype the first neuron layer of our model
    gets in the first step (dispatch depends on device and autocast dtype); returns the
    hook's remover."""
    lif = next(m for m in model.modules() if isinstance(m, LIF))

    def hook(module: LIF, args: tuple) -> None:
        x = args[0]
        found.setdefault("backend", neuron_impl_for(x, module.spec))
        found.setdefault("neuron_input_dtype", str(x.dtype).removeprefix("torch."))

    return lif.register_forward_pre_hook(hook).remove


def _spikingjelly_selected(device: str) -> str | None:
    """The LIF implementation SpikingJelly picked on CUDA (diagnostic only: it reads a private
    attribute, so any failure just leaves it out)."""
    if device != "cuda":
        return None
    try:
        from spikingjelly._ops.lif import _selection

        return _selection._get_cuda_selection(torch.device("cuda")).name
    except Exception:
        return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _row(job: Job) -> dict:
    """The fields of a result row that say which configuration it is."""
    return {k: v for k, v in asdict(job).items() if k not in ("device", "warmup", "rounds", "iters")}


def run_job(job: Job) -> dict:
    """Measure one configuration in this process; returns its result row (``status`` "ok" or
    "error" with the message, never raises)."""
    row = _row(job)
    try:
        row.update(_measure(job))
        row["status"] = "ok"
    except Exception as err:  # one failing configuration (e.g. out of memory) must not end the run
        row["status"] = "error"
        row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
    # Other processes compete for a shared machine's cores: the load while this row ran.
    row["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return row


def _measure(job: Job) -> dict:
    torch.manual_seed(0)
    device = job.device
    if device == "cuda":
        # Autotuned convolutions for every model alike, as a training run would use.
        torch.backends.cudnn.benchmark = True
    model, forward, after_step = _build(job)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    dtype = PRECISIONS[job.precision]
    scaler = torch.amp.GradScaler(device, enabled=job.precision == "fp16")
    x = torch.randn(job.batch, 3, job.image_px, job.image_px, device=device)
    if job.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, job.num_classes, (job.batch,), device=device)

    def step() -> None:
        autocast = (torch.autocast(device, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            loss = F.cross_entropy(forward(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        after_step()

    info: dict = {}
    if job.impl == "spikescale":
        remove = _neuron_probe(model, info)
    _sync(device)
    # Memory before the first step: weights, batch (momentum buffers and gradients come with
    # the first step and are part of what the step costs).
    static = torch.cuda.memory_allocated() if device == "cuda" else psutil.Process().memory_info().rss
    start = time.perf_counter()
    for i in range(job.warmup):
        step()
        if i == 0 and job.impl == "spikescale":
            remove()
    _sync(device)
    info["warmup_s"] = round(time.perf_counter() - start, 2)
    if job.impl == "spikingjelly" and (selected := _spikingjelly_selected(device)):
        info["selected_implementation"] = selected
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # drop cuDNN autotuning's transient workspaces

    times = []
    cpu_start = time.process_time()
    for _ in range(job.rounds):
        _sync(device)
        start = time.perf_counter()
        for _ in range(job.iters):
            step()
        _sync(device)
        times.append((time.perf_counter() - start) / job.iters)
    cpu_per_step = (time.process_time() - cpu_start) / (job.rounds * job.iters)

    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss: KiB on Linux; the worker process is the job's own
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    best, median = min(times), statistics.median(times)
    return {
        **info,
        "step_ms_best": round(best * 1e3, 2),
        "step_ms_median": round(median * 1e3, 2),
        "images_per_s": round(job.batch / best, 2),
        "images_per_s_median": round(job.batch / median, 2),
        "cpu_ms_per_step": round(cpu_per_step * 1e3, 2),
        "peak_mem_mib": round(peak / MiB, 1),
        "step_mem_mib": round((peak - static) / MiB, 1),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    }


# ---------------------------------------------------------------- running the jobs


def run_isolated(job: Job, context) -> dict:
    """Run a job in a fresh worker process: its peak memory is then its own (no memory kept by
    an allocator from an earlier configuration hides or inflates it), no autotuner or
    SpikingJelly state carries over, and a crash costs only that job."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            return pool.submit(run_job, job).result()
    except BrokenProcessPool as err:  # killed (e.g. out of memory) or crashed
        return {**_row(job), "status": "error", "error": f"worker process died: {err}"}


def spikingjelly_status() -> dict:
    """Whether SpikingJelly 2.0's spiking_resnet34 can be built here, and its version."""
    try:
        import spikingjelly
        from spikingjelly.activation_based.model import spiking_resnet  # noqa: F401
    except Exception as err:  # ImportError, or a broken optional dependency inside it
        return {"available": False, "reason": f"import spikingjelly failed: {type(err).__name__}: {err}"}
    try:
        from importlib.metadata import version

        sj_version = version("spikingjelly")
    except Exception:
        sj_version = getattr(spikingjelly, "__version__", "unknown")
    return {"available": True, "version": sj_version, "implementation": SJ_IMPLEMENTATION}


def plan(device: str, steps: tuple[int, ...], workloads: list[Workload], precisions: list[str],
         batch_key: str, batch_override: dict[str, int], sj: dict, warmup: int, rounds: int,
         iters: int, compile_modes: tuple[str, ...] = (), channels_last: bool = False) -> list[Job]:
    """Every configuration of the run, anchors first for each (model, T, precision); a compiled
    job of ours for each checkpointing mode in ``compile_modes``."""
    jobs = []
    for w in workloads:
        batch = batch_override.get(w.model, w.batch[batch_key])
        for T in steps:
            for precision in precisions:
                common = dict(model=w.model, T=T, image_px=w.image_px, num_classes=w.num_classes,
                              precision=precision, device=device, warmup=warmup, rounds=rounds,
                              iters=iters, channels_last=channels_last)
                if w.anchors and sj["available"]:
                    jobs.append(Job("spikingjelly", batch=batch, checkpointing="none",
                                    backend=SJ_IMPLEMENTATION, **common))
                if w.anchors and device == "cuda":
                    jobs.append(Job("torchvision_ann", batch=T * batch, checkpointing="none",
                                    backend="cudnn", **common))
                jobs += [Job("spikescale", batch=batch, checkpointing=c, backend="", **common)
                         for c in CHECKPOINTING]
                jobs += [Job("spikescale", batch=batch, checkpointing=c, backend="", compiled=True, **common)
                         for c in CHECKPOINTING if c in compile_modes]
    return jobs


def _key(row: dict, *fields: str) -> tuple:
    return tuple(row[f] for f in fields)


def add_ratios(rows: list[dict]) -> None:
    """Ratios against the anchors measured in the same run (missing anchors are left out):

    - ``speed_vs_none_fp32``: images/s over our ``none``/fp32 run of the same model and T;
    - ``mem_vs_none``: peak step memory over our ``none`` run at the same model, T, precision;
    - ``speed_vs_spikingjelly_<backend>``: images/s over SpikingJelly's at the same T, precision;
    - ``speed_vs_ann_bound``: images/s over the ANN's images/s at batch T x B divided by T;
    - ``speed_vs_eager`` (compiled rows): images/s over the eager row of the same configuration.

    The ``none`` anchors are the eager rows.
    """
    ok = [r for r in rows if r["status"] == "ok"]
    ours = {_key(r, "model", "T", "checkpointing", "precision"): r for r in ok
            if r["impl"] == "spikescale" and not r.get("compiled")}
    sj = {_key(r, "model", "T", "precision", "backend"): r for r in ok if r["impl"] == "spikingjelly"}
    ann = {_key(r, "model", "T", "precision"): r for r in ok if r["impl"] == "torchvision_ann"}
    sj_backends = sorted({r["backend"] for r in sj.values()})
    for r in ok:
        ratios = {}
        if r["impl"] == "spikescale":
            base = ours.get((r["model"], r["T"], "none", "fp32"))
            if base:
                ratios["speed_vs_none_fp32"] = r["images_per_s"] / base["images_per_s"]
            base = ours.get((r["model"], r["T"], "none", r["precision"]))
            if base:
                ratios["mem_vs_none"] = r["step_mem_mib"] / base["step_mem_mib"]
            eager = ours.get(_key(r, "model", "T", "checkpointing", "precision"))
            if r.get("compiled") and eager:
                ratios["speed_vs_eager"] = r["images_per_s"] / eager["images_per_s"]
            for b in sj_backends:
                anchor = sj.get((r["model"], r["T"], r["precision"], b))
                if anchor:
                    ratios[f"speed_vs_spikingjelly_{b}"] = r["images_per_s"] / anchor["images_per_s"]
        if r["impl"] == "torchvision_ann":
            r["ann_bound_images_per_s"] = round(r["images_per_s"] / r["T"], 2)
        elif (anchor := ann.get((r["model"], r["T"], r["precision"]))) is not None:
            ratios["speed_vs_ann_bound"] = r["images_per_s"] / (anchor["images_per_s"] / r["T"])
        r["ratios"] = {k: round(v, 3) for k, v in ratios.items()}


def check_targets(rows: list[dict], device: str) -> dict:
    """Issue 8's ResNet-34 targets where this run measured what they need; ``met`` is judged on
    CUDA only (the targets are set for an H100), elsewhere the ratios are for information."""
    def ours(T: int, checkpointing: str, precision: str = "bf16", compiled: bool = False) -> dict | None:
        return next((r for r in rows if r["status"] == "ok" and r["impl"] == "spikescale"
                     and r["model"] == "spiking_resnet34" and r["T"] == T
                     and r["checkpointing"] == checkpointing and r["precision"] == precision
                     and r.get("compiled", False) == compiled), None)

    def met(ok: bool) -> bool | None:
        return ok if device == "cuda" else None

    targets = {"applies_to": "an H100 (issue 8); on other devices met is null"}
    # The speed targets take the faster of the eager and the compiled run (train.compile is a
    # config choice), and say which.
    t4 = max((r for r in (ours(4, "none"), ours(4, "none", compiled=True)) if r),
             key=lambda r: r["images_per_s"], default=None)
    with_ = "compiled" if (t4 or {}).get("compiled") else "eager"
    sj = {k: v for k, v in (t4 or {}).get("ratios", {}).items() if k.startswith("speed_vs_spikingjelly")}
    targets["resnet34_T4_bf16_vs_spikingjelly"] = (
        {"ratios": sj, "with": with_, "target": ">= 3.7", "met": met(min(sj.values()) >= 3.7)} if sj
        else {"measured": False})
    bound = (t4 or {}).get("ratios", {}).get("speed_vs_ann_bound")
    targets["resnet34_T4_bf16_vs_ann_bound"] = (
        {"ratio": bound, "with": with_, "target": ">= 0.7", "met": met(bound >= 0.7)} if bound is not None
        else {"measured": False})
    # The checkpointing target compares blocks+time with none at the same compile setting (eager
    # with eager, compiled with compiled); it is met if either pair meets it, and says which.
    pairs = []
    for compiled in (False, True):
        t6, none6 = ours(6, "blocks+time", compiled=compiled), ours(6, "none", compiled=compiled)
        if t6 and none6:
            mem = round(t6["step_mem_mib"] / none6["step_mem_mib"], 3)
            speed = round(t6["images_per_s"] / none6["images_per_s"], 3)
            pairs.append({"mem_vs_none": mem, "speed_vs_none": speed,
                          "with": "compiled" if compiled else "eager", "ok": mem <= 0.4 and speed >= 0.75})
    if pairs:
        best = next((p for p in pairs if p["ok"]), pairs[0])
        targets["resnet34_T6_bf16_checkpointing"] = {
            "mode": "blocks+time", "mem_vs_none": best["mem_vs_none"], "speed_vs_none": best["speed_vs_none"],
            "with": best["with"], "target": "memory <= 0.4x and speed >= 0.75x of none",
            "met": met(best["ok"])}
    else:
        targets["resnet34_T6_bf16_checkpointing"] = {"measured": False}
    return targets


# ---------------------------------------------------------------- report


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(report: dict) -> str:
    """The results of a train_step report (as written to JSON) as a markdown table."""
    rows = report["results"]
    ratio_keys = sorted({k for r in rows for k in r.get("ratios", {})},
                        key=lambda k: (not k.startswith("speed_vs_none"), k))
    head = ["model", "T", "impl", "backend", "ckpt", "prec", "batch", "img/s", "ms/step",
            "peak MiB", "step MiB", *ratio_keys, "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ckpt = r["checkpointing"] + (" +compile" if r.get("compiled") else "")
        cells = [r["model"].removeprefix("spiking_"), str(r["T"]), r["impl"], r.get("backend") or "-",
                 ckpt, r["precision"], str(r["batch"])]
        if r["status"] != "ok":
            cells += [f"error: {r.get('error', '')[:80]}"] + [""] * (len(head) - len(cells) - 2)
        else:
            ratios = r.get("ratios", {})
            cells += [_fmt(r["images_per_s"], ".1f"), _fmt(r["step_ms_best"], ".1f"),
                      _fmt(r["peak_mem_mib"], ".0f"), _fmt(r["step_mem_mib"], ".0f")]
            cells += [_fmt(ratios.get(k)) for k in ratio_keys]
        cells.append(_fmt(r.get("load_avg_1m"), ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _batch_override(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or name not in WORKLOADS or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(
            f"expected MODEL=N with MODEL one of {', '.join(WORKLOADS)}, got {text!r}")
    return name, int(size)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON; returns 0 (a configuration that
    fails is recorded in the results, not raised)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: T in {QUICK_STEPS}, small CPU batches, 1 warm-up step, 1 timed round")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help=f"T values (default {STEPS})")
    parser.add_argument("--models", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=None,
                        help="default: fp32 bf16, plus fp16 on CUDA")
    parser.add_argument("--batch", type=_batch_override, action="append", default=[],
                        metavar="MODEL=N", help="images per step for MODEL (repeatable)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 CPU, 3 CUDA)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3)")
    parser.add_argument("--iters", type=int, default=None,
                        help="steps per timed round (default 1 CPU, 10 CUDA)")
    parser.add_argument("--machine", default=None, help="name in the results file name "
                        "(default: GPU model on CUDA, else <host>-<cores>cpu)")
    parser.add_argument("--cpu-memory", choices=["default", "live"], default="default",
                        help="live: workers use glibc's malloc with a fixed 128 KiB mmap threshold, so "
                             "freed activations go back to the OS and peak RSS follows live tensors "
                             "(memory figures closer to CUDA's; steps run slower: use for memory)")
    parser.add_argument("--memory-format", choices=["auto", "channels_last", "contiguous"], default="auto",
                        help="layout of the images and conv weights, for every implementation; auto: "
                             "channels_last on CUDA (what the trainer's CUDA loader delivers), contiguous "
                             "NCHW on CPU (what its CPU loader delivers)")
    parser.add_argument("--compile", nargs="*", choices=CHECKPOINTING, default=None, metavar="MODE",
                        help="also measure ours under torch.compile (Inductor) for these checkpointing "
                             "modes (none when no mode is named); compiling takes a minute or more per "
                             "configuration on CPU")
    parser.add_argument("--note", action="append", default=[],
                        help="recorded in the JSON notes (e.g. other load on the machine)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results/train_step-<machine>.json)")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device == "cpu" and args.precisions and "fp16" in args.precisions:
        parser.error("--precisions fp16: fp16 autocast is measured on CUDA only")
    cuda = device == "cuda"
    steps = tuple(args.steps or (QUICK_STEPS if args.quick else STEPS))
    precisions = args.precisions or (["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"])
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3 if cuda else 2)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    iters = args.iters if args.iters is not None else (2 if args.quick and cuda else 10 if cuda else 1)
    batch_key = "quick" if args.quick and not cuda else device
    channels_last = args.memory_format == "channels_last" or (args.memory_format == "auto" and cuda)
    compile_modes = () if args.compile is None else tuple(args.compile or ["none"])  # bare --compile: none
    name = args.machine or machine_name(device)
    out = args.out or RESULTS_DIR / f"train_step-{name}.json"

    sj = spikingjelly_status()
    jobs = plan(device, steps, [WORKLOADS[m] for m in args.models], precisions, batch_key,
                dict(args.batch), sj, warmup, rounds, iters, compile_modes, channels_last)
    # A forkserver starts one clean interpreter that imports the heavy modules once; each job
    # forks from it: fast, and never from a process that already runs OpenMP threads or CUDA.
    if not cuda and args.cpu_memory == "live":
        # Read by glibc when the forkserver starts; its forked workers inherit the setting. The
        # default threshold adapts upward to 32 MiB, and heap memory below it stays in the RSS.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchvision", "timm", "psutil", "models", "benchmarks.lif"])
    measure = functools.partial(run_isolated, context=context)

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows = []
    for i, job in enumerate(jobs, 1):
        row = measure(job)
        rows.append(row)
        result = (f"{row['images_per_s']:9.1f} images/s  {row['step_ms_best']:9.1f} ms  "
                  f"peak {row['peak_mem_mib']:8.0f} MiB  step {row['step_mem_mib']:8.0f} MiB"
                  if row["status"] == "ok" else row["error"])
        print(f"[{i:2d}/{len(jobs)}] {job.model} T={job.T} {job.impl}"
              f"{':' + row.get('backend', '') if row.get('backend') else ''} "
              f"{job.checkpointing}{' compiled' if job.compiled else ''} {job.precision} B={job.batch}: {result}",
              flush=True)
    add_ratios(rows)

    notes = list(args.note)
    if not sj["available"]:
        notes.append(f"SpikingJelly not measured: {sj['reason']}")
    if not cuda:
        notes.append("CPU: the torchvision ANN bound and fp16 are measured on CUDA only")
    report = {
        "benchmark": "training step: forward, cross-entropy, backward, SGD step",
        "device": device,
        "machine": {"name": name, **machine(device)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.train_step " + " ".join(argv if argv is not None else sys.argv[1:]),
        "duration_s": round(time.perf_counter() - started, 1),
        # Other processes compete for a shared machine's cores: 1-minute load before and after.
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "settings": {
            "steps": list(steps), "precisions": precisions, "checkpointing": list(CHECKPOINTING),
            "warmup": warmup, "rounds": rounds, "iters_per_round": iters,
            "optimizer": f"SGD({', '.join(f'{k}={v}' for k, v in SGD.items())})",
            "cudnn_benchmark": cuda, "quick": args.quick, "isolation": "one fresh process per row",
            "memory_format": "channels_last (images and conv weights)" if channels_last else "contiguous",
            "spikingjelly_neuron": "LIFNode multi-step, tau=1/(1-tau_decay), decay_input=False, "
                                   "our v_threshold and hard reset, sigmoid surrogate",
        },
        "timing": "images_per_s = batch / seconds per step of the best timed round "
                  "(images_per_s_median: median round); a round is iters_per_round back-to-back "
                  "steps, synchronised at both ends on CUDA; cpu_ms_per_step = user+system CPU "
                  "time of the process per timed step, all threads (on CUDA: the host-side cost "
                  "of the step)",
        "memory": ("CUDA: peak_mem_mib = torch.cuda.max_memory_allocated over the timed rounds "
                   "(weights, optimizer state, gradients, activations, workspaces); step_mem_mib = "
                   "that minus memory_allocated before the first step (weights and batch)"
                   if cuda else
                   "CPU: each configuration runs in a fresh process; peak_mem_mib = its peak RSS "
                   "(getrusage ru_maxrss, includes the Python/torch runtime); step_mem_mib = that "
                   "minus its RSS before the first step, i.e. what the steps added (momentum "
                   "buffers, gradients, activations, allocator caches)"
                   + ("; glibc MALLOC_MMAP_THRESHOLD_=131072 (--cpu-memory live): freed tensors are "
                      "unmapped, so the peak follows live memory; step times are slower than default"
                      if args.cpu_memory == "live" else "")),
        "spikingjelly": sj,
        "notes": notes,
        "targets": check_targets(rows, device),
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(report))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    # Run the copy imported under its package name, so that jobs sent to worker processes
    # pickle their functions as benchmarks.train_step.* rather than __main__.*.
    from benchmarks.train_step import main as _main

    raise SystemExit(_main())
