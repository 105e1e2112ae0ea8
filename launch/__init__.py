"""Launching training jobs: `python -m launch.submit` (submitit executors for Slurm and local runs,
requeue on time limit or preemption, sweeps as job arrays). Knows the trainer only as a command
line; never imports a model."""
