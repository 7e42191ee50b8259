"""igarss_exp1_sweep.py: grid paths, timings, and resuming an interrupted sweep."""

import csv

import keras
import numpy as np
import pytest
from conftest import assert_main_error, call_main, parse, run_script

import igarss_exp1_sweep
from common.tgmatl import awir


def test_grid_defaults_are_the_papers():
    args = parse(igarss_exp1_sweep, [])
    assert args.top_percents == [0.40, 0.50, 0.60, 0.70]
    assert args.random_percents == [0.05, 0.10, 0.15, 0.20, 0.25, 0.30]
    assert awir.grid_tag(0.6, 0.15) == "tp60_rp15"


def test_demo_sweep_writes_grid_heads_and_resumes(tmp_path, capsys):
    results = tmp_path / "results"
    common = [
        "--demo",
        "--epochs",
        "2",
        "--embeddings",
        "clip",
        "--workers",
        "1",
        "--results_dir",
        str(results),
        "--top_percents",
        "0.4",
        "0.7",
        "--random_percents",
        "0.05",
    ]
    completed = run_script("igarss_exp1_sweep.py", *common)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "summary: best grid point on validation tp" in completed.stdout
    for tag in ("tp40_rp5", "tp70_rp5"):
        for fold in range(1, 9):
            model_path = (
                results / "trained_models" / "exp1_emb_proj" / "clip" / tag / f"tg_matl_best_fold{fold}.h5"
            )
            projection = (
                results / "exp1_test_projections" / "clip" / tag / f"tg_matl_proj_val0.7_fold{fold}.npy"
            )
            assert model_path.exists() and projection.exists()
    with open(results / "exp1_timings" / "timings_test0.7_sweep.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 16 and list(rows[0]) == [
        "experiment",
        "fold",
        "top_percent",
        "random_percent",
        "train_time",
    ]
    model = keras.models.load_model(
        results / "trained_models" / "exp1_emb_proj" / "clip" / "tp70_rp5" / "tg_matl_best_fold2.h5",
        compile=False,
    )
    assert model.output_shape == (None, 64)
    # An interrupted sweep: one head lost; the re-run trains only that one.
    lost = results / "exp1_test_projections" / "clip" / "tp70_rp5" / "tg_matl_proj_val0.7_fold2.npy"
    kept = np.load(results / "exp1_test_projections" / "clip" / "tp40_rp5" / "tg_matl_proj_val0.7_fold1.npy")
    lost.unlink()
    call_main(igarss_exp1_sweep, common)
    output = capsys.readouterr().out
    assert "15 finished heads reused" in output and "1 heads in" in output
    assert lost.exists()
    np.testing.assert_array_equal(
        np.load(results / "exp1_test_projections" / "clip" / "tp40_rp5" / "tg_matl_proj_val0.7_fold1.npy"),
        kept,
    )


def test_sweep_refuses_other_training_settings(tmp_path, capsys):
    """A re-run with another margin stops before mixing new heads into the finished sweep's tree."""
    results = tmp_path / "results"
    common = [
        "--demo",
        "--epochs",
        "1",
        "--embeddings",
        "clip",
        "--workers",
        "1",
        "--results_dir",
        results,
        "--top_percents",
        "0.4",
        "--random_percents",
        "0.05",
    ]
    call_main(igarss_exp1_sweep, common)
    assert_main_error(
        capsys,
        lambda: call_main(igarss_exp1_sweep, [*common, "--margin", "0.3"]),
        "exp1_sweep_config.json",
        "margin=0.1 (now 0.3)",
    )


def test_best_grid_point_is_chosen_on_validation_and_reported_on_test(tmp_path):
    accuracy = {"tp40_rp5": [(0.99, 0.70), (0.97, 0.72)], "tp70_rp5": [(0.90, 0.90), (0.92, 0.88)]}
    best = igarss_exp1_sweep.report_best_grid_point(accuracy, tmp_path)
    assert best["best"] == "tp70_rp5"  # best on validation, although tp40_rp5 is best on test
    assert best["test_knn5_accuracy"] == pytest.approx(0.91) and best["val_knn5_accuracy"] == pytest.approx(
        0.89
    )
