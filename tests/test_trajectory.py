"""bench.trajectory: the training-trajectory check the GPU script runs, here on CPU in float32, where this
project and transformers + peft must follow the same loss curve to float32 precision."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="needs peft, the baseline: pip install -e .[test]")


@pytest.mark.slow
def test_this_project_and_transformers_peft_follow_the_same_loss_curve(tmp_path):
    from bench import trajectory

    result = trajectory.main(["--shape", "tiny", "--steps", "5", "--rank", "4", "--lr", "1e-2", "--device", "cpu",
                              "--out", str(tmp_path)])
    assert result["hf_vs_hf"] == 0.0  # float32 on a CPU is deterministic
    assert result["this_vs_hf_max"] < 2e-5, result["losses"]
    losses = result["losses"]["this"]
    assert len(losses) == 5 and max(losses) - min(losses) > 1e-3  # the adapter really trained: the curve moves
    assert json.loads((tmp_path / "trajectory.json").read_text())["this_vs_hf"] == result["this_vs_hf"]
