"""igarss_exp2_sweep.py: CLI, a tiny demo sweep on generated exp1 sweep heads, resumption, bad inputs."""

import argparse
import json

import numpy as np
import pytest
from conftest import assert_main_error, parse, run_script

import igarss_exp2
import igarss_exp2_sweep
from common import atomic
from common.tgmatl import awir

GRID = ((0.4, 0.1), (0.5, 0.2))


def write_exp1_sweep_heads(results, grid, folds, input_dim=awir.PAPER_EMBEDDING_WIDTHS["clip"]):
    """Projection heads in the exp1 sweep's format and place (random weights, real .h5 files)."""
    import keras

    inputs = keras.Input(shape=(input_dim,), name="foundation_embedding")
    model = keras.Model(inputs, keras.layers.Dense(64, name="proj")(inputs), name="ProjectionHead")
    rng = np.random.default_rng(0)
    for top_percent, random_percent in grid:
        for fold in folds:
            model.set_weights(
                [rng.normal(0, 0.05, (input_dim, 64)).astype(np.float32), np.zeros(64, np.float32)]
            )
            path = awir.exp1_head_path(
                results, "clip", "tg_matl", fold, awir.grid_tag(top_percent, random_percent)
            )
            atomic.save_keras(model, path)


def sweep_args(results, *extra):
    return parse(
        igarss_exp2_sweep,
        [
            "--embeddings",
            "clip",
            "--epochs",
            "3",
            "--folds",
            "1",
            "2",
            "--workers",
            "1",
            "--results_dir",
            results,
            *extra,
        ],
    )


def test_help():
    result = run_script("igarss_exp2_sweep.py", "--help", timeout=300)
    assert result.returncode == 0
    assert (
        "--top_percents" in result.stdout
        and "--random_percents" in result.stdout
        and "--demo" in result.stdout
    )


def test_demo_sweep_writes_grid_summary_and_resumes(tmp_path, capsys):
    results = tmp_path / "results"
    write_exp1_sweep_heads(results, GRID, (1, 2))
    report = igarss_exp2_sweep.main(sweep_args(results, "--demo"))
    output = capsys.readouterr().out
    assert "summary: best r2_feat" in output
    assert {report["acc"]["top_percent"], report["acc"]["random_percent"]} <= {0.4, 0.5, 0.1, 0.2}
    for top_percent, random_percent in GRID:
        method = f"tg_matl_{awir.grid_tag(top_percent, random_percent)}"
        for fold in (1, 2):
            npy = results / "exp2_results" / "clip" / f"{method}_fold{fold}_taskhead_metrics.npy"
            assert npy.is_file() and npy.with_suffix(".json").is_file()
            for kind in igarss_exp2.HEAD_KINDS:
                assert igarss_exp2.task_head_path(results, "clip", method, kind, fold).is_file()
    summary = (results / "exp2_results" / "sweep_summary.csv").read_text().splitlines()
    assert summary[0].startswith("embedding,method,top_percent,random_percent,folds,acc_mean")
    assert len(summary) == 1 + len(GRID)
    assert "| clip | tg_matl_tp40_rp10 | 2 |" in (results / "exp2_results" / "sweep_summary.md").read_text()
    for metric in igarss_exp2_sweep.HEATMAP_METRICS:
        assert (results / "exp2_results" / f"sweep_heatmap_{metric}.png").stat().st_size > 0
    # A second run reuses every finished (embedding, config, fold) set instead of retraining.
    first = json.loads(
        (results / "exp2_results" / "clip" / "tg_matl_tp40_rp10_fold1_taskhead_metrics.json").read_text()
    )
    igarss_exp2_sweep.main(sweep_args(results, "--demo"))
    output = capsys.readouterr().out
    assert "reusing 4 finished" in output and "# ---- train" not in output
    again = json.loads(
        (results / "exp2_results" / "clip" / "tg_matl_tp40_rp10_fold1_taskhead_metrics.json").read_text()
    )
    assert again == first
    # Other training arguments are refused instead of mixed into the finished sets.
    assert_main_error(
        capsys,
        lambda: igarss_exp2_sweep.main(sweep_args(results, "--demo", "--epochs", "4")),
        "exp2_sweep_config.json",
        "epochs=3 (now 4)",
    )


def test_missing_sweep_model_names_the_exp1_sweep_command(tmp_path, capsys):
    results = tmp_path / "results"
    data_path, embeddings_dir = awir.make_demo_data(tmp_path / "data", seed=0)
    write_exp1_sweep_heads(results, GRID[:1], (1, 2))
    args = sweep_args(
        results,
        "--data",
        str(data_path),
        "--embeddings_dir",
        str(embeddings_dir),
        "--top_percents",
        "0.4",
        "--random_percents",
        "0.1",
        "0.2",
    )
    assert_main_error(
        capsys,
        lambda: igarss_exp2_sweep.main(args),
        "tp40_rp20/tg_matl_best_fold1.h5",
        "python igarss_exp1_sweep.py",
    )
    assert not (results / "exp2_results").exists()


def test_demo_without_sweep_models(tmp_path, capsys):
    assert_main_error(
        capsys,
        lambda: igarss_exp2_sweep.main(sweep_args(tmp_path / "results", "--demo")),
        "python igarss_exp1_sweep.py --demo",
    )


def test_grid_point_folder_uses_integer_percent():
    assert awir.grid_tag(0.7, 0.05) == "tp70_rp5"
    assert awir.grid_tag(0.4, 0.25) == "tp40_rp25"


def test_best_grid_point_is_chosen_on_validation_and_reported_on_test(capsys):
    """Hand-made rows: the test-best grid point is not the validation-best one; the sweep names the
    validation-best point and reports its test mean (means over embeddings of the fold means)."""
    sources = igarss_exp2_sweep.sweep_sources([(0.4, 0.1), (0.5, 0.2), (0.6, 0.3)], "cmd")
    # (val, test) per grid point and embedding: tp50_rp20 is best on validation, tp60_rp30 on test.
    scores = {
        "tg_matl_tp40_rp10": {"clip": (0.70, 0.80), "mae": (0.60, 0.70)},
        "tg_matl_tp50_rp20": {"clip": (0.90, 0.75), "mae": (0.80, 0.65)},
        "tg_matl_tp60_rp30": {"clip": (0.75, 0.95), "mae": (0.65, 0.85)},
    }
    rows = []
    for method, by_embedding in scores.items():
        for embedding, (val, test) in by_embedding.items():
            row = {"embedding": embedding, "method": method}
            for metric in igarss_exp2.METRICS:
                # Lower MSE is better: the same order as the scores, mirrored.
                sign = -1 if metric in igarss_exp2.LOWER_IS_BETTER else 1
                row[f"{metric}_mean"], row[f"val_{metric}_mean"] = sign * test, sign * val
            rows.append(row)
    args = argparse.Namespace(embeddings=["clip", "mae"], folds=[1, 2, 3])
    report = igarss_exp2_sweep.best_grid_points(rows, sources, args)
    for metric in igarss_exp2.METRICS:
        sign = -1 if metric in igarss_exp2.LOWER_IS_BETTER else 1
        assert report[metric]["method"] == "tg_matl_tp50_rp20", metric
        assert (report[metric]["top_percent"], report[metric]["random_percent"]) == (0.5, 0.2)
        assert report[metric]["val"] == pytest.approx(sign * 0.85)
        assert report[metric]["test"] == pytest.approx(sign * 0.70)  # not the test maximum 0.90
    output = capsys.readouterr().out
    assert (
        "summary: best acc on validation at top_percent 0.50 random_percent 0.20: val 0.850, test 0.700 "
        "(mean over 2 embeddings x 3 folds)" in output
    )
