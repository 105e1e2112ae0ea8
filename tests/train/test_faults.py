"""The fault matrix of issue #16, black-box on the demo (digits, tiny model, 2 epochs of 44 steps,
a checkpoint every step, `run.deterministic=true`): whatever happens to a run, it ends with the
weights, optimizer state and logged metric history of one that never stopped.

(a) SIGKILL at five random steps of one run, each resumed; every sample trained once per epoch,
    in the uninterrupted order (the samples are recorded: tests/train/recording_trainer.py);
(b) the newest checkpoint zeroed: the previous one is loaded, with one warning line;
(c) the disk fills while a checkpoint is written (a small tmpfs);
(d) the MLflow server killed mid-run and restarted;
(e) SIGUSR2 during the evaluation at an epoch end, and during a checkpoint write;
(f) one of two ranks (started by hand, as srun starts them) frozen by SIGSTOP, or stuck alive in
    native code holding the GIL: every rank ends within `train.hang_timeout_s`, one line names the
    rank that stopped and the last step all finished, exit code 3, and the rerun resumes;
and, in (a) and (e), that a mid-epoch resume neither repeats nor skips a sample.
One SIGKILL + resume, a truncated checkpoint on its own and a server outage under the Tracker
alone are tested in test_resume.py, test_checkpoints.py and test_mlflow_server.py.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.train.mlflow_fixtures import MlflowServer
from tests.train.test_reproducible import assert_identical, final_state
from tests.train.trainrun import DEMO, Started, free_port, train, train_env
from train import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow

BATCH = 32  # the demo config's
STEPS_PER_EPOCH = 44  # 1437 training digits // BATCH
EPOCHS = 2
TIMING_METRICS = ("train/images_per_s",)  # values depend on the clock: compared by step only

def run_args(root: Path, digits: Path, *extra: str) -> list[str]:
    # val_batch_size=1 stretches each evaluation to ~2 s, the window test (e) signals into.
    return [f"run.root={root}", f"data.path={digits}", "run.name=repro", f"optim.epochs={EPOCHS}",
            "data.num_workers=1", "run.deterministic=true", "train.checkpoint_every_steps=1",
            "train.keep_checkpoints=2", "tracking.log_every_steps=1", "data.val_batch_size=1", *extra]


def checkpoints(root: Path) -> Path:
    return root / "repro" / "checkpoints"


def checkpoint_steps(root: Path) -> list[int]:
    """The committed checkpoints' steps: a step exists once its manifest is written."""
    return sorted(int(p.name[5:14]) for p in checkpoints(root).glob("step-*.json"))


def histories(uri: str) -> dict[str, list[tuple[int, float | None]]]:
    """key -> sorted (step, value) of every metric of the only run of experiment 'demo' at `uri`."""
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    run_id = runs[0].info.run_id
    return {key: sorted((m.step, None if key in TIMING_METRICS else m.value)
                        for m in client.get_metric_history(run_id, key))
            for key in runs[0].data.metrics}


def store(root: Path) -> str:
    return f"sqlite:///{root}/mlflow.db"


def resumed_from(stdout: str) -> tuple[str, int, int, int]:
    """(checkpoint name, epoch, batch, step) of the trainer's "resumed from" line."""
    m = re.search(r"resumed from (\S+): epoch (\d+), batch (\d+), step (\d+)", stdout)
    assert m, f"no 'resumed from' line in:\n{stdout[-2000:]}"
    return m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))


Sample = tuple[int, int, tuple[str, ...]]  # epoch, batch, "index:hash" of each sample


def recorded(log: Path) -> list[Sample]:
    """The batches a process recorded, without a last line cut short by SIGKILL."""
    text = log.read_text() if log.exists() else ""
    lines = text.split("\n")[:-1]  # whatever follows the last newline is incomplete
    return [(int(e), int(b), tuple(items)) for e, b, *items in (line.split() for line in lines)]


def stitched(parts: list[tuple[list[Sample], tuple[int, int] | None]]) -> list[Sample]:
    """What a run stopped and resumed trained on: each process's batches, minus those of the
    process before it at or after the (epoch, batch) the next one resumed from."""
    seen: list[Sample] = []
    for batches, resumed_at in parts:
        if resumed_at is not None:
            seen = [s for s in seen if (s[0], s[1]) < resumed_at]
        seen += batches
    return seen


class TrainProcess:
    """`python -m train` forked from the warm server (tests/train/trainrun.py), its stdout read
    as it comes; with `samples`, through tests/train/recording_trainer.py writing to that file."""

    started: list["TrainProcess"] = []  # for `no_stray_trainers`

    def __init__(self, args: list[str], workdir: Path, samples: Path | None = None,
                 env: dict[str, str] | None = None, module: str | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        env = {**train_env(), **(env or {})}
        if samples is not None:
            env["SAMPLES_LOG"] = str(samples)
        module = module or ("train" if samples is None else "tests.train.recording_trainer")
        self.proc = Started(module, ["--config", DEMO, *args], env)
        self.lines: list[tuple[float, str]] = []  # (time.monotonic() it was read, line)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        TrainProcess.started.append(self)

    def _read(self) -> None:
        """Tail the child's stdout file until the child has exited and the file is read."""
        with open(self.proc.stdout_path, "a+") as f:
            f.seek(0)
            partial = ""
            while True:
                exited = self.proc.poll() is not None
                chunk = f.read()
                partial += chunk
                *complete, partial = partial.split("\n")
                now = time.monotonic()
                self.lines.extend((now, line) for line in complete)
                if exited and not chunk:
                    break
                if not chunk:
                    time.sleep(0.005)

    @property
    def stdout(self) -> str:
        return "\n".join(line for _, line in self.lines)

    @property
    def stderr(self) -> str:
        return self.proc.output()[1]

    def wait_for_line(self, pattern: str, timeout: float = 300) -> float:
        """When the first stdout line matching `pattern` was read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if re.search(pattern, line):
                    return t
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.01)
        raise AssertionError(f"no line matching {pattern!r} (exit code {self.proc.poll()}):\n"
                             f"{self.stdout[-2000:]}\n{self.stderr[-3000:]}")

    def wait_for_checkpoint(self, root: Path, min_step: int, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            steps = checkpoint_steps(root)
            if steps and steps[-1] >= min_step:
                return steps[-1]
            time.sleep(0.005)
        raise AssertionError(f"no checkpoint at step >= {min_step} (exit code {self.proc.poll()}):\n"
                             f"{self.stdout[-2000:]}\n{self.stderr[-3000:]}")

    def pause(self) -> None:
        """SIGSTOP, returning once every thread of the process is stopped."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()[0]
            if state in ("T", "t"):
                return
            time.sleep(0.001)
        raise AssertionError("the trainer did not stop on SIGSTOP")

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=60)
        self._reader.join(timeout=60)

    def finish(self, timeout: float = 600) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(timeout=60)
        return code


@pytest.fixture(autouse=True)
def no_stray_trainers():
    """A test that fails half-way leaves no trainer running (or stopped) behind."""
    yield
    while TrainProcess.started:
        run = TrainProcess.started.pop()
        if run.proc.poll() is None:
            run.kill()


@dataclass
class Reference:
    root: Path
    state: dict[str, torch.Tensor]
    history: dict[str, list[tuple[int, float | None]]]
    samples: list[Sample]


@pytest.fixture(scope="module")
def reference(digits_dir, tmp_path_factory) -> Reference:
    """The uninterrupted run every fault is compared with."""
    root = tmp_path_factory.mktemp("reference")
    run = TrainProcess(run_args(root, digits_dir), root, samples=root / "samples.txt")
    assert run.finish() == 0, run.stderr[-3000:]
    samples = recorded(root / "samples.txt")
    for epoch in range(EPOCHS):  # the recording itself: every batch once, no sample twice
        batches = [s for s in samples if s[0] == epoch]
        assert [b for _, b, _ in batches] == list(range(STEPS_PER_EPOCH))
        indices = [item.split(":")[0] for _, _, items in batches for item in items]
        assert len(indices) == len(set(indices)) == STEPS_PER_EPOCH * BATCH
    return Reference(root, final_state(root), histories(store(root)), samples)


def assert_as_uninterrupted(root: Path, reference: Reference, uri: str | None = None) -> None:
    """The newest checkpoint's tensors and the logged metric history are the reference's."""
    assert_identical(final_state(root), reference.state)
    history = histories(uri or store(root))
    assert history.keys() == reference.history.keys()
    differ = {k: (history[k], reference.history[k]) for k in history if history[k] != reference.history[k]}
    assert not differ, "metric histories differ, (step, value) here vs uninterrupted: " + "; ".join(
        f"{k}: {[p for p in a if p not in b][:3]} vs {[p for p in b if p not in a][:3]}"
        for k, (a, b) in differ.items())


def test_killed_at_five_random_steps_and_resumed_each_time_ends_as_never_stopped_seeing_each_sample_once(
        reference, digits_dir, tmp_path):
    """Each resume line names the newest checkpoint on disk when the process was killed, and the
    batches trained on, stitched across the six processes, are the uninterrupted run's: no
    sample repeated or skipped. The kills land anywhere in a step or a checkpoint write."""
    root, args = tmp_path / "runs", run_args(tmp_path / "runs", digits_dir)
    total = EPOCHS * STEPS_PER_EPOCH
    kill_after = sorted(random.Random().sample(range(2, total - 1), 5))
    parts, newest = [], None
    for n, target in enumerate([*kill_after, None]):
        run = TrainProcess(args, tmp_path, samples=tmp_path / f"samples-{n}.txt")
        if target is not None:
            run.wait_for_checkpoint(root, max(target, (newest or 0) + 1))
            time.sleep(random.uniform(0, 0.2))  # a step takes ~0.15 s
            run.kill()
        else:
            assert run.finish() == 0, run.stderr[-3000:]
        resumed_at = None
        if newest is not None:
            name, epoch, batch, step = resumed_from(run.stdout)
            assert (name, step) == (f"step-{newest:09d}.pt", newest), f"kills after steps >= {kill_after}"
            resumed_at = (epoch, batch)
        parts.append((recorded(tmp_path / f"samples-{n}.txt"), resumed_at))
        newest = checkpoint_steps(root)[-1]
    assert stitched(parts) == reference.samples, f"kills after steps >= {kill_after}"
    assert not list(checkpoints(root).glob("*.tmp"))
    assert_as_uninterrupted(root, reference)


def test_a_zeroed_newest_checkpoint_is_skipped_with_one_warning_and_the_resume_line_names_the_one_loaded(
        reference, digits_dir, tmp_path):
    """A finished run whose newest checkpoint is all zero bytes (same size), rerun: it resumes
    from the previous checkpoint, trains the step again and ends as before."""
    root = tmp_path / "runs"
    shutil.copytree(reference.root, root)
    zeroed, previous = sorted(checkpoints(root).glob("step-*.pt"), reverse=True)[:2]
    zeroed.write_bytes(bytes(zeroed.stat().st_size))
    done = train(*run_args(root, digits_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    about = [line for line in done.stderr.splitlines() if zeroed.name in line]
    assert len(about) == 1 and about[0].startswith(f"warning: checkpoint {zeroed} is not usable ("), done.stderr
    assert "does not match its manifest's sha256" in about[0], done.stderr
    assert "Traceback" not in done.stderr and "UserWarning" not in done.stderr, done.stderr
    name, _, _, step = resumed_from(done.stdout)
    assert name == previous.name and step == int(previous.name[5:14])
    assert_as_uninterrupted(root, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs: room for the run directory, and a disk the test can fill."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # lazy: a killed trainer may hold it


def test_a_disk_filling_during_a_checkpoint_write_leaves_the_previous_checkpoint_and_no_partial_file(
        reference, digits_dir, small_disk, tmp_path):
    """The run directory is on a tmpfs (the MLflow store is not). The trainer is paused after a
    random checkpoint, the disk filled to 64-128 KiB of a ~660 KiB checkpoint, and it goes on:
    the next checkpoint write runs out of space. The run must stop with one line naming the disk
    (no traceback, exit code non-zero) or retry until space is freed; either way every file under
    a checkpoint name loads, and the run, once there is room, ends with the weights and optimizer
    state of an uninterrupted one."""
    root = small_disk / "runs"
    args = run_args(root, digits_dir, f"tracking.uri={store(tmp_path)}")
    run = TrainProcess(args, tmp_path)
    before = run.wait_for_checkpoint(root, random.randrange(3, STEPS_PER_EPOCH - 3))
    run.pause()
    disk = os.statvfs(small_disk)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        for _ in range((disk.f_bavail * disk.f_frsize - 64 * 1024) // 2**16):
            f.write(bytes(2**16))
    run.resume()
    try:
        code = run.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        code = None  # still running: retrying (or stuck, which freeing the disk tells)
    steps = checkpoint_steps(root)
    assert steps and steps[-1] >= before
    for path in checkpoints(root).glob("step-*.pt"):
        torch.load(path, weights_only=True)  # nothing half-written under a real name
    assert not list(checkpoints(root).glob("*.tmp")), "a partial temporary file is left on the full disk"
    filler.unlink()
    if code is None:
        assert run.finish() == 0, run.stderr[-3000:]
    else:
        resumed = train(*args)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert resumed_from(resumed.stdout)[3] == steps[-1]
    assert_identical(final_state(root), reference.state)
    if code is not None:  # it stopped: how
        run.finish()
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert code != 0 and "Traceback" not in run.stderr, f"exit code {code}:\n{run.stderr[-3000:]}"
        assert len(errors) == 1 and str(small_disk) in errors[0], run.stderr[-3000:]


def test_two_ranks_on_a_full_disk_both_stop_with_an_error_line_instead_of_waiting_at_a_barrier(
        digits_dir, small_disk, tmp_path):
    """DDP, 2 ranks, rank 0's first checkpoint write finds the disk full: rank 0 says so in one
    line naming the disk, rank 1 (which writes nothing) stops too instead of waiting for rank 0 at
    the checkpoint's barrier until the process group times out (30 min)."""
    root = small_disk / "runs"
    disk = os.statvfs(small_disk)
    with open(small_disk / "filler", "wb") as f:
        for _ in range((disk.f_bavail * disk.f_frsize - 64 * 1024) // 2**16):
            f.write(bytes(2**16))
    done = train(*run_args(root, digits_dir, f"tracking.uri={store(tmp_path)}", "optim.epochs=1"),
                 nproc=2, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, done.stderr[-3000:]
    assert any(str(small_disk) in e and "No space left" in e for e in errors), errors
    assert any("rank 0 could not write" in e for e in errors), errors
    assert not checkpoint_steps(root) and not list(checkpoints(root).glob("*.tmp"))


def test_the_mlflow_server_killed_mid_run_and_restarted_ends_with_every_metric_point_of_an_uninterrupted_run(
        reference, digits_dir, tmp_path):
    """The server is killed (process group, SIGKILL) after a random checkpoint, the trainer runs
    ten more steps with nothing answering, then is paused while the server restarts on the same
    port and store (so that it is still mid-run when the store is back), and goes on."""
    server = MlflowServer(tmp_path / "server").start()
    try:
        args = run_args(tmp_path / "runs", digits_dir, f"tracking.uri={server.uri}")
        run = TrainProcess(args, tmp_path)
        down_at = run.wait_for_checkpoint(tmp_path / "runs", random.randrange(3, STEPS_PER_EPOCH))
        server.stop()
        run.wait_for_checkpoint(tmp_path / "runs", down_at + 10)
        run.pause()
        server.start()
        run.resume()
        assert run.finish() == 0, run.stderr[-3000:]
        assert_as_uninterrupted(tmp_path / "runs", reference, server.uri)
    finally:
        server.stop()


def stop_and_resume(run: TrainProcess, root: Path, args: list[str], workdir: Path, reference: Reference,
                    written: str | None = None) -> None:
    """The signalled run exits for requeue after saving (`written`, a checkpoint name, loads);
    its resume ends as never stopped, having trained on every sample once."""
    assert run.finish() == REQUEUE_EXIT_CODE, run.stdout[-2000:] + run.stderr[-3000:]
    assert re.search(r"^SIGUSR2: checkpoint saved at step \d+", run.stdout, re.M), run.stdout[-2000:]
    if written:
        torch.load(checkpoints(root) / written, weights_only=True)
    stopped_at = checkpoint_steps(root)[-1]
    resumed = TrainProcess(args, workdir, samples=workdir / "samples-1.txt")
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    name, epoch, batch, _ = resumed_from(resumed.stdout)
    assert name == f"step-{stopped_at:09d}.pt"
    assert stitched([(recorded(workdir / "samples-0.txt"), None),
                     (recorded(workdir / "samples-1.txt"), (epoch, batch))]) == reference.samples
    assert_as_uninterrupted(root, reference)


def test_sigusr2_during_the_evaluation_at_an_epoch_end_saves_exits_for_requeue_and_resumes_exactly(
        reference, digits_dir, tmp_path):
    """Timing: the signal goes 0.3 s after the progress line of the epoch's last step, once that
    step's checkpoint is on disk; the evaluation that follows takes ~2 s (360 validation samples
    one at a time). It must precede the epoch's summary line, printed after evaluating."""
    root = tmp_path / "runs"
    args = run_args(root, digits_dir)
    run = TrainProcess(args, tmp_path, samples=tmp_path / "samples-0.txt")
    run.wait_for_line(rf"^epoch 1/{EPOCHS} step {STEPS_PER_EPOCH}/{STEPS_PER_EPOCH} ")
    run.wait_for_checkpoint(root, STEPS_PER_EPOCH)
    time.sleep(0.3)
    signalled = time.monotonic()
    run.proc.send_signal(signal.SIGUSR2)
    summary = run.wait_for_line(rf"^epoch 1/{EPOCHS}  train loss")
    assert summary > signalled, "the signal came after the evaluation: make the evaluation longer"
    stop_and_resume(run, root, args, tmp_path, reference)


def test_sigusr2_during_a_checkpoint_write_saves_exits_for_requeue_and_resumes_exactly(reference, digits_dir,
                                                                                      tmp_path):
    """Timing: the test polls for the next checkpoint's temporary file and SIGSTOPs the trainer
    when it sees it; if the file is still there and not yet renamed, the trainer is inside the
    write, and SIGUSR2 is sent before SIGCONT (else it goes on and the next write is tried)."""
    root = tmp_path / "runs"
    args = run_args(root, digits_dir)
    run = TrainProcess(args, tmp_path, samples=tmp_path / "samples-0.txt")
    newest = run.wait_for_checkpoint(root, random.randrange(3, EPOCHS * STEPS_PER_EPOCH - 20))
    for _ in range(40):
        name = f"step-{newest + 1:09d}.pt"
        tmp = checkpoints(root) / f"{name}.tmp"
        while not tmp.exists() and run.proc.poll() is None:
            pass  # the write takes a few ms: no sleep
        assert run.proc.poll() is None, "the run ended before a checkpoint write was caught"
        run.pause()
        inside = tmp.exists() and not (checkpoints(root) / name).exists()
        if inside:
            run.proc.send_signal(signal.SIGUSR2)
        run.resume()
        if inside:
            break
        newest = run.wait_for_checkpoint(root, newest + 1)
    else:
        pytest.fail("never caught the trainer inside a checkpoint write in 40 tries")
    stop_and_resume(run, root, args, tmp_path, reference, written=name)


HANG_S = 4  # train.hang_timeout_s of the hang tests


def start_ranks(args: list[str], workdir: Path, world: int = 2, module: str | None = None,
                env: dict[str, str] | None = None) -> list[TrainProcess]:
    """`world` ranks of one DDP job, each started by hand with its RANK/WORLD_SIZE as srun does."""
    job = {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **(env or {})}
    return [TrainProcess(args, workdir / f"rank{r}", env={**job, "RANK": str(r), "LOCAL_RANK": str(r)},
                         module=module) for r in range(world)]


def hang_args(root: Path, digits: Path, tmp_path: Path) -> list[str]:
    return run_args(root, digits, "train.strategy=ddp", f"train.hang_timeout_s={HANG_S}", "optim.epochs=1",
                    "data.val_batch_size=64", f"tracking.uri={store(tmp_path)}")


def the_hang_line(run: TrainProcess) -> tuple[str, int]:
    """(the ranks named, the last step all finished) of the one line the watchdog printed."""
    lines = [line for line in run.stderr.splitlines() if "stopped making progress" in line]
    assert len(lines) == 1, run.stderr[-3000:]
    m = re.fullmatch(r"error: rank (\S+) stopped making progress: no training step for 4 s \(train.hang_timeout_s\); "
                     r"the last step every rank finished is (\d+); exiting with 3 for requeue", lines[0])
    assert m, lines[0]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    return m.group(1), int(m.group(2))


def test_a_rank_frozen_by_sigstop_ends_the_job_within_the_hang_timeout_naming_it_and_the_rerun_resumes(
        digits_dir, tmp_path):
    root, args = tmp_path / "runs", hang_args(tmp_path / "runs", digits_dir, tmp_path)
    rank0, rank1 = start_ranks(args, tmp_path)
    frozen_after = rank0.wait_for_checkpoint(root, 3)
    rank1.pause()
    frozen = time.monotonic()
    assert rank0.finish(timeout=60) == REQUEUE_EXIT_CODE, rank0.stderr[-3000:]
    assert time.monotonic() - frozen < HANG_S + 6  # the timeout, then 2 s to see which rank is still
    named, finished = the_hang_line(rank0)
    assert named == "1" and finished >= frozen_after
    rank1.kill()  # what srun --kill-on-bad-exit and torchrun do to the rank left behind
    newest = checkpoint_steps(root)[-1]
    again = start_ranks(args, tmp_path / "again")
    again[0].wait_for_line(r"^resumed from ", timeout=120)
    assert resumed_from(again[0].stdout)[3] == newest  # and on it trains (exactness: the kill tests above)


def test_a_rank_stuck_alive_holding_the_gil_ends_by_itself_and_the_other_names_it(digits_dir, tmp_path):
    root, args = tmp_path / "runs", hang_args(tmp_path / "runs", digits_dir, tmp_path)
    rank0, rank1 = start_ranks(args, tmp_path, module="tests.train.hanging_trainer",
                               env={"HANG_RANK": "1", "HANG_AT_STEP": "3"})
    rank0.wait_for_checkpoint(root, 3)
    stuck = time.monotonic()  # rank 1 stops entering collectives from here on
    assert rank0.finish(timeout=60) == REQUEUE_EXIT_CODE, rank0.stderr[-3000:]
    assert rank1.finish(timeout=60) not in (0, None)
    assert time.monotonic() - stuck < HANG_S + 10 + 5  # both ended: rank 1 by faulthandler's thread
    assert the_hang_line(rank0) == ("1", 3)
    assert "Timeout (0:00:14)!" in rank1.stderr  # its stacks, dumped as it ended
