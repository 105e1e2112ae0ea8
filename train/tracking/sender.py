"""The only code that talks to MLflow: applies journal records to one store, in order.

We keep our own sender instead of MLflow's asynchronous logging (`log_batch(synchronous=False)`):
that drops a batch whose request fails and has nothing unsent to give back at exit, while the
outage journal must keep every record until the store has taken it, then save the rest to the
fallback file. Sending is idempotent, so a record may be sent again after a failure midway.

MLflow calls go through `MlflowClient` (never the fluent, process-global API) so that several
trackers can live in one process, e.g. in tests. `MlflowClient.log_batch` splits requests to the
store's batch limits itself.
"""
from __future__ import annotations

import fcntl
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from train.tracking.config import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TrackingError

log = logging.getLogger(__name__)

# Error codes that mean "this record will never be accepted": retrying cannot help, so the
# record is dropped with a warning instead of blocking everything queued behind it.
_REJECTED_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS",
                   "INVALID_STATE"}


@dataclass
class _RunState:
    run_id: str
    floors: dict[str, int]  # metric key -> highest step already stored
    params: dict[str, str]  # params already stored (MLflow forbids changing one)


class Sender:
    """Applies journal records to one tracking store, strictly in order.

    Record kinds (all carry `handle`, the id of the Tracker session that wrote them):
      start    {uri, experiment, artifact_location, run_name, run_id | None, tags}: attach the
               handle to run `run_id` (resume) or to a new run
      tags     {tags}
      params   {params}
      metrics  {step, ts (ms), metrics}
      dataset  {name, digest, source, context}
      artifact {path, artifact_path, cleanup | None}: upload a file or a directory's contents;
               `cleanup` is a staging directory removed once uploaded
      end      {status}
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        if uri.startswith("sqlite:///"):
            _create_sqlite_store(self.client, Path(uri[len("sqlite:///"):]))
        self.starts: dict[str, dict] = {}  # handle -> its start record, run_id filled in
        self.runs: dict[str, _RunState] = {}  # run id -> state

    def run_id(self, handle: str) -> str | None:
        start = self.starts.get(handle)
        return start["run_id"] if start else None

    def send_next(self, records: list[dict]) -> int:
        """Send the first record, merged with the metric records right behind it.

        Returns how many records were consumed (sent, or dropped because MLflow rejects them).
        Raises when the store is unreachable or fails; then nothing was consumed.
        """
        head = records[0]
        n = 1
        while (head["op"] == "metrics" and n < len(records) and records[n]["op"] == "metrics"
               and records[n]["handle"] == head["handle"]):
            n += 1
        try:
            getattr(self, f"_{head['op']}")(records[:n])
        except MlflowException as e:
            if e.error_code not in _REJECTED_CODES or head["op"] == "start":
                raise
            log.warning("MLflow rejected %d %s record(s), dropped: %s", n, head["op"], e)
        return n

    def unsent(self, records: list[dict]) -> list[dict]:
        """`records` preceded by start records for the handles they need that already attached,
        so that a replay reattaches to the same runs instead of creating new ones."""
        pending_starts = {r["handle"] for r in records if r["op"] == "start"}
        needed = dict.fromkeys(r["handle"] for r in records if r["handle"] not in pending_starts)
        return [self.starts[h] for h in needed if h in self.starts] + list(records)

    def _state(self, handle: str) -> _RunState:
        return self.runs[self.starts[handle]["run_id"]]

    def _start(self, group: list[dict]) -> None:
        rec = group[0]
        state = self.runs.get(rec.get("run_id") or "")
        if state is None and rec.get("run_id"):
            state = _stored_run(self.client, rec["run_id"])
        if state is None:
            experiment_id = _experiment_id(self.client, rec["experiment"], rec.get("artifact_location"))
            run = self.client.create_run(experiment_id, run_name=rec["run_name"], tags=rec["tags"])
            state = _RunState(run.info.run_id, {}, {})
        else:
            self.client.log_batch(state.run_id, tags=[RunTag(k, str(v)) for k, v in rec["tags"].items()])
            self.client.update_run(state.run_id, status="RUNNING")
        self.runs[state.run_id] = state
        self.starts[rec["handle"]] = dict(rec, run_id=state.run_id)

    def _dataset(self, group: list[dict]) -> None:
        rec = group[0]
        dataset = Dataset(name=rec["name"], digest=rec["digest"], source_type="local",
                          source=json.dumps({"uri": rec["source"]}))
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", rec["context"])])]
        self.client.log_inputs(self._state(rec["handle"]).run_id, datasets=inputs)

    def _tags(self, group: list[dict]) -> None:
        tags = [RunTag(k, str(v)) for k, v in group[0]["tags"].items()]
        self.client.log_batch(self._state(group[0]["handle"]).run_id, tags=tags)

    def _params(self, group: list[dict]) -> None:
        state = self._state(group[0]["handle"])
        new, changed = {}, []
        for key, value in group[0]["params"].items():
            if key not in state.params:
                new[key] = value
            elif state.params[key] != value:
                changed.append(key)
        if changed:  # MLflow params are write-once; a resumed run keeps the first values
            log.warning("run %s already has different values for params %s; keeping the "
                        "stored ones", state.run_id, ", ".join(sorted(changed)))
        self.client.log_batch(state.run_id, params=[Param(k, v) for k, v in new.items()])
        state.params.update(new)

    def _metrics(self, group: list[dict]) -> None:
        state = self._state(group[0]["handle"])
        floors = dict(state.floors)
        batch = []
        for rec in group:
            for key, value in rec["metrics"].items():
                if rec["step"] <= floors.get(key, -1):
                    continue  # already stored: a resumed trainer re-logging steps
                floors[key] = rec["step"]
                batch.append(Metric(key, value, rec["ts"], rec["step"]))
        self.client.log_batch(state.run_id, metrics=batch)
        state.floors = floors

    def _artifact(self, group: list[dict]) -> None:
        rec = group[0]
        run_id = self._state(rec["handle"]).run_id
        path = Path(rec["path"])
        if not path.exists():
            log.warning("artifact %s is gone; not uploaded", path)
        elif path.is_dir():
            self.client.log_artifacts(run_id, str(path), rec["artifact_path"])
        else:
            self.client.log_artifact(run_id, str(path), rec["artifact_path"])
        if rec.get("cleanup"):
            shutil.rmtree(rec["cleanup"], ignore_errors=True)

    def _end(self, group: list[dict]) -> None:
        self.client.set_terminated(self._state(group[0]["handle"]).run_id, group[0]["status"])


def _stored_run(client: MlflowClient, run_id: str) -> _RunState | None:
    """The state of run `run_id` as the store has it; None (with a warning) if it is gone."""
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        log.warning("MLflow run %s is missing or deleted in %s; logging to a new run",
                    run_id, client.tracking_uri)
        return None
    # The latest metric per key carries the highest step stored: the floor below which a
    # resumed trainer's re-logged steps are duplicates.
    floors = {m.key: m.step for m in run.data._metric_objs}
    return _RunState(run.info.run_id, floors, dict(run.data.params))


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created (with our kind tag) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as e:  # another job created it between our two calls
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment '{name}' is deleted in {client.tracking_uri}: restore "
                            f"it (`mlflow experiments restore`) or set tracking.experiment")
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        # Without it MLflow 3's UI guesses, and shows a run's page in its GenAI view.
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _create_sqlite_store(client: MlflowClient, db: Path) -> None:
    """Touch the store under a file lock: processes that open a new SQLite store at once (the
    elements of a sweep) otherwise race on creating its tables and can leave it unusable."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client.search_experiments(max_results=1)
        except Exception as e:  # the sender's own retries deal with a store that stays broken
            log.warning("could not open the MLflow store %s: %s", db, e)
