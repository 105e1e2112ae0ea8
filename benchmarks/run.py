"""`make bench`: run every benchmark this machine can run, then write one markdown summary.

Runs, each as its own process (``python -m benchmarks.<name>``, i.e. the module's ``main()``):

- ``lif``: the LIF op, on CUDA when present, else on CPU;
- ``loader``: the FFCV ImageNet pipeline against torchvision, with one decode worker per core;
- ``train_step``: the training step of the spiking ResNets against SpikingJelly and the ANN
  (CUDA when present, else CPU with small batches).

A separate process per benchmark keeps one benchmark's threads, CUDA context and memory out of
the next one's figures, and turns a crash into a failed entry instead of the end of the run.
The summary goes to ``benchmarks/results/SUMMARY-<machine>.md``: per benchmark its status,
duration, results file and table (the output tail when it failed), and the cross-benchmark
ratio of issue 8 (FFCV images/s over the trainer's ResNet-34 T=4 images/s).

    python -m benchmarks.run                 # everything, CPU-friendly settings on a CPU machine
    python -m benchmarks.run --quick         # smoke run of everything
    python -m benchmarks.run --benchmarks train_step --results-dir /tmp/bench

Exit code 0 when every benchmark succeeded, 1 when one failed (the summary is written anyway).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import train_step

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
OUTPUT_TAIL_LINES = 40


@dataclass
class Context:
    """What a benchmark's arguments depend on."""

    cuda: bool
    quick: bool
    machine: str
    results_dir: Path


@dataclass
class Benchmark:
    name: str
    argv: Callable[[Context], list[str]]            # arguments of its main()
    results: Callable[[Context], list[Path]]        # files it writes
    table: Callable[[dict], str]                    # markdown for one results file


def _scalar(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):  # shapes as 4x16x64; short series as [1.2, 1.3]
        if all(isinstance(v, int) for v in value):
            return "x".join(map(str, value))
        return "[" + ", ".join(map(_scalar, value)) + "]"
    return str(value)


def generic_table(rows: list[dict]) -> str:
    """Markdown table of a list of flat dicts; columns: scalar fields, in order of appearance."""
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in columns and not isinstance(value, dict) and not (
                    isinstance(value, list) and len(value) > 4):
                columns.append(key)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_scalar(row[c]) if c in row else "-" for c in columns) + " |"
              for row in rows]
    return "\n".join(lines)


def lif_table(report: dict) -> str:
    return generic_table(report["results"])


def loader_table(report: dict) -> str:
    # {"loader name": {metric: value}} -> one row per loader
    return generic_table([{"loader": name, **metrics} for name, metrics in report["results"].items()])


def train_step_table(report: dict) -> str:
    lines = [train_step.markdown_table(report), "", "Issue 8 targets:", ""]
    lines += [f"- `{name}`: {json.dumps(check)}" for name, check in report.get("targets", {}).items()
              if isinstance(check, dict)]
    if "applies_to" in report.get("targets", {}):
        lines += ["", f"(targets apply to {report['targets']['applies_to']})"]
    return "\n".join(lines)


def _lif_devices(ctx: Context) -> list[str]:
    # On a GPU machine the CUDA figures are the ones that matter.
    return ["cuda"] if ctx.cuda else ["cpu"]


BENCHMARKS = [
    Benchmark(
        "lif",
        argv=lambda c: ["--devices", *_lif_devices(c), "--out", str(c.results_dir)]
        + (["--repeats", "3", "--no-compile"] if c.quick else []),
        results=lambda c: [c.results_dir / f"lif-{c.machine}.json"],
        table=lif_table,
    ),
    Benchmark(
        "loader",
        argv=lambda c: ["--workers", str(os.cpu_count() or 1), "--machine", c.machine,
                        "--out", str(c.results_dir / f"loader-{c.machine}.json")]
        + (["--images", "1000", "--rounds", "1"] if c.quick else []),
        results=lambda c: [c.results_dir / f"loader-{c.machine}.json"],
        table=loader_table,
    ),
    Benchmark(
        "train_step",
        argv=lambda c: ["--machine", c.machine,
                        "--out", str(c.results_dir / f"train_step-{c.machine}.json")]
        + (["--quick"] if c.quick else ["--compile"] if c.cuda else []),
        results=lambda c: [c.results_dir / f"train_step-{c.machine}.json"],
        table=train_step_table,
    ),
]


def run_benchmark(bench: Benchmark, ctx: Context, timeout_s: float) -> dict:
    """Run one benchmark's main() in a child process, echoing its output; returns its status,
    duration, output tail and results files."""
    cmd = [sys.executable, "-m", f"benchmarks.{bench.name}", *bench.argv(ctx)]
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    started_at, start = time.time(), time.perf_counter()
    timed_out = threading.Event()
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        def stop() -> None:  # our own child, by its handle
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout_s, stop)
        timer.start()
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
                tail.append(line.rstrip("\n"))
        finally:
            timer.cancel()
            rc = proc.wait()
    if timed_out.is_set():
        tail.append(f"[stopped after the {timeout_s:.0f} s timeout]")
    # Only files this run wrote count (an older result of the same name may be there).
    files = [p for p in bench.results(ctx) if p.is_file() and p.stat().st_mtime >= started_at - 1]
    return {"command": " ".join(["python", *cmd[1:]]), "rc": rc, "tail": list(tail),
            "duration_s": round(time.perf_counter() - start, 1), "files": files,
            "ok": rc == 0 and len(files) == len(bench.results(ctx))}


def summary(ctx: Context, statuses: dict[str, dict]) -> str:
    """The markdown summary of this run."""
    lines = [f"# Benchmarks on {ctx.machine}", "",
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}, "
             f"{'CUDA: ' + torch.cuda.get_device_name() if ctx.cuda else 'CPU only'}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}"
             f"{', quick mode' if ctx.quick else ''}; 1-minute load average now "
             f"{os.getloadavg()[0]:.2f}.", ""]
    reports: dict[str, dict] = {}
    for bench in BENCHMARKS:
        if bench.name not in statuses:
            continue
        st = statuses[bench.name]
        lines += [f"## {bench.name}", "",
                  f"`{st['command']}`: {'ok' if st['ok'] else 'FAILED (exit code %d)' % st['rc']}"
                  f" in {st['duration_s']:.0f} s", ""]
        for path in st["files"]:
            lines += [f"Results: `{path.relative_to(REPO) if path.is_relative_to(REPO) else path}`", ""]
            try:
                report = json.loads(path.read_text())
                reports[bench.name] = report
                lines += [bench.table(report), ""]
            except Exception as err:  # a changed results format must not lose the other tables
                lines += [f"(could not tabulate {path.name}: {type(err).__name__}: {err})", ""]
        if not st["ok"]:
            lines += ["Output tail:", "", "```", *st["tail"], "```", ""]
    lines += ["## Loader vs trainer (issue 8)", "", feed_ratio(reports), ""]
    return "\n".join(lines)


def feed_ratio(reports: dict[str, dict]) -> str:
    """FFCV train-pipeline images/s over the spiking ResNet-34 T=4 training step's images/s
    (issue 8: >= 4 on a 16-core GPU machine). The loader row is ffcv_proportion_uint8: what the
    CPU does when it feeds a GPU (the GPU normalises)."""
    try:
        ffcv = reports["loader"]["results"]["ffcv_proportion_uint8"]["images_per_s_best"]
        step = next(r for r in reports["train_step"]["results"]
                    if r["status"] == "ok" and r["impl"] == "spikescale"
                    and r["model"] == "spiking_resnet34" and r["T"] == 4
                    and r["checkpointing"] == "none" and r["precision"] == "bf16")
    except (KeyError, StopIteration, TypeError):
        return ("Not computed: needs the loader's ffcv_proportion_uint8 and train_step's ResNet-34 "
                "T=4 bf16 rows.")
    return (f"FFCV (ffcv_proportion_uint8) {ffcv:.0f} images/s / spiking ResNet-34 T=4 bf16 "
            f"{step['images_per_s']:.1f} images/s = **{ffcv / step['images_per_s']:.1f}x** "
            f"(target >= 4 on a 16-core GPU machine).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke settings for every benchmark")
    parser.add_argument("--benchmarks", nargs="+", choices=[b.name for b in BENCHMARKS],
                        default=[b.name for b in BENCHMARKS])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--timeout", type=float, default=3 * 3600,
                        help="seconds one benchmark may run before it is stopped and reported")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    ctx = Context(cuda=cuda, quick=args.quick, machine=train_step.machine_name("cuda" if cuda else "cpu"),
                  results_dir=args.results_dir.resolve())
    ctx.results_dir.mkdir(parents=True, exist_ok=True)
    statuses = {b.name: run_benchmark(b, ctx, args.timeout) for b in BENCHMARKS if b.name in args.benchmarks}
    path = ctx.results_dir / f"SUMMARY-{ctx.machine}.md"
    path.write_text(summary(ctx, statuses))
    print(f"\nwrote {path}")
    failed = [name for name, st in statuses.items() if not st["ok"]]
    if failed:
        print(f"failed: {', '.join(failed)} (see the summary)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
