"""The fallback file: the journal records a session could not send, kept across processes.

At `close`, whatever the store did not take is written to `<run_dir>/mlflow-fallback.jsonl`.
The next `Tracker.start` in that run directory sends it first (`carried_records`), or
`python -m train.tracking replay <run_dir>` sends it by hand (`replay`). MLflow has no such
thing: a record its client cannot send is lost.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
import warnings
from pathlib import Path

from train.tracking.config import FALLBACK_NAME, TrackingError, artifact_location
from train.tracking.staging import remove_orphans

log = logging.getLogger(__name__)


def read_fallback(path: Path) -> list[dict]:
    """The records in `path`, one JSON object a line; [] if there is no such file."""
    if not path.exists():
        return []
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a crash mid-write
                log.warning("%s:%d is not a JSON record; skipped", path, line_no)
    return records


def write_fallback(path: Path, records: list[dict]) -> None:
    """Atomically replace `path` with `records`, one JSON object a line."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def carried_records(run_dir: Path, start: dict) -> tuple[str, list[dict], int]:
    """(handle, journal, n) for a session starting in `run_dir`: the journal is the earlier
    sessions' unsent records (its first n) followed by this session's `start` record.

    start: a start record without its handle (see `Sender`). When `start` resumes no run and an
    earlier session's run was never created (store down all along), this session continues that
    run under its handle instead of starting another.
    """
    fallback = run_dir / FALLBACK_NAME
    carried = read_fallback(fallback)
    remove_orphans(run_dir, carried)  # all of them: records left for a replay keep their copies
    if carried and carried[0].get("uri") != start["uri"]:
        warnings.warn(f"{fallback} holds records for {carried[0].get('uri')}, not {start['uri']}; "
                      f"left as is (send them with `python -m train.tracking replay {run_dir}`)",
                      stacklevel=4)  # the caller of Tracker.start
        carried = []
    orphan = next((r for r in carried if r["op"] == "start" and not r.get("run_id")), None)
    if start["run_id"] is None and orphan is not None:
        handle = orphan["handle"]
        # the earlier session's end is not the run's end: this session goes on with it
        carried = [r for r in carried if not (r["op"] == "end" and r["handle"] == handle)]
        return handle, carried + [{"op": "tags", "handle": handle, "tags": start["tags"]}], len(carried)
    handle = uuid.uuid4().hex
    return handle, carried + [dict(start, handle=handle)], len(carried)


def replay(run_dir: Path, uri: str | None = None) -> int:
    """Send `<run_dir>/mlflow-fallback.jsonl` to MLflow and delete it; returns records sent.

    uri: where to send; default the URI the records were meant for. Raises TrackingError when
    the store fails midway; the file then holds exactly what is still unsent.
    """
    path = Path(run_dir) / FALLBACK_NAME
    records = read_fallback(path)
    if not records:
        return 0
    from train.tracking.sender import Sender  # MLflow's import costs seconds: only when needed
    if uri and uri != records[0]["uri"]:  # sent elsewhere: artifacts follow that store's layout
        for rec in records:
            if rec["op"] == "start":
                rec["artifact_location"] = artifact_location(uri)
    uri = uri or records[0]["uri"]
    sent = 0
    sender = None
    try:
        sender = Sender(uri)
        while records:
            n = sender.send_next(records)
            del records[:n]
            sent += n
    except Exception as e:
        write_fallback(path, sender.unsent(records) if sender else records)
        raise TrackingError(f"replay of {path} to {uri} stopped after {sent} records "
                            f"({type(e).__name__}: {e}); run it again when the store answers") from e
    path.unlink()
    return sent


def main(argv: list[str] | None = None) -> int:
    """`python -m train.tracking replay RUN_DIR [--uri URI]`: send a run's fallback records."""
    parser = argparse.ArgumentParser(prog="python -m train.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("replay", help=f"send <run_dir>/{FALLBACK_NAME} to MLflow")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--uri", default=None, help="tracking URI (default: the one recorded)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # one attempt per request, as the trainer's sender: a dead store fails the replay quickly
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if not args.run_dir.is_dir():
        print(f"error: run directory {args.run_dir} does not exist", file=sys.stderr)
        return 2
    try:
        sent = replay(args.run_dir, args.uri)
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sent {sent} records from {args.run_dir / FALLBACK_NAME}" if sent
          else f"nothing to replay in {args.run_dir}")
    return 0
