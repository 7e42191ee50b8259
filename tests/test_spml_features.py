"""train_multilabel_model.py on precomputed features (--dataset features) and the memorisation bench."""

import json

import numpy as np
import pytest
from conftest import assert_main_error, call_main

import train_multilabel_model as tm
from common.spml import features


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    return features.memorisation_task(tmp_path_factory.mktemp("features") / "f.npz", counts=(60, 30, 60))


def argv(path, results, *extra):
    return [
        "--dataset",
        "features",
        "--features",
        str(path),
        "--backbone",
        "linear",
        "--epochs",
        "2",
        "--batch_size",
        "16",
        "--results_dir",
        str(results),
        *extra,
    ]


def test_a_features_run_writes_metrics_at_the_reported_and_the_last_epoch(feature_file, tmp_path):
    metrics = call_main(tm, argv(feature_file, tmp_path, "--method", "an"))
    saved = json.loads(
        (tmp_path / "train_multilabel_model" / "an_features_random" / "metrics.json").read_text()
    )
    assert saved["mAP"] == pytest.approx(metrics["mAP"]) and "mAP" in saved["last_epoch"]


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda a: a.pop("split"), "no 'split' array"),
        (lambda a: a["features"].__setitem__((0, 0), np.nan), "features"),
        (lambda a: a["labels"].__setitem__((0, 0), 2), "labels out of range"),
        (lambda a: a.__setitem__("labels", a["labels"][:, :, None]), "labels"),
        (
            lambda a: a.__setitem__("split", np.where(a["split"] == "test", "val", a["split"])),
            "no ['test'] rows",
        ),
    ],
)
def test_bad_feature_files_end_in_one_error_line(feature_file, tmp_path, capsys, change, fragment):
    with np.load(feature_file) as npz:
        arrays = {key: npz[key].copy() for key in npz.files}
    change(arrays)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    assert_main_error(capsys, lambda: call_main(tm, argv(bad, tmp_path / "r", "--method", "an")), fragment)
    assert not (tmp_path / "r" / "train_multilabel_model").exists()


def test_teacher_ramp_constant_without_a_copy_at_the_trigger_is_refused(feature_file, tmp_path, capsys):
    call = lambda: call_main(tm, argv(feature_file, tmp_path, "--teacher_ramp", "constant"))  # noqa: E731
    assert_main_error(capsys, call, "--teacher_ramp constant", "at_trigger")


def test_the_memorisation_bench_runs_at_a_tiny_size(tmp_path, capsys):
    from bench import spml_methods

    command = "--regime memorisation --seeds 0 1 --methods an adagc --epochs 3 --feature_rows 40"
    spml_methods.main(spml_methods.get_args_parser().parse_args([*command.split(), "--out", str(tmp_path)]))
    printed = capsys.readouterr().out
    assert "AN test mAP per epoch, seed 1" in printed and "adagc vs an" in printed
    for name in ("table.md", "per_seed.md", "paired.md", "an_curve_trigger.png", "runs.csv"):
        assert (tmp_path / name).is_file(), name
