"""`train.compile`: the trainer runs the model through torch.compile (Inductor, on CPU here) and
follows the eager run; its checkpoints are plain (an eager run resumes them)."""
import json

import pytest
import torch

from tests.train.trainrun import metric_history, train

pytestmark = pytest.mark.slow  # runs the trainer


def _final(root) -> dict:
    return json.loads((root / "demo-digits" / "final_metrics.json").read_text())


def _assert_compiled_follows_eager(root) -> None:
    """Same data, same initial weights: the first steps agree to float32 rounding (a threshold
    crossed differently by a rounding difference may later change a spike, so only the start
    is compared tightly; 44 steps later both have learned alike)."""
    losses = {name: [v for _, v in metric_history(root / name, "train/step_loss")]
              for name in ("eager", "compiled")}
    assert len(losses["eager"]) == len(losses["compiled"]) == 44
    assert losses["compiled"][:8] == pytest.approx(losses["eager"][:8], rel=1e-4)
    final_e, final_c = _final(root / "eager"), _final(root / "compiled")
    assert final_c["val/top1"] > 0.3 and abs(final_c["val/top1"] - final_e["val/top1"]) < 0.1
    # Firing rates are recorded through the compiled evaluation as through the eager one.
    rates = [k for k in final_e if k.startswith("firing_rate/")]
    assert rates and all(final_c[k] == pytest.approx(final_e[k], abs=0.02) for k in rates)


def test_compiled_run_with_blocks_plus_time_follows_the_eager_run_and_an_eager_run_resumes_it(digits_dir, tmp_path):
    """With activation checkpointing, the hardest case: each block compiles alone (compiling the
    whole model, without checkpointing, is checked in process in tests/models)."""
    common = (f"data.path={digits_dir}", "optim.epochs=1", "data.num_workers=1", "tracking.log_every_steps=1",
              "train.checkpointing=blocks+time")
    eager = train(f"run.root={tmp_path / 'eager'}", *common)
    assert eager.returncode == 0, eager.stderr[-3000:]
    inductor = tmp_path / "inductor"  # where Inductor writes the code it generates
    compiled = train(f"run.root={tmp_path / 'compiled'}", *common, "train.compile=true",
                     env={"TORCHINDUCTOR_CACHE_DIR": str(inductor)})
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "each block" in compiled.stdout
    assert len(list(inductor.rglob("*.py"))) >= 2  # at least the training and the evaluation graphs
    _assert_compiled_follows_eager(tmp_path)

    best = torch.load(tmp_path / "compiled" / "demo-digits" / "best_model.pt", weights_only=True)
    # Each of the 44 steps updated every BatchNorm once: the recomputations in backward did not.
    tracked = {k: int(v) for k, v in best.items() if k.endswith("num_batches_tracked")}
    assert tracked and set(tracked.values()) == {44}, tracked
    # The compiled run's weights and checkpoints carry the plain parameter names...
    assert "conv1.weight" in best and not any("_orig_mod" in k for k in best)
    # ... so an eager run (the change named on the command line) resumes it for a second epoch.
    resumed = train(f"run.root={tmp_path / 'compiled'}", *common, "optim.epochs=2", "train.compile=false")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    steps = [s for s, _ in metric_history(tmp_path / "compiled", "train/step_loss")]
    assert steps == list(range(1, 89))
