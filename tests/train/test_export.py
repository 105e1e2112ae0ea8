"""`python -m train.export`: a run directory's weights, folded, as a rebuildable torch file or a
NIR graph; user errors are one line and exit code 2."""

from pathlib import Path

import nir
import numpy as np
import pytest
import torch

from data_pipelines.registry import read_meta
from models.deploy import fold_model, load_folded, simulate_nir
from train.config import load_config, to_yaml
from train.engine import build_model
from train.export import main
from train.run_dir import RunDir

REPO = Path(__file__).resolve().parents[2]


def _make_run(root: Path, digits_dir: Path, *overrides: str,
              best: bool = True) -> tuple[Path, torch.nn.Module]:
    """A run directory as `python -m train` leaves it: config.yaml and best_model.pt (weights of a
    freshly built model whose tdBN statistics moved away from their initial values)."""
    run_dir = root / "run"
    run_dir.mkdir()
    cfg = load_config(REPO / "configs/demo_digits.yaml", [f"data.path={digits_dir}", *overrides])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(0)
    model = build_model(cfg, read_meta(digits_dir))
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(8, 1, 8, 8) + 0.5)
    model.eval()
    if best:
        torch.save(model.state_dict(), run_dir / "best_model.pt")
    return run_dir, model


def test_export_torch_writes_the_folded_model_which_rebuilds_and_matches(tmp_path, digits_dir, capsys):
    run_dir, model = _make_run(tmp_path, digits_dir)
    assert main([str(run_dir), "--format", "torch"]) == 0

    path = run_dir / "export" / "model_folded.pt"
    assert f"wrote {path}" in capsys.readouterr().out
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    folded = load_folded(path)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)
        assert torch.equal(folded(x), fold_model(model)(x))


def test_export_nir_writes_a_graph_that_simulates_like_the_model(tmp_path, digits_dir):
    run_dir, model = _make_run(tmp_path, digits_dir)
    out = tmp_path / "elsewhere" / "net.nir"
    assert main([str(run_dir), "--format", "nir", "--out", str(out)]) == 0

    graph = nir.read(out)
    assert tuple(graph.nodes["input"].input_type["input"]) == (1, 8, 8)
    x = torch.randn(3, 1, 8, 8)
    steps = simulate_nir(graph, x.unsqueeze(0).expand(model.T, *x.shape))
    with torch.no_grad():
        torch.testing.assert_close(steps.mean(0), fold_model(model)(x), atol=1e-5, rtol=1e-5)


def test_export_nir_writes_tau_and_r_for_the_consumers_time_step(tmp_path, digits_dir):
    run_dir, model = _make_run(tmp_path, digits_dir)
    assert main([str(run_dir), "--format", "nir", "--dt", "1e-3"]) == 0

    graph = nir.read(run_dir / "export" / "model.nir")
    lif = graph.nodes["lif1"]
    assert float(graph.metadata["dt"]) == 1e-3
    np.testing.assert_allclose(lif.tau, 1e-3 / (1 - 0.25), rtol=1e-12)  # the demo's decay 0.25, in seconds
    np.testing.assert_allclose(lif.r, 1 / (1 - 0.25), rtol=1e-12)
    x = torch.randn(3, 1, 8, 8)
    steps = simulate_nir(graph, x.unsqueeze(0).expand(model.T, *x.shape))  # Euler at the metadata's dt
    with torch.no_grad():
        torch.testing.assert_close(steps.mean(0), fold_model(model)(x), atol=1e-5, rtol=1e-5)


def test_export_reads_the_newest_step_checkpoint_with_eval_checkpoint_last(tmp_path, digits_dir):
    run_dir, model = _make_run(tmp_path, digits_dir, best=False)
    RunDir(run_dir).checkpointer().write({"model": model.state_dict(), "global_step": 7, "epoch": 0, "batch": 7,
                                          "mlflow_run_id": None, "config_hash": "0"}, 7)
    assert main([str(run_dir), "--format", "torch", "eval.checkpoint=last"]) == 0
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_folded(run_dir / "export" / "model_folded.pt")(x), fold_model(model)(x))


@pytest.mark.parametrize("setup, args, message", [
    ("none", ["--format", "torch"], "is not a run directory"),
    ("no_weights", ["--format", "torch"], "best_model.pt is missing"),
    ("soft_reset", ["--format", "nir"], "neuron.reset=soft"),
    ("moved_data", ["--format", "nir"], "meta.json"),
    ("plain", ["--format", "nir", "--dt", "0"], "dt=0.0"),
    ("plain", ["--format", "torch", "--dt", "1e-4"], "--dt is the NIR consumer's time step"),
])
def test_export_user_errors_are_one_line_with_exit_code_2(tmp_path, digits_dir, capsys, setup, args, message):
    if setup == "none":
        run_dir = tmp_path / "nothing"
    elif setup == "no_weights":
        run_dir, _ = _make_run(tmp_path, digits_dir, best=False)
    elif setup == "soft_reset":
        run_dir, _ = _make_run(tmp_path, digits_dir, "model.neuron.reset=soft")
    elif setup == "plain":
        run_dir, _ = _make_run(tmp_path, digits_dir)
    else:
        run_dir, _ = _make_run(tmp_path, digits_dir)
        args = [*args, f"data.path={tmp_path / 'gone'}"]
    assert main([str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (run_dir / "export").exists()
