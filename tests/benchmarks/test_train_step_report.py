"""The train-step benchmark's ratios and issue-8 target checks on made-up rows (no timing)."""
import pytest

from benchmarks.train_step import Job, add_ratios, check_targets, markdown_table, plan


def _row(impl="spikescale", T=4, ckpt="none", prec="bf16", ips=100.0, mem=1000.0, compiled=False,
         backend=""):
    return {"impl": impl, "model": "spiking_resnet34", "T": T, "checkpointing": ckpt, "precision": prec,
            "backend": backend, "batch": 32, "compiled": compiled, "status": "ok", "images_per_s": ips,
            "step_ms_best": 1.0, "peak_mem_mib": mem, "step_mem_mib": mem, "load_avg_1m": 0.0}


def _rows():
    return [
        _row("spikingjelly", ips=100.0, backend="auto"),
        {**_row("torchvision_ann", ips=2000.0, backend="cudnn"), "batch": 128},
        _row(ips=300.0, mem=1000.0),
        _row(ips=450.0, mem=900.0, compiled=True),
        _row(T=6, ips=200.0, mem=1500.0),
        _row(T=6, ckpt="blocks+time", ips=160.0, mem=500.0),
    ]


def test_compiled_rows_are_compared_with_their_eager_row_and_never_used_as_anchor():
    rows = _rows()
    add_ratios(rows)
    eager, compiled = rows[2], rows[3]
    assert compiled["ratios"]["speed_vs_eager"] == pytest.approx(1.5)
    assert "speed_vs_eager" not in eager["ratios"]
    # Memory and speed anchors are the eager none rows, also for the compiled row.
    assert compiled["ratios"]["mem_vs_none"] == pytest.approx(0.9)
    assert eager["ratios"]["speed_vs_spikingjelly_auto"] == pytest.approx(3.0)
    assert rows[5]["ratios"]["mem_vs_none"] == pytest.approx(1 / 3, abs=1e-3)


def test_speed_targets_take_the_faster_of_eager_and_compiled_and_say_which():
    rows = _rows()
    add_ratios(rows)
    targets = check_targets(rows, "cuda")
    sj = targets["resnet34_T4_bf16_vs_spikingjelly"]
    assert sj["with"] == "compiled" and sj["ratios"]["speed_vs_spikingjelly_auto"] == pytest.approx(4.5)
    assert sj["met"] is True
    bound = targets["resnet34_T4_bf16_vs_ann_bound"]  # 450 / (2000 / 4)
    assert bound["ratio"] == pytest.approx(0.9) and bound["met"] is True
    ckpt = targets["resnet34_T6_bf16_checkpointing"]
    assert ckpt["speed_vs_none"] == pytest.approx(0.8) and ckpt["met"] is True
    # Without the compiled row the eager one is judged: 3.0x SpikingJelly misses 3.7x.
    rows = [r for r in _rows() if not r["compiled"]]
    add_ratios(rows)
    targets = check_targets(rows, "cuda")
    assert targets["resnet34_T4_bf16_vs_spikingjelly"]["with"] == "eager"
    assert targets["resnet34_T4_bf16_vs_spikingjelly"]["met"] is False
    assert check_targets(rows, "cpu")["resnet34_T4_bf16_vs_spikingjelly"]["met"] is None


def test_plan_adds_compiled_jobs_for_the_modes_asked_only():
    from benchmarks.train_step import WORKLOADS

    args = dict(device="cpu", steps=(1, 4), workloads=[WORKLOADS["spiking_resnet19"]], precisions=["fp32"],
                batch_key="cpu", batch_override={}, sj={"available": False}, warmup=1, rounds=1, iters=1)
    assert not any(j.compiled for j in plan(**args))
    jobs = plan(**args, compile_modes=("none",))
    compiled = [j for j in jobs if j.compiled]
    assert [(j.T, j.checkpointing) for j in compiled] == [(1, "none"), (4, "none")]
    assert all(isinstance(j, Job) and j.impl == "spikescale" for j in compiled)
    compiled = [j for j in plan(**args, compile_modes=("blocks+time", "none")) if j.compiled]
    assert [(j.T, j.checkpointing) for j in compiled] == [
        (1, "none"), (1, "blocks+time"), (4, "none"), (4, "blocks+time")]


def test_checkpointing_target_compares_like_with_like_and_says_which():
    rows = _rows() + [_row(T=6, ips=300.0, mem=1400.0, compiled=True),
                      _row(T=6, ckpt="blocks+time", ips=270.0, mem=520.0, compiled=True)]
    rows[5]["images_per_s"] = 140.0  # eager blocks+time: 0.7x of eager none, too slow
    add_ratios(rows)
    ckpt = check_targets(rows, "cuda")["resnet34_T6_bf16_checkpointing"]
    # compiled: 270 / 300 = 0.9x the speed, 520 / 1400 = 0.37x the memory of compiled none
    assert ckpt["with"] == "compiled" and ckpt["met"] is True
    assert ckpt["speed_vs_none"] == pytest.approx(0.9) and ckpt["mem_vs_none"] == pytest.approx(0.371, abs=1e-3)
    ckpt = check_targets(rows[:-1], "cuda")["resnet34_T6_bf16_checkpointing"]
    assert ckpt["with"] == "eager" and ckpt["met"] is False


def test_markdown_marks_compiled_rows():
    rows = _rows()
    add_ratios(rows)
    table = markdown_table({"results": rows})
    assert sum("none +compile" in line for line in table.splitlines()) == 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_implementation_gets_the_same_layout(channels_last):
    import torch
    from torch import nn

    from benchmarks.train_step import _build

    common = dict(model="spiking_resnet19", T=1, batch=1, image_px=32, num_classes=10, checkpointing="none",
                  precision="fp32", backend="", device="cpu", warmup=0, rounds=1, iters=1,
                  channels_last=channels_last)
    for impl in ("spikescale", "torchvision_ann"):
        model, _, _ = _build(Job(impl, **common))
        convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == channels_last
                             for w in convs if w.shape[-1] > 1)  # a 1x1 kernel is both
