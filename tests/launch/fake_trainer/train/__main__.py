"""Counts steps; `<run dir>/steps-<rank>.log` gets one line per step actually run (so a repeated
or skipped step after resume is visible), `state-<rank>.json` is the checkpoint."""
import json
import os
import signal
import sys
import time
from pathlib import Path

from train.config import load_config

cfg = load_config(sys.argv[2], sys.argv[3:])
# Like train.distributed: torchrun-style RANK (set by launch/), else Slurm's (plain srun).
rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
run_dir = Path(cfg.run.root) / cfg.run.name
run_dir.mkdir(parents=True, exist_ok=True)
state = run_dir / f"state-{rank}.json"
step = json.loads(state.read_text())["step"] if state.exists() else 0
stop = []
for sig in (signal.SIGUSR2, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: stop.append(signum))
dist = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                       "MASTER_PORT")}
(run_dir / f"env-{rank}.json").write_text(json.dumps({"dist": dist, "tags": cfg.tags, "argv": sys.argv[1:]}))
print(f"fake trainer rank {rank}: start at step {step}", flush=True)
with open(run_dir / f"steps-{rank}.log", "a") as log:
    while step < cfg.steps:
        time.sleep(cfg.step_s)
        step += 1
        log.write(f"{step}\n")
        log.flush()
        (run_dir / f"progress-{rank}").write_text(str(step))
        if stop:
            time.sleep(0.5)  # a save that takes a while: the requeue must wait for it
            state.write_text(json.dumps({"step": step}))
            print(f"fake trainer rank {rank}: saved at step {step}", flush=True)
            sys.exit(3)
state.write_text(json.dumps({"step": step}))
print(f"fake trainer rank {rank}: last step done", flush=True)
time.sleep(cfg.finish_s)
print(f"fake trainer rank {rank}: done at step {step}", flush=True)
