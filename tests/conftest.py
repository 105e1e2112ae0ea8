"""Fixtures shared across rooms: the embedded digits data built once per session."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """sklearn's digits written to FFCV files by the real builder CLI."""
    out = tmp_path_factory.mktemp("data") / "digits"
    subprocess.run([sys.executable, "-m", "data_pipelines.build", "digits", "--out", str(out)],
                   check=True, cwd=REPO, timeout=300, capture_output=True)
    return out
