"""launch.submit before anything is queued (errors users can make, one line each; the plan of
runs) and launch.job's environment for the trainer. Only the partition check needs a cluster."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch import job as launch_job
from launch.submit import SubmitError, main, minutes, plan, sweep_grid, sweep_specs
from tests.launch.slurm_jobs import DEMO

REPO = Path(__file__).resolve().parents[2]


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_missing_config_is_one_line_naming_the_file(capsys):
    assert "config file not found: configs/nope.yaml" in one_line_error(capsys, ["--config", "configs/nope.yaml"])


def test_invalid_override_is_one_line_naming_the_key(capsys, tmp_path):
    err = one_line_error(capsys, ["--config", DEMO, "--cluster", "local", f"run.root={tmp_path}", "optim.lrr=0.1"])
    assert "optim.lrr" in err
    assert not list(tmp_path.iterdir())  # nothing submitted, nothing written


def test_invalid_sweep_value_fails_before_anything_is_queued(capsys, tmp_path):
    err = one_line_error(capsys, ["--config", DEMO, "--cluster", "local", "--sweep", "optim.epochs=1,many",
                                  f"run.root={tmp_path}"])
    assert "optim.epochs" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("spec", ["optim.lr", "optim.lr=", "=1,2"])
def test_malformed_sweep_says_the_expected_form(capsys, spec):
    assert "expected KEY=V1,V2" in one_line_error(capsys, ["--config", DEMO, "--sweep", spec])


def test_cluster_slurm_without_sbatch_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "sbatch/srun are not on PATH" in one_line_error(capsys, ["--config", DEMO, "--cluster", "slurm"])


def test_nodes_beyond_one_need_slurm(capsys):
    assert "needs Slurm" in one_line_error(capsys, ["--config", DEMO, "--cluster", "local", "--nodes", "2"])


def test_tasks_per_node_must_match_gpus(capsys):
    err = one_line_error(capsys, ["--config", DEMO, "--gpus-per-node", "4", "--tasks-per-node", "2"])
    assert "one task per GPU" in err


@pytest.mark.slow
def test_unknown_partition_lists_the_clusters_partitions(capsys, slurm_cluster):
    err = one_line_error(capsys, ["--config", DEMO, "--cluster", "slurm", "--partition", "gpu-nope"])
    assert "unknown partition 'gpu-nope'; this cluster has: debug" in err


@pytest.mark.parametrize("text, expected", [("30", 30), ("4:00:00", 240), ("0:30:01", 31), ("90:30", 91),
                                            ("1-00:00:00", 1440), ("2-12", 3600), ("1-1:30", 1530)])
def test_time_limits_read_like_slurm(text, expected):
    assert minutes(text) == expected


@pytest.mark.parametrize("text", ["4h", "", "0", "1:2:3:4"])
def test_bad_time_limit_is_a_submit_error(text):
    with pytest.raises(SubmitError, match="--time"):
        minutes(text)


def test_sweep_grid_is_the_cartesian_product_in_order():
    assert sweep_grid(["a=1,2", "b=x,y"]) == [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]
    assert sweep_grid([]) == [[]]
    with pytest.raises(SubmitError, match="given twice"):
        sweep_grid(["a=1", "a=2"])


def test_plan_fixes_run_names_and_tags_each_sweep_element(tmp_path):
    [single], sweep_id, _ = plan(Path(DEMO), [f"run.root={tmp_path}"], [[]])
    assert sweep_id is None and single.name == "demo-digits" and single.overrides[-1] == "run.name=demo-digits"

    grid = sweep_grid(["optim.lr=0.05,0.1", "data.batch_size=16,32"])
    elements, sweep_id, _ = plan(Path(DEMO), [f"run.root={tmp_path}"], grid)
    assert len({e.name for e in elements}) == 4
    for e in elements:
        assert e.name.startswith(f"demo-digits-{sweep_id}-")
        assert f"run.name={e.name}" in e.overrides and f"tracking.tags.sweep_id={sweep_id}" in e.overrides


def test_study_submits_every_variant_and_seed_of_the_configs_grid(tmp_path):
    configs = [REPO / "configs/cifar10_resnet19.yaml", REPO / "configs/ablation_functional_roles.yaml"]
    overrides = [f"run.root={tmp_path}"]
    elements, sweep_id, _ = plan(configs, overrides, sweep_grid(sweep_specs(configs, overrides, [], study=True)), study=True)
    assert len(elements) == 12 * 5 and len({e.name for e in elements}) == 60 and sweep_id == "ablation"
    first = elements[0]
    assert first.name == "ablation-leak=normal,reset=hard,recurrence=none-seed0"
    assert {"model.neuron.leak=normal", "run.seed=0", f"run.name={first.name}", "tracking.tags.sweep_id=ablation",
            "tracking.tags.variant='leak=normal,reset=hard,recurrence=none'"} <= set(first.overrides)
    with_lr, _, _ = plan(configs, overrides, sweep_grid(sweep_specs(configs, [], ["optim.lr=0.1,0.2"], study=True)), study=True)
    assert len(with_lr) == 120 and with_lr[-1].name == "ablation-1-leak=complete,reset=none,recurrence=full-seed4"
    assert "tracking.tags.sweep_id=ablation-1" in with_lr[-1].overrides  # each --sweep point is a study of its own
    with pytest.raises(SubmitError, match="given twice"):
        sweep_specs(configs, [], ["model.neuron.reset=hard"], study=True)
    assert sweep_specs(configs, [], ["optim.lr=0.1"], study=False) == ["optim.lr=0.1"]


def fake_job_env(rank: int, local: int, node: int, tasks: int = 4, nodes: int = 2) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, local_rank=local, node=node, num_tasks=tasks, num_nodes=nodes,
                           hostnames=["gpu-a17", "gpu-a18"], raw_job_id="123456")


def test_distributed_environment_is_torchrun_style_with_the_first_host_as_master():
    env = launch_job.distributed_environment(fake_job_env(3, 1, 1), gpus_per_node=2,
                                             environ={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1",
                   "MASTER_ADDR": "gpu-a17", "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_per_task_gpu_binding_is_reported_because_deepspeed_indexes_by_local_rank():
    with pytest.raises(launch_job.JobSetupError, match="binds GPUs per task"):
        launch_job.distributed_environment(fake_job_env(1, 1, 0), gpus_per_node=2,
                                           environ={"CUDA_VISIBLE_DEVICES": "1"})


def test_master_port_is_stable_and_in_range_for_any_job_id():
    assert launch_job.master_port("17") == 20017
    assert launch_job.master_port("local-5") == launch_job.master_port("local-5")
    assert 20000 <= launch_job.master_port("local-5") < 40000


def test_requeue_exit_code_is_the_trainers():
    import train

    assert launch_job.REQUEUE_EXIT_CODE == train.REQUEUE_EXIT_CODE


@pytest.mark.slow
def test_launcher_and_job_import_neither_torch_nor_models():
    code = ("import sys, launch.submit, launch.job; "
            "print(sorted(m for m in ('torch', 'models', 'timm', 'train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_loading_and_checking_a_config_imports_no_gpu_stack():
    """`launch.submit` on a login node reads and checks the config without torch, timm, FFCV,
    Triton or DeepSpeed (seconds each, and a GPU stack a login node may not have)."""
    code = ("import sys; from launch.submit import load; "
            "load(['configs/imagenet_resnet50.yaml', 'configs/blocks/deepspeed_zero2.yaml'], ['model.T=2']); "
            "print(sorted(m for m in ('torch', 'timm', 'ffcv', 'triton', 'deepspeed', 'numba', 'mlflow') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_unreachable_controller_is_one_line_with_what_to_do(capsys, monkeypatch):
    if shutil.which("sbatch") is None or shutil.which("srun") is None or Path("/etc/slurm/slurm.conf").exists():
        pytest.skip("needs Slurm's client commands and no system-wide slurm.conf")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    err = one_line_error(capsys, ["--config", DEMO, "--cluster", "slurm"])
    assert "does not answer" in err and "--cluster local" in err


def test_config_blocks_are_frozen_as_one_merged_file(tmp_path):
    from launch.submit import merged_yaml
    from train.config import load_config

    frozen = tmp_path / "config.yaml"
    frozen.write_text(merged_yaml([Path("configs/cifar10_resnet19.yaml"), Path("configs/blocks/deepspeed_zero2.yaml")]))
    cfg = load_config(frozen)
    assert cfg.model.name == "spiking_resnet19" and cfg.train.strategy == "deepspeed"
    assert cfg.train.deepspeed.zero_stage == 2 and cfg.run.name == "cifar10-resnet19-T4"
