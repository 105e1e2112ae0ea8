"""The light modules the config schema reads (``models.names``, ``models.neuron_config``) and the
lazy ``models`` package: what they list matches the heavy modules, and importing them loads
neither torch nor timm, Triton, FFCV or DeepSpeed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import models
from models import checkpointing, classifier, names, neuron_config, neurons, surrogates

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "timm", "triton", "ffcv", "deepspeed")


def test_model_names_lists_exactly_the_networks_registered_with_timm():
    assert list(names.MODEL_NAMES) == models.model_names()


def test_checkpointing_modes_and_outputs_are_the_ones_the_networks_accept():
    assert checkpointing.CHECKPOINTING_MODES is names.CHECKPOINTING_MODES
    assert checkpointing.OUTPUTS is classifier.OUTPUTS is names.OUTPUTS


def test_neuron_config_names_are_the_ones_models_neurons_exports():
    for name in neuron_config.__all__:
        assert getattr(neurons, name) is getattr(neuron_config, name), name
    assert surrogates.Surrogate is neuron_config.Surrogate


def test_every_name_in_models_all_resolves_to_its_defining_module():
    import models.deploy
    import models.firing
    import models.mlp
    import models.tdbn

    for name in models.__all__:
        value = getattr(models, name)
        if name != "model_names":
            assert value is getattr(sys.modules[value.__module__], name), name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        models.not_a_name  # noqa: B018


@pytest.mark.slow
@pytest.mark.parametrize("statement", [
    "import models",
    "import models.names, models.neuron_config",
    "from models.neuron_config import NeuronConfig, NeuronConfigError, Reset, Recurrence, Surrogate",
    "from models.names import CHECKPOINTING_MODES, MODEL_NAMES, OUTPUTS",
])
def test_light_imports_load_no_torch_timm_triton_ffcv_or_deepspeed(statement):
    code = f"import json, sys; {statement}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == []
