"""train_lucas_classifier.py end to end: --help, the demo as a subprocess, bad inputs (one line, exit 2,
nothing half-written), resume, fine-tuning from chips, and the imbalance learning check."""

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import (
    assert_main_error,
    assert_tensorboard_holds_log,
    call_main,
    no_temporary_files,
    parse,
    run_script,
)

import train_lucas_classifier as classifier
from common.lucas import demo_chips, lucas_chips
from common.raster import write_geotiff

# rasterio's own use of the affine package, inside write_geotiff's default transform.
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")

STEM = "train_lucas_classifier"


def make_chips(root, counts=(4, 3, 3), size=8, seed=0):
    """Tiny 6-band float chips <root>/<STR18>/<Point_ID>.tif plus chips_LC_class.csv."""
    rng = np.random.default_rng(seed)
    rows, point_id = [], 1000
    for class_index, count in enumerate(counts):
        for _ in range(count):
            point_id += 1
            chip = (0.1 * (class_index + 1) + 0.02 * rng.standard_normal((6, size, size))).astype(np.float32)
            write_geotiff(Path(root) / str(class_index + 1) / f"{point_id}.tif", chip)
            rows.append((point_id, class_index + 1))
    write_labels(root, rows)
    return Path(root)


def write_labels(root, rows):
    with open(Path(root) / "chips_LC_class.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["Point_ID", "STR18"])
        writer.writerows(rows)


def run_main(argv):
    return call_main(classifier, [str(item) for item in argv])


def assert_input_error(argv, capsys, results_dir, *fragments):
    line = assert_main_error(capsys, lambda: run_main(argv), *fragments)
    # Validation happens before anything is written.
    assert not (Path(results_dir) / STEM).exists()
    return line


def test_help_lists_the_study_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        classifier.get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--data_root",
        "--embeddings",
        "--loss",
        "--decoder",
        "--class_weights",
        "--focal_weighting",
        "--focal_form",
        "--monitor",
        "--grid",
        "--seeds",
        "--test_fraction",
        "--mixed_precision",
        "--freeze_backbone",
        "--resume",
    ):
        assert flag in text
    # The study's values are the defaults --help shows; --demo's replace them only when not typed.
    assert "Training epochs (study: 100). (--demo: 30) (default: 100)" in " ".join(text.split())
    assert "(study: val macro accuracy). (default: val_macro_accuracy)" in " ".join(text.split())
    defaults = classifier.get_args_parser().parse_args([])
    assert (defaults.focal_form, defaults.monitor) == ("smp", "val_macro_accuracy")


def test_demo_defaults_apply_only_to_flags_not_typed():
    demo = parse(classifier, "--demo --epochs 5")
    assert (demo.epochs, demo.learning_rate, demo.backbone) == (5, 1e-3, "simplecnn")
    plain = parse(classifier, "--data_root chips")
    assert (plain.epochs, plain.learning_rate, plain.backbone) == (100, 1e-4, "resnet50")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("demo") / "results"
    completed = run_script(
        f"{STEM}.py",
        *"--demo --grid --epochs 2 --backbone simplecnn".split(),
        "--results_dir",
        results,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed, results, results / STEM / "simplecnn-frozen_grid_demo"


def test_demo_grid_writes_every_documented_file(demo_run):
    _, results, run_dir = demo_run
    expected = [
        "config.json",
        "splits.json",
        "metrics.json",
        "summary_val.csv",
        "summary_val.md",
        "per_class_val.csv",
        "per_class_accuracy_val.png",
        "features_seed0.npy",
        "feature_extractor_seed0.keras",
    ]
    for loss, decoder in classifier.GRID:
        expected.append(f"confusion_{loss}_{decoder}_val.png")
        for seed in (0,):
            for name in (
                "log.csv",
                "metrics.json",
                "head.keras",
                "checkpoint_best.keras",
                "checkpoint_last.npz",
                "state.json",
            ):
                expected.append(f"{loss}_{decoder}/seed{seed}/{name}")
    missing = [name for name in expected if not (run_dir / name).is_file()]
    assert not missing
    assert (results / "demo_data" / STEM / "chips_LC_class.csv").is_file()
    assert no_temporary_files(run_dir)


def test_demo_summary_line_matches_metrics(demo_run):
    completed, _, run_dir = demo_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert completed.stdout.strip().splitlines()[-1] == metrics["summary_line"]
    summary = metrics["summary"]["val"]
    assert set(summary) == {f"{loss}/{decoder}" for loss, decoder in classifier.GRID}
    for values in summary.values():
        assert values["seeds"] == 1 and 0 <= values["macro_accuracy_mean"] <= 1
    with open(run_dir / "summary_val.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4 and {"overall_accuracy_mean", "macro_accuracy_std", "macro_f1_mean"} <= set(rows[0])


def test_demo_checkpoint_is_the_best_val_macro_accuracy_epoch(demo_run):
    """The study kept the checkpoint of the best val/Accuracy, its macro accuracy."""
    _, _, run_dir = demo_run
    for loss, decoder in classifier.GRID:
        folder = run_dir / f"{loss}_{decoder}" / "seed0"
        with open(folder / "log.csv") as file:
            log = [float(row["val_macro_accuracy"]) for row in csv.DictReader(file)]
        assert json.loads((folder / "state.json").read_text())["best"] == pytest.approx(max(log))


def test_demo_tensorboard_holds_each_runs_log(demo_run):
    _, _, run_dir = demo_run
    for loss, decoder in classifier.GRID:
        scalars = assert_tensorboard_holds_log(run_dir / f"{loss}_{decoder}" / "seed0")
        assert sorted(scalars["val_macro_accuracy"]) == [1, 2]


def test_demo_chips_have_the_lucas_imbalance(demo_run, tmp_path):
    _, results, _ = demo_run
    _, labels = lucas_chips.read_labels(results / "demo_data" / STEM / "chips_LC_class.csv")
    counts = np.bincount(labels, minlength=10)
    study = np.array(lucas_chips.STUDY_CHIP_COUNTS)
    np.testing.assert_allclose(counts / counts.sum(), study / study.sum(), atol=0.002)
    assert counts.max() / counts.min() == pytest.approx(study.max() / study.min())  # 704 : 20
    # Chips written with another --demo_scale are rewritten, never silently reused.
    demo_chips.write_demo_chips(tmp_path, 0.01, chip_size=4)
    demo_chips.write_demo_chips(tmp_path, 0.02, chip_size=4)
    assert len(lucas_chips.read_labels(tmp_path / lucas_chips.LABELS_CSV_NAME)[1]) == sum(
        max(5, round(count * 0.02)) for count in study
    )


def test_demo_splits_and_config(demo_run):
    _, _, run_dir = demo_run
    splits = json.loads((run_dir / "splits.json").read_text())
    assert len(splits["train"]) + len(splits["val"]) == 498 and not set(splits["train"]) & set(splits["val"])
    config = json.loads((run_dir / "config.json").read_text())
    assert len(config["derived"]["band_mean"]) == 6 and config["derived"]["split_sizes"]["val"] == 100


def test_seed_summary_is_mean_and_sample_std():
    def seed_result(oa, macro, f1, per_class):
        return {
            "val": {
                "overall_accuracy": oa,
                "macro_accuracy": macro,
                "macro_f1": f1,
                "macro_precision": f1,
                "per_class": [{"accuracy": value} for value in per_class],
                "confusion_matrix": np.eye(3, dtype=int).tolist(),
            }
        }

    results = {
        "wce/identity": [
            seed_result(0.5, 0.4, 0.3, [1.0, 0.5, np.nan]),
            seed_result(0.7, 0.2, 0.5, [0.0, 0.5, np.nan]),
        ]
    }
    summary = classifier.summarise(results, "val")["wce/identity"]
    assert np.isclose(summary["overall_accuracy_mean"], 0.6)
    assert np.isclose(summary["overall_accuracy_std"], np.std([0.5, 0.7], ddof=1))
    assert np.isclose(summary["macro_accuracy_std"], np.std([0.4, 0.2], ddof=1))
    np.testing.assert_allclose(summary["per_class_accuracy_mean"], [0.5, 0.5, np.nan])
    assert summary["confusion_matrix_sum"] == (2 * np.eye(3, dtype=int)).tolist() and summary["seeds"] == 2
    line = classifier.summary_line({"wce/identity": summary}, "val")
    assert line.startswith("summary (val, 2 seeds): wce/identity OA 0.600+-0.141 macc 0.300+-0.141")


def test_unreadable_chip_is_one_line_error(tmp_path, capsys):
    root = make_chips(tmp_path / "chips")
    (root / "2" / "1005.tif").write_bytes(b"this is not a GeoTIFF")
    results = tmp_path / "results"
    assert_input_error(
        ["--data_root", str(root), "--results_dir", str(results)],
        capsys,
        results,
        "1005.tif",
        "cannot be read as a raster",
    )


def test_band_count_mismatch_is_one_line_error(tmp_path, capsys):
    root = make_chips(tmp_path / "chips")
    write_geotiff(root / "3" / "1009.tif", np.zeros((5, 8, 8), np.float32))
    results = tmp_path / "results"
    assert_input_error(
        ["--data_root", str(root), "--results_dir", str(results)],
        capsys,
        results,
        "1009.tif",
        "has 5 bands",
        "expected 6 bands",
    )


def test_class_in_csv_without_chips_is_one_line_error(tmp_path, capsys):
    root = make_chips(tmp_path / "chips")
    with open(root / "chips_LC_class.csv", "a") as file:
        file.write("2001,4\n2002,4\n")
    results = tmp_path / "results"
    assert_input_error(
        ["--data_root", str(root), "--results_dir", str(results)],
        capsys,
        results,
        "no chip folder for class STR18 4 (Wooded areas)",
        "lists 2 chips",
    )


def test_missing_chip_and_bad_labels_are_one_line_errors(tmp_path, capsys):
    root = make_chips(tmp_path / "chips")
    results = tmp_path / "results"
    (root / "1" / "1002.tif").rename(root / "2" / "1002.tif")
    assert_input_error(
        ["--data_root", str(root), "--results_dir", str(results)],
        capsys,
        results,
        "1002.tif",
        "not found",
        "found in 2/ instead",
    )
    write_labels(root, [(1001, 1), (1003, 11)])
    assert_input_error(
        ["--data_root", str(root), "--results_dir", str(results)],
        capsys,
        results,
        "chips_LC_class.csv",
        "STR18",
        "an integer 1..10",
    )


def test_embeddings_row_mismatch_is_one_line_error(tmp_path, capsys):
    root = make_chips(tmp_path / "chips")
    np.save(tmp_path / "emb.npy", np.zeros((7, 4), np.float32))
    results = tmp_path / "results"
    assert_input_error(
        [
            "--labels_csv",
            str(root / "chips_LC_class.csv"),
            "--embeddings",
            str(tmp_path / "emb.npy"),
            "--results_dir",
            str(results),
        ],
        capsys,
        results,
        "emb.npy",
        "has 7 rows",
        "has 10",
    )


def test_nan_chip_found_while_reading_is_one_line_error(tmp_path, capsys):
    root = make_chips(tmp_path / "chips", counts=(6, 6))
    chip = np.full((6, 8, 8), 0.1, np.float32)
    chip[2, 3, 4] = np.nan
    for point_id in range(1001, 1013):  # every chip, so the train split certainly holds one
        write_geotiff(root / ("1" if point_id <= 1006 else "2") / f"{point_id}.tif", chip)
    results = tmp_path / "results"
    assert_input_error(
        ["--data_root", str(root), "--results_dir", str(results)],
        capsys,
        results,
        ".tif",
        "chip values contain NaN",
    )


def imbalanced_embeddings(path, counts=(800, 100, 50, 50), seed=0):
    """Overlapping Gaussian classes: an unweighted loss favours the majority in the overlap."""
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0], [1.2, 0.0], [0.0, 1.2], [1.2, 1.2]])
    features, rows = [], []
    for class_index, count in enumerate(counts):
        features.append(
            np.concatenate(
                [
                    means[class_index] + 0.6 * rng.standard_normal((count, 2)),
                    0.3 * rng.standard_normal((count, 6)),
                ],
                axis=1,
            )
        )
        rows += [(10000 + len(rows) + i, class_index + 1) for i in range(count)]
    path.mkdir(parents=True, exist_ok=True)
    write_labels(path, rows)
    np.save(path / "embeddings.npy", np.concatenate(features).astype(np.float32))
    return path / "chips_LC_class.csv", path / "embeddings.npy"


def test_weighted_ce_beats_unweighted_ce_on_macro_accuracy(tmp_path):
    labels_csv, embeddings = imbalanced_embeddings(tmp_path / "data")
    scores = {}
    for loss in ("ce", "wce"):
        summary = run_main(
            [
                "--labels_csv",
                str(labels_csv),
                "--embeddings",
                str(embeddings),
                "--loss",
                loss,
                "--epochs",
                "8",
                "--batch_size",
                "32",
                "--learning_rate",
                "0.01",
                "--results_dir",
                str(tmp_path / "results"),
            ]
        )
        scores[loss] = summary["val"][f"{loss}/identity"]
    # The study's trade-off: weighting buys macro accuracy (minority recall) at some overall accuracy.
    assert scores["wce"]["macro_accuracy_mean"] > scores["ce"]["macro_accuracy_mean"] + 0.08, scores
    assert scores["ce"]["overall_accuracy_mean"] > scores["wce"]["overall_accuracy_mean"], scores
    assert scores["wce"]["macro_accuracy_mean"] > 0.5  # chance is 0.25


def test_resume_extends_a_run_and_finished_runs_are_protected(tmp_path, capsys):
    labels_csv, embeddings = imbalanced_embeddings(tmp_path / "data", counts=(60, 20, 20, 20))
    base = [
        "--labels_csv",
        str(labels_csv),
        "--embeddings",
        str(embeddings),
        "--decoder",
        "mlp",
        "--results_dir",
        str(tmp_path / "results"),
        "--batch_size",
        "32",
        "--test_fraction",
        "0.2",
    ]
    run_main([*base, "--epochs", "2", "--no_tensorboard"])
    run_dir = tmp_path / "results" / STEM / "emb-embeddings_wce-mlp"
    assert not (run_dir / "wce_mlp" / "seed0" / "tensorboard").exists()
    assert_main_error(
        capsys, lambda: run_main([*base, "--epochs", "2"]), "a finished run with this name exists"
    )
    summary = run_main([*base, "--epochs", "3", "--resume"])
    with open(run_dir / "wce_mlp" / "seed0" / "log.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["1", "2", "3"]
    # Without --no_tensorboard the resumed run writes the epochs it trains.
    assert sorted(
        classifier.tensorboard.read_scalars(run_dir / "wce_mlp" / "seed0" / "tensorboard")["loss"]
    ) == [3]
    assert json.loads((run_dir / "wce_mlp" / "seed0" / "metrics.json").read_text())["epochs"] == 3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["headline_split"] == "test" and set(summary) == {"val", "test"}
    assert (run_dir / "summary_test.md").is_file() and (run_dir / "confusion_wce_mlp_test.png").is_file()


def test_resume_with_changed_settings_is_refused(tmp_path, capsys):
    labels_csv, embeddings = imbalanced_embeddings(tmp_path / "data", counts=(60, 20, 20, 20))
    base = [
        "--labels_csv",
        labels_csv,
        "--embeddings",
        embeddings,
        "--results_dir",
        tmp_path / "results",
        "--batch_size",
        "32",
        "--epochs",
        "1",
    ]
    run_main(base)
    config = tmp_path / "results" / STEM / "emb-embeddings_wce-identity" / "config.json"
    before = config.read_text()
    assert_main_error(
        capsys,
        lambda: run_main([*base, "--resume", "--learning_rate", "0.01"]),
        "config.json",
        "learning_rate=0.0001 (now 0.01)",
        "--overwrite",
    )
    assert config.read_text() == before  # the record of the earlier run is kept
    run_main([*base, "--resume", "--epochs", "2"])  # more epochs extend the same results


def test_finetuning_from_chips_exports_a_model_on_raw_reflectance(tmp_path):
    root = make_chips(tmp_path / "chips", counts=(6, 6, 6), size=16)
    run_main(
        [
            "--data_root",
            str(root),
            "--backbone",
            "simplecnn",
            "--no-freeze_backbone",
            "--epochs",
            "1",
            "--loss",
            "focal",
            "--results_dir",
            str(tmp_path / "results"),
        ]
    )
    run_dir = tmp_path / "results" / STEM / "simplecnn-finetune_focal-identity"
    model = keras.saving.load_model(run_dir / "focal_identity" / "seed0" / "model.keras")
    logits = model.predict(np.full((2, 16, 16, 6), 0.2, np.float32), verbose=0)
    assert logits.shape == (2, 10) and np.isfinite(logits).all()


def test_moved_results_tree_with_its_inputs_resumes_and_alone_is_refused(tmp_path, capsys):
    """Input paths are recorded relative to the run folder: moving results and inputs together keeps
    --resume working; moving the results tree alone is a changed setting."""
    labels_csv, embeddings = imbalanced_embeddings(tmp_path / "old" / "data", counts=(30, 10, 10, 10))

    def argv(root, results, epochs):
        data = root / "data"
        return [
            *("--labels_csv", data / labels_csv.name, "--embeddings", data / embeddings.name),
            *("--results_dir", results, "--epochs", epochs, "--batch_size", "32", "--resume"),
        ]

    run_main(argv(tmp_path / "old", tmp_path / "old" / "results", 1))
    (tmp_path / "old").rename(tmp_path / "new")
    run_main(argv(tmp_path / "new", tmp_path / "new" / "results", 2))
    run_dir = tmp_path / "new" / "results" / STEM / "emb-embeddings_wce-identity"
    assert json.loads((run_dir / "wce_identity" / "seed0" / "metrics.json").read_text())["epochs"] == 2
    assert (
        json.loads((run_dir / "config.json").read_text())["args"]["embeddings"]
        == "../../../data/embeddings.npy"
    )
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "new" / "results").rename(tmp_path / "elsewhere" / "results")
    assert_main_error(
        capsys,
        lambda: run_main(argv(tmp_path / "new", tmp_path / "elsewhere" / "results", 3)),
        "embeddings",
        "labels_csv",
    )


def test_grid_pairs_wce_with_focal_per_decoder_over_seeds(tmp_path):
    """Hand-made per-seed results: per-seed differences wce - focal, mean, t interval, wins, Wilcoxon
    p from n = 5, and "sure" only where the interval excludes 0; the table is written per split."""

    def result(oa, macc, f1):
        return {"val": {"overall_accuracy": oa, "macro_accuracy": macc, "macro_f1": f1}}

    focal = [0.50, 0.52, 0.48, 0.51, 0.49]
    results = {
        # wce/identity beats focal/identity on macro accuracy by 0.10 +- 0.01 on every seed.
        "wce/identity": [
            result(f, f + 0.1 + d, 0.4) for f, d in zip(focal, [0, 0.01, -0.01, 0.02, 0], strict=True)
        ],
        "focal/identity": [result(f, f, 0.4) for f in focal],
        # wce/mlp and focal/mlp trade places: no sure difference.
        "wce/mlp": [
            result(f + d, f, 0.5) for f, d in zip(focal, [0.05, -0.05, 0.04, -0.04, 0.01], strict=True)
        ],
        "focal/mlp": [result(f, f, 0.5) for f in focal],
    }
    cells, rows = classifier.paired_comparisons(results, "val")
    by_name = {(row["comparison"], row["metric"]): row for row in rows}
    macro = by_name[("wce/identity vs focal/identity", "macro acc")]
    assert macro["per_seed_differences"] == [0.1, 0.11, 0.09, 0.12, 0.1]
    assert macro["mean_difference"] == "+0.104" and macro["wins"] == "5/5" and macro["sure"] == "yes"
    assert macro["wilcoxon_p"] == "0.0625"
    oa = by_name[("wce/mlp vs focal/mlp", "OA")]
    assert oa["per_seed_differences"] == [0.05, -0.05, 0.04, -0.04, 0.01]
    assert oa["wins"] == "3/5" and oa["sure"] == "no"
    assert by_name[("wce/identity vs focal/identity", "OA")]["sure"] == "no"  # all ties
    assert len(cells) == 6 and cells[0][-1].count(" ") == 4  # per-seed column
    written = classifier.write_paired(tmp_path, results, "val")
    assert written == rows and "| sure |" in (tmp_path / "paired_val.md").read_text()
    # One seed pairs nothing: no table.
    one_seed = {config: per_seed[:1] for config, per_seed in results.items()}
    assert classifier.write_paired(tmp_path / "one", one_seed, "val") == []
