"""Every leaf field of the config schema, given a bad value of its kind, stops `python -m train`
and `python -m launch.submit` with one line on stderr naming the key, exit code 2, no traceback,
and nothing queued (issue #16, item 4).

The fields are discovered from the `train.config.Config` dataclasses, so a field added to the
schema is walked without editing this file. Bad values by kind: text where a number or a bool
is expected, NaN where a float is, a list where text is, text where a list or a mapping is, a
value outside the choices of a choice field (`choice(...)` metadata or an Enum type), and one
outside the bounds of a bounded field (`at_least(...)`, `fraction(...)`, `nonnegative_floats(...)`
metadata).

Both entry points run in this process for speed: `train.engine.main(argv)` and
`launch.submit.main(argv)` are what `python -m train` and `python -m launch.submit` run, and
they print the one line themselves. Should a bad value get past them, training must not start
and no job be queued: `Trainer.fit` is a stub here (the Trainer's own checks, building the data
loaders and the model, still run), and so are the steps `launch.submit` takes after its plan
(`tracking_store`, `build_executor`).
"""
from __future__ import annotations

import dataclasses
import enum
import signal
import typing
import warnings

import pytest

import launch.submit
import train.engine
from tests.train.trainrun import DEMO
from train.config import Config

# (entry point, key, value) -> why it is not one line + exit 2 yet; strict, so a fix shows as XPASS.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


def leaf_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, typing.Any, dict]]:
    """(dotted key, resolved type, field metadata) of every non-dataclass field, recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from leaf_fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", kind, dict(f.metadata)


def bad_values(kind: typing.Any, metadata: dict) -> list[str]:
    """Override values (YAML text, as on the command line) that a field of `kind` must refuse."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union and type(None) in args:  # Optional[X]: X's bad values
        (kind,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(kind)
    if origin is list:
        return ["text", *(["[-1.0]"] if "each_minimum" in metadata else [])]
    if origin is dict:
        return ["text"]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return ["not-a-choice"]
    if kind is bool:
        return ["maybe"]
    below = [str(metadata["minimum"] - 1)] if "minimum" in metadata else []
    above = ["2.0"] if "maximum" in metadata else []
    if kind is int:
        return ["many", *below, *(["99"] if "choices" in metadata else [])]
    if kind is float:
        return ["lots", "nan", *below, *above]  # no setting of the schema means anything at NaN
    if kind is str:
        return ["not-a-choice"] if "choices" in metadata else ["[1, 2]"]
    if kind is typing.Any:
        return []  # accepts anything by definition
    raise AssertionError(f"no bad value for a field of type {kind!r}: teach bad_values this kind")


CASES = [(key, value) for key, kind, metadata in leaf_fields() for value in bad_values(kind, metadata)]
assert {"model.neuron.tau_decay", "data.dataset", "train.deepspeed.zero_stage", "eval.noise_sigmas", "study.grid"} \
    <= {key for key, _ in CASES}, "the walk misses fields: is train.config.Config still the schema?"


def cases(entry: str) -> list:
    return [pytest.param(entry, key, value, id=f"{entry}-{key}={value}",
                         marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[entry, key, value])]
                         if (entry, key, value) in KNOWN_FAILURES else [])
            for key, value in CASES]


class Queued(Exception):
    """launch.submit went past its plan: the job would be queued."""


@pytest.fixture
def entry_points(monkeypatch):
    """entry point name -> main(overrides), with training and queueing stubbed out."""
    monkeypatch.setattr(train.engine.Trainer, "fit", lambda self, stop: 0)

    def queued(*args, **kwargs):
        raise Queued

    # The first steps of submitting once the plan is made: the jobs' tracking store, the executor.
    monkeypatch.setattr(launch.submit, "tracking_store", queued)
    monkeypatch.setattr(launch.submit, "build_executor", queued)
    # run() leaves SIGTERM/SIGUSR2 ignored when it returns: not in the test process.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    yield {"train": lambda argv: train.engine.main(["--config", DEMO, *argv]),
           "submit": lambda argv: launch.submit.main(["--config", DEMO, "--cluster", "local", *argv])}
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("entry, key, value", cases("train") + cases("submit"))
def test_a_bad_value_of_every_schema_field_is_one_line_naming_the_key_and_exit_2(entry_points, capsys, tmp_path,
                                                                                 digits_dir, entry, key, value):
    root = tmp_path / "runs"
    argv = [f"run.root={root}", f"data.path={digits_dir}", f"{key}={value}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = entry_points[entry](argv)
        except Queued:
            pytest.fail(f"{key}={value}: accepted, the job would be queued")
        except Exception as e:  # `python -m ...` would print a traceback and exit 1
            pytest.fail(f"{key}={value}: traceback, {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    err = capsys.readouterr().err
    # A warning is printed to stderr by `python -m ...` (two lines: the message and its source).
    lines = err.strip().splitlines() + [str(w.message) for w in caught]
    assert code == 2, f"{key}={value}: exit code {code}, stderr {lines}"
    assert len(lines) == 1, f"{key}={value}: {len(lines)} lines on stderr: {lines}"
    assert lines[0].startswith("error: ") and key in lines[0], f"{key}={value}: {lines[0]!r}"
    assert "Traceback" not in err
    if entry == "submit":
        assert not root.exists() or not list(root.iterdir()), f"{key}={value}: submit wrote {list(root.iterdir())}"
