"""A real 2-node DDP job: two slurmd on this machine, each in its own network namespace with its
own address (slurm/local-cluster/start with SPIKESCALE_SLURM_NODES=2), the demo submitted with
`--nodes 2` through the launcher; gloo rendezvous at the first node's address, over the bridge."""
from __future__ import annotations

from mlflow.tracking import MlflowClient
import pytest

from tests.launch.slurm_jobs import log_of, submit_demo, wait_until_done

pytestmark = pytest.mark.slow  # starts a two-node Slurm cluster


def test_demo_as_a_two_node_ddp_job_trains_across_namespaces_and_logs_once(two_node_cluster, digits, tmp_path):
    _, [job] = submit_demo(tmp_path, digits, "--nodes", "2", "--cpus-per-task", "1", "train.strategy=ddp",
                           "optim.epochs=1", "run.name=two-nodes")
    [record] = wait_until_done(job, 240).values()
    assert record["JobState"] == "COMPLETED", log_of(tmp_path, "two-nodes", job)[-3000:]

    assert record["NodeList"] == "node[1-2]"
    assert "node=0(2), global_rank=0(2)" in log_of(tmp_path, "two-nodes", job, task=0)
    assert "node=1(2), global_rank=1(2)" in log_of(tmp_path, "two-nodes", job, task=1)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 0 only logs
    assert runs[0].data.params["env.world_size"] == "2" and runs[0].data.tags["slurm.job_id"] == job
