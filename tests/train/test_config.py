"""The one config schema: YAML + overrides merge, and every user mistake is one clear line."""

import pytest

from tests.train.trainrun import run_module, train
from train.config import ConfigError, changed_keys, config_hash, load_config, to_dict

DEMO = "configs/demo_digits.yaml"


def test_yaml_and_overrides_merge_into_typed_config():
    cfg = load_config(DEMO, ["optim.lr=0.05", "model.T=6", "model.neuron.reset=soft"])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.model.T == 6
    assert to_dict(cfg)["model"]["neuron"]["reset"] == "soft"
    assert cfg.run.name == "demo-digits"          # from the YAML
    assert cfg.train.keep_checkpoints == 3        # from the schema default


@pytest.mark.parametrize("override, names", [
    (["optim.lrr=0.1"], "optim.lrr"),
    (["model.T=four"], "model.T"),
    (["train.strategy=horovod"], "train.strategy"),
    (["model.neuron.reset=sometimes"], "model.neuron.reset"),
    (["optim.lr"], "key=value"),
    (["model.neuron.tau_decay=2"], "model.neuron.tau_decay"),
    (["model.neuron.surrogate_width=-1"], "model.neuron.surrogate_width"),
    (["model.neuron.v_threshold=0"], "model.neuron.v_threshold"),
    (["data.dataset=foo"], "data.dataset"),
    (["eval.noise_sigmas=[-0.1]"], "eval.noise_sigmas"),
])
def test_bad_override_names_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(DEMO, override)


def test_invalid_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["train.precision=fp8"])
    assert "fp32" in str(e.value) and "bf16" in str(e.value)


@pytest.mark.parametrize("override", ["train.time_chunk=0", "model.T=0", "optim.accumulate=0",
                                      "train.keep_checkpoints=0", "optim.epochs=-1"])
def test_counts_below_their_minimum_name_the_key_and_bound(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}': must be >= 1"):
        load_config(DEMO, [override])


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_key_in_yaml_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(bad)


def test_changed_keys_and_hash_follow_the_values():
    a, b = load_config(DEMO), load_config(DEMO, ["optim.epochs=20"])
    assert changed_keys(to_dict(a), to_dict(b)) == ["optim.epochs"]
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(load_config(DEMO))


def test_a_key_added_to_the_schema_after_a_run_started_is_unchanged_at_its_default():
    saved = to_dict(load_config(DEMO))
    del saved["train"]["compile"]  # a checkpoint written before the key existed
    assert changed_keys(saved, to_dict(load_config(DEMO))) == []
    assert changed_keys(saved, to_dict(load_config(DEMO, ["train.compile=true"]))) == ["train.compile"]


def test_every_shipped_config_and_block_loads():
    from pathlib import Path

    shipped = sorted(Path("configs").glob("*.yaml"))
    assert len(shipped) >= 4
    for path in shipped:
        load_config(path)
    for block in sorted(Path("configs/blocks").glob("*.yaml")):
        cfg = load_config(["configs/cifar10_resnet19.yaml", block])
        assert cfg.train.strategy == "deepspeed" and cfg.model.name == "spiking_resnet19"


@pytest.mark.slow
def test_neuron_setting_from_the_command_line_is_one_line_and_exit_2(tmp_path):
    done = train("model.neuron.tau_decay=2", f"run.root={tmp_path}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["error: config key 'model.neuron.tau_decay': 2.0 is outside [0, 1]"]


@pytest.mark.slow
def test_sequence_data_of_another_length_than_model_T_is_refused(seqdigits_dir, tmp_path):
    done = train("model.T=4", f"data.path={seqdigits_dir}", f"run.root={tmp_path}", config="configs/study_seqdigits.yaml")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: config key 'model.T': 4, but") and "model.T=8" in line


@pytest.mark.parametrize("yaml_leak, override, level", [
    ("true", None, "normal"), ("false", None, "none"), (None, "model.neuron.leak=false", "none"),
    (None, "model.neuron.leak=true", "normal"), (None, "model.neuron.leak=complete", "complete"),
])
def test_leak_reads_the_booleans_of_older_configs_as_levels(tmp_path, yaml_leak, override, level):
    path = tmp_path / "old.yaml"
    path.write_text(f"model:\n  neuron:\n    leak: {yaml_leak}\n" if yaml_leak else "run:\n  seed: 0\n")
    cfg = load_config(path, [override] if override else [])
    assert cfg.model.neuron.leak == level and to_dict(cfg)["model"]["neuron"]["leak"] == level


def test_a_resumed_run_saved_with_leak_true_or_false_is_unchanged():
    for old, new in ((True, "normal"), ("false", "none")):
        saved = to_dict(load_config(DEMO, [f"model.neuron.leak={new}"]))
        saved["model"]["neuron"]["leak"] = old  # as a run started before leak had three levels saved it
        assert changed_keys(saved, to_dict(load_config(DEMO, [f"model.neuron.leak={new}"]))) == []
        assert changed_keys(saved, to_dict(load_config(DEMO, ["model.neuron.leak=complete"]))) == ["model.neuron.leak"]
