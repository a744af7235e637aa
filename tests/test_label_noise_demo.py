"""python/label_noise_demo.py: every recipe runs, the compute-matched baseline goes on past V1's steps, and the
loss plot draws terms that are computed only on some steps."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
import label_noise_demo  # noqa: E402


def test_smooth_draws_a_term_computed_every_second_step():
    # The teacher term is missing (None; NaN before) on the steps that skip it; with a window of one step a
    # moving mean over every step left no two neighbouring points, so matplotlib drew no line at all.
    steps = list(range(1, 9))
    values = [None, None, 4.0, None, 2.0, None, 6.0, None]
    xs, ys = label_noise_demo.smooth(steps, values, window=1)
    assert (xs, ys) == ([3, 5, 7], [4.0, 2.0, 6.0])
    xs, ys = label_noise_demo.smooth(steps, values, window=4)
    assert (xs, ys) == ([3, 5, 7], [4.0, 3.0, 4.0])  # the values within the last 4 steps


def test_a_tiny_run_trains_every_recipe_for_every_seed(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    threads = torch.get_num_threads()
    try:
        label_noise_demo.main(["--steps", "6", "--evals", "2", "--train-examples", "16", "--test-examples", "4",
                               "--length", "512", "--batch", "2", "--seeds", "0", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "results.json").read_text())
    assert sorted(summary["runs"]) == sorted(recipe.name for recipe in label_noise_demo.RECIPES)
    for name, per_seed in summary["runs"].items():
        assert len(per_seed) == 2, name
        assert all(math.isfinite(v) for result in per_seed for v in result["sdr_per_stem"].values()), name
    for result in summary["runs"]["plain L1"]:
        # Plain L1 runs the V1 run's 6 steps (the same batches: its own result there) and then on to V1's time.
        assert result["at_steps"]["steps"] == 6 and result["steps"] >= 6
    assert all("teacher_sdr_per_stem" in result for result in summary["runs"]["V2"])
    assert (tmp_path / "sdr.png").stat().st_size and (tmp_path / "losses.png").stat().st_size
    assert "mean ± std of seeds [0, 1]" in capsys.readouterr().out
    history = summary["runs"]["V1"][0]["history"]
    assert len(history["step"]) == 6 and set(history["terms"]) == {"loss", "l1", "mixit", "teacher"}
    # --replot draws the same figures again from results.json, training nothing.
    label_noise_demo.main(["--replot", str(tmp_path / "results.json"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "sdr.png").stat().st_size and (tmp_path / "again" / "losses.png").stat().st_size
    assert "plain L1, 6 steps" in capsys.readouterr().out
