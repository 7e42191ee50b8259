"""segmentation_train.py end to end: --help, a tiny --demo (mirrored strategy on the CPU, with the
mixed-precision request refused), the documented outputs, learning, resume, and bad inputs (one
error line, exit 2, nothing written)."""

import csv
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import (
    assert_main_error,
    assert_tensorboard_holds_log,
    call_main,
    no_temporary_files,
    run_script,
)

import segmentation_train as st
from common.aras400k import classes, patches
from common.errors import InputError

SCRIPT = "segmentation_train.py"
DOCUMENTED_FILES = [
    "config.json",
    "log.csv",
    "state.json",
    "best.weights.h5",
    "best_model.keras",
    "metrics.json",
    "per_class.csv",
    "confusion_matrix.png",
    "curves.png",
    "predictions.zip",
    "examples.png",
]


def read_csv(path):
    return list(csv.DictReader(Path(path).read_text().splitlines()))


def write_pair(split_dir, name, labels, image_size=64, mask_colours=None):
    """One image/mask PNG pair in the real layout; `mask_colours` overrides the palette colours."""
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "masks").mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    cv2.imwrite(str(split_dir / "images" / name), image)
    colours = classes.labels_to_colours(labels) if mask_colours is None else mask_colours
    cv2.imwrite(str(split_dir / "masks" / name), cv2.cvtColor(colours, cv2.COLOR_RGB2BGR))


def make_dataset(root, image_size=64):
    rng = np.random.default_rng(1)
    for split in patches.SPLITS:
        for index in range(2):
            labels = rng.integers(0, classes.NUM_CLASSES, (image_size, image_size)).astype(np.uint8)
            write_pair(root / split, f"p_{index}.png", labels, image_size)
    return root


def assert_input_error(capsys, argv, *fragments, results=None):
    """main (in-process: TensorFlow's start-up lines would precede the error line of a subprocess)
    stops with one error line and exit 2, and writes no run folder."""
    assert_main_error(capsys, lambda: call_main(st, [str(item) for item in argv]), *fragments)
    if results is not None:
        assert not (results / "segmentation_train").exists()


def test_help():
    completed = run_script(SCRIPT, "--help")
    assert completed.returncode == 0
    for flag in ("--data_root", "--encoder", "--unknown_colour", "--mixed_precision", "--demo", "--threads"):
        assert flag in completed.stdout
    assert "--analyze" not in completed.stdout


def test_demo_defaults_keep_the_paper_values_in_help():
    paper = st.get_args_parser().parse_args([])
    assert (paper.epochs, paper.batch_size, paper.image_size, paper.encoder) == (
        20,
        24,
        256,
        "efficientnetb7",
    )
    demo = st.get_args_parser().parse_args("--demo --epochs 3".split())
    assert (demo.epochs, demo.batch_size, demo.image_size, demo.encoder) == (3, 8, 64, "efficientnetb0")
    assert demo.bn_momentum == 0.9 and paper.bn_momentum == 0.99


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    argv = "--demo --demo_images 24 --batch_size 4 --epochs 6 --strategy mirrored --mixed_precision".split()
    completed = run_script(SCRIPT, *argv, "--results_dir", results)
    return results, completed


def test_demo_writes_documented_files(demo_run):
    results, completed = demo_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    run_dir = results / "segmentation_train" / "demo"
    for name in DOCUMENTED_FILES:
        assert (run_dir / name).is_file(), name
    # No temporary or superseded checkpoint files are left behind.
    assert no_temporary_files(run_dir)
    assert len(list(run_dir.glob("checkpoint_epoch*.npz"))) == 1
    assert "note: --mixed_precision needs a GPU" in completed.stdout
    assert "1 replica(s)" in completed.stdout


def test_demo_summary_matches_metrics(demo_run):
    results, completed = demo_run
    run_dir = results / "segmentation_train" / "demo"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert completed.stdout.strip().splitlines()[-1] == metrics["summary"]
    assert f"{100 * metrics['test']['macro_f1']:.2f}" in metrics["summary"]
    per_class = read_csv(run_dir / "per_class.csv")
    assert [row["class"] for row in per_class] == classes.CLASS_NAMES
    log = read_csv(run_dir / "log.csv")
    assert len(log) == metrics["epochs_trained"] >= 1
    # TensorBoard holds log.csv's numbers at every epoch.
    scalars = assert_tensorboard_holds_log(run_dir)
    assert sorted(scalars["val_macro_f1"]) == [int(row["epoch"]) for row in log]


def test_demo_predictions_are_palette_coloured(demo_run):
    results, _ = demo_run
    run_dir = results / "segmentation_train" / "demo"
    test_dir = results / "demo_data" / "segmentation_train" / "test" / "images"
    test_images = sorted(p.name for p in test_dir.glob("*.png"))
    with zipfile.ZipFile(run_dir / "predictions.zip") as archive:
        assert sorted(archive.namelist()) == test_images
        colours = cv2.imdecode(np.frombuffer(archive.read(test_images[0]), np.uint8), cv2.IMREAD_COLOR)
    # Predictions are colour-coded with the palette only.
    labels = classes.colours_to_labels(cv2.cvtColor(colours, cv2.COLOR_BGR2RGB))
    assert (labels < classes.NUM_CLASSES).all()


def test_demo_learns(demo_run):
    results, completed = demo_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((results / "segmentation_train" / "demo" / "metrics.json").read_text())
    # Validation macro-F1 improves clearly over the first epoch, and the test split is far above
    # chance (a uniform guess over 7 classes scores about 0.14 macro-F1).
    assert metrics["best_val_macro_f1"] > metrics["first_epoch_val_macro_f1"] + 0.1
    assert metrics["test"]["macro_f1"] > 0.3


def test_finished_run_is_kept(demo_run, capsys):
    results, _ = demo_run
    metrics_path = results / "segmentation_train" / "demo" / "metrics.json"
    before = metrics_path.read_bytes()
    argv = ["--demo", "--demo_images", 24, "--results_dir", results]
    assert_input_error(capsys, argv, "a finished run with this name exists", "--overwrite")
    assert metrics_path.read_bytes() == before


TINY = (
    "--demo --demo_images 8 --batch_size 4 --image_size 32 --decoder_width 16 --results_dir {} --run_name {}"
)


def test_resumed_run_equals_uninterrupted_run_and_refuses_changed_settings(tmp_path, capsys):
    # In-process, so TensorFlow starts once for the three runs.
    call_main(st, TINY.format(tmp_path, "whole") + " --epochs 2 --no_tensorboard")
    assert not (tmp_path / "segmentation_train" / "whole" / "tensorboard").exists()
    call_main(st, TINY.format(tmp_path, "parts") + " --epochs 1")
    capsys.readouterr()
    # A resume with another loss is refused and leaves the interrupted run as it was.
    log_before = (tmp_path / "segmentation_train" / "parts" / "log.csv").read_bytes()
    argv = (TINY.format(tmp_path, "parts") + " --epochs 2 --resume --loss dice_ce").split()
    assert_input_error(capsys, argv, "config.json", "loss=dice (now dice_ce)", "the same arguments to resume")
    assert (tmp_path / "segmentation_train" / "parts" / "log.csv").read_bytes() == log_before
    # A kill during an atomic write leaves its hidden temporary; --resume removes it.
    (tmp_path / "segmentation_train" / "parts" / ".log.csv.12345.tmp.csv").write_text("epoch\n")
    call_main(st, TINY.format(tmp_path, "parts") + " --epochs 2 --resume")
    assert no_temporary_files(tmp_path / "segmentation_train" / "parts")
    whole, parts = (read_csv(tmp_path / "segmentation_train" / run / "log.csv") for run in ("whole", "parts"))
    columns = ["epoch", "loss", "val_loss", "val_macro_f1", "val_macro_iou", "learning_rate"]
    assert [[row[c] for c in columns] for row in parts] == [[row[c] for c in columns] for row in whole]
    metrics = [
        json.loads((tmp_path / "segmentation_train" / run / "metrics.json").read_text())
        for run in ("whole", "parts")
    ]
    assert metrics[0]["test"] == metrics[1]["test"]
    assert sorted(assert_tensorboard_holds_log(tmp_path / "segmentation_train" / "parts")["loss"]) == [1, 2]


def test_image_without_mask(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    (root / "val" / "masks" / "p_1.png").unlink()
    argv = ["--data_root", root, "--image_size", 64, "--results_dir", tmp_path / "results"]
    fragments = ("val/images/p_1.png: has no mask", "expected a mask of the same name")
    assert_input_error(capsys, argv, *fragments, results=tmp_path / "results")


def test_mask_size_mismatch(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    small = classes.labels_to_colours(np.zeros((32, 32), np.uint8))
    cv2.imwrite(str(root / "train" / "masks" / "p_0.png"), small)
    argv = ["--data_root", root, "--image_size", 64, "--results_dir", tmp_path / "results"]
    assert_input_error(
        capsys, argv, "train/masks/p_0.png: is 32x32 pixels", "64x64", results=tmp_path / "results"
    )


def test_unknown_colour_is_an_error(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    colours = classes.labels_to_colours(np.zeros((64, 64), np.uint8))
    colours[5, 7] = (1, 2, 3)
    write_pair(root / "test", "p_0.png", None, mask_colours=colours)
    argv = ["--data_root", root, "--image_size", 64, "--results_dir", tmp_path / "results"]
    fragments = (
        "test/masks/p_0.png: has 1 pixels of colour (1, 2, 3)",
        "row 5, col 7",
        "--unknown_colour ignore",
    )
    assert_input_error(capsys, argv, *fragments, results=tmp_path / "results")


def test_empty_split(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    for path in (root / "val").rglob("*.png"):
        path.unlink()
    argv = ["--data_root", root, "--image_size", 64, "--results_dir", tmp_path / "results"]
    assert_input_error(capsys, argv, "val/images: holds no .png images", results=tmp_path / "results")


def test_interrupted_run_needs_resume_or_overwrite(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    run_dir = tmp_path / "results" / "segmentation_train" / "interrupted"
    run_dir.mkdir(parents=True)
    (run_dir / "state.json").write_text("{}")
    argv = [
        "--data_root",
        root,
        "--image_size",
        64,
        "--results_dir",
        tmp_path / "results",
        "--run_name",
        "interrupted",
    ]
    assert_input_error(capsys, argv, "an interrupted run with this name exists", "--resume")


def test_unknown_colour_ignore_counts_pixels(tmp_path):
    colours = classes.labels_to_colours(np.full((8, 8), 6, np.uint8))
    colours[0, :3] = (9, 9, 9)
    write_pair(tmp_path, "x.png", None, image_size=8, mask_colours=colours)
    pairs = [(tmp_path / "images" / "x.png", tmp_path / "masks" / "x.png")]
    counts = patches.check_masks(pairs, "ignore", threads=1)
    assert counts[6] == 61 and counts[classes.NUM_CLASSES] == 3
    with pytest.raises(InputError, match=r"3 pixels of colour \(9, 9, 9\)"):
        patches.check_masks(pairs, "error", threads=1)


def test_train_splits_combine_real_synthetic_and_generated_sets(tmp_path):
    root = make_dataset(tmp_path / "data")
    write_pair(root / "synth", "s_0.png", np.zeros((64, 64), np.uint8))
    (root / "train" / "generated").mkdir()
    for name in ("p_0.png", "p_1.png"):
        cv2.imwrite(str(root / "train" / "generated" / name), np.zeros((64, 64, 3), np.uint8))
    args = st.get_args_parser().parse_args(["--data_root", str(root), "--image_size", "64", "--threads", "1"])
    args.train_splits = st.train_split_names(["train synth", "generated"])
    assert args.train_splits == ["train", "synth", "generated"]
    pairs, _ = st.read_splits(args)
    images = [str(image.relative_to(root)) for image, _ in pairs["train"]]
    assert images == [f"train/images/p_{i}.png" for i in (0, 1)] + ["synth/images/s_0.png"] + [
        f"train/generated/p_{i}.png" for i in (0, 1)
    ]
    assert [mask.name for _, mask in pairs["train"][3:]] == ["p_0.png", "p_1.png"]


def test_generated_set_needs_one_image_per_mask(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    (root / "train" / "generated").mkdir()
    cv2.imwrite(str(root / "train" / "generated" / "p_0.png"), np.zeros((64, 64, 3), np.uint8))
    results = tmp_path / "results"
    argv = [
        "--data_root",
        root,
        "--image_size",
        64,
        "--train_splits",
        "train generated",
        "--results_dir",
        results,
    ]
    assert_input_error(capsys, argv, "generated/p_1.png: is missing", results=results)
