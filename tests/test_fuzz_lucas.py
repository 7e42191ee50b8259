"""Fuzzing the LUCAS scripts: every file argument empty, truncated or random bytes, every numeric flag
0, -1 and 10^12. Each ends in exit 0, or exit 2 with one error line, no traceback and nothing new in
the results folder (`conftest.assert_fuzz_outcome`)."""

import shutil

import numpy as np
import pytest
from conftest import HUGE, assert_fuzz_outcome, call_main, fuzz_file_flag, fuzz_numeric_flags

import extract_terramind_embeddings as extractor
import train_lucas_classifier as classifier
from common.raster import write_geotiff

# rasterio's own use of the affine package, inside write_geotiff's default transform.
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")

BAD_NUMBERS = (0, -1, HUGE)
CLASSIFIER_NUMERIC_FLAGS = (
    "--epochs",
    "--batch_size",
    "--seeds",
    "--seed",
    "--split_seed",
    "--val_fraction",
    "--test_fraction",
    "--image_size",
    "--mlp_dim",
    "--head_dropout",
    "--focal_gamma",
    "--learning_rate",
    "--weight_decay",
    "--demo_scale",
)
EXTRACTOR_NUMERIC_FLAGS = ("--layer", "--batch_size", "--seed", "--demo_scale", "--demo_epochs")


def make_chips(root, counts=(4, 3, 3), size=16, seed=0):
    """Tiny 6-band chips <root>/<STR18>/<Point_ID>.tif and chips_LC_class.csv."""
    rng = np.random.default_rng(seed)
    lines, point_id = ["Point_ID,STR18"], 7000
    for label, count in enumerate(counts):
        for _ in range(count):
            point_id += 1
            chip = rng.uniform(0.0, 0.4, (6, size, size)).astype(np.float32)
            write_geotiff(root / str(label + 1) / f"{point_id}.tif", chip)
            lines.append(f"{point_id},{label + 1}")
    (root / "chips_LC_class.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Chips, their labels, tiny embeddings, backbone weights and a TerraMind-tiny checkpoint."""
    folder = tmp_path_factory.mktemp("fuzz_inputs")
    chips = make_chips(folder / "chips")
    embeddings = folder / "embeddings.npy"
    np.save(embeddings, np.random.default_rng(0).normal(size=(10, 2, 4)).astype(np.float32))
    weights = folder / "simplecnn.weights.h5"
    classifier.simple_cnn((16, 16, 6)).save_weights(weights)
    checkpoint = extractor.write_random_checkpoint(folder / "TerraMind_v1_tiny.safetensors", "tiny")
    return {"chips": chips, "embeddings": embeddings, "weights": weights, "checkpoint": checkpoint}


def classifier_argv(inputs, results, **replaced):
    """A one-epoch head on the embeddings, with flags replaced or added."""
    flags = {
        "--labels_csv": inputs["chips"] / "chips_LC_class.csv",
        "--embeddings": inputs["embeddings"],
        "--epochs": 1,
        "--batch_size": 4,
        "--val_fraction": 0.3,
        "--results_dir": results,
    } | replaced
    return [str(item) for flag, value in flags.items() for item in (flag, value)]


def chips_with_one_replaced(chips, folder, bad_chip):
    """A copy of the chips folder whose first chip of class 1 is `bad_chip`."""
    copy = folder / "chips"
    shutil.copytree(chips, copy)
    shutil.copyfile(bad_chip, copy / "1" / bad_chip.name)
    return copy


def test_classifier_file_arguments(inputs, tmp_path, capsys):
    labels_csv = inputs["chips"] / "chips_LC_class.csv"
    chip = sorted((inputs["chips"] / "1").glob("*.tif"))[0]
    results = tmp_path / "results"
    base = classifier_argv(inputs, results)

    def fuzz(argv, flag, valid, refused=True):
        folder = tmp_path / valid.suffix[1:]
        return fuzz_file_flag(capsys, classifier, argv, flag, valid, folder, results, refused)

    fuzz(base, "--labels_csv", labels_csv, refused=False)
    fuzz(base, "--embeddings", inputs["embeddings"], refused=False)
    chip_based = {"--embeddings": "", "--backbone": "simplecnn", "--labels_csv": ""}

    def chips_argv(bad):
        root = chips_with_one_replaced(inputs["chips"], tmp_path / f"root_{bad.parent.name}", bad)
        return classifier_argv(inputs, results, **chip_based, **{"--data_root": root})

    fuzz(chips_argv, None, chip)
    fuzz(
        classifier_argv(inputs, results, **chip_based, **{"--data_root": inputs["chips"]}),
        "--weights",
        inputs["weights"],
    )


def test_classifier_numeric_flags(inputs, capsys):
    """Values check_arguments refuses run through main one by one; the accepted ones train together."""
    make_argv = lambda results: classifier_argv(inputs, results)  # noqa: E731
    codes = fuzz_numeric_flags(
        capsys, classifier, make_argv, CLASSIFIER_NUMERIC_FLAGS, check=classifier.check_arguments
    )
    for flag in ("--epochs", "--batch_size", "--learning_rate"):
        assert codes[f"{flag} 0"] == codes[f"{flag} -1"] == 2, flag


def extractor_argv(inputs, results, **replaced):
    flags = {
        "--data_root": inputs["chips"],
        "--checkpoint": inputs["checkpoint"],
        "--variant": "tiny",
        "--batch_size": 4,
        "--results_dir": results,
    } | replaced
    return [str(item) for flag, value in flags.items() for item in (flag, value)]


def test_extractor_file_arguments(inputs, tmp_path, capsys):
    labels_csv = inputs["chips"] / "chips_LC_class.csv"
    chip = sorted((inputs["chips"] / "1").glob("*.tif"))[0]
    results = tmp_path / "results"
    base = extractor_argv(inputs, results)

    def fuzz(argv, flag, valid, refused=True):
        folder = tmp_path / valid.suffix[1:]
        return fuzz_file_flag(capsys, extractor, argv, flag, valid, folder, results, refused)

    fuzz(base, "--labels_csv", labels_csv, refused=False)
    fuzz(base, "--checkpoint", inputs["checkpoint"])

    def chips_argv(bad):
        root = chips_with_one_replaced(inputs["chips"], tmp_path / f"root_{bad.parent.name}", bad)
        return extractor_argv(inputs, results, **{"--data_root": root})

    fuzz(chips_argv, None, chip)


@pytest.mark.parametrize("flag", EXTRACTOR_NUMERIC_FLAGS)
def test_extractor_numeric_flags(flag, inputs, tmp_path, capsys):
    for value in BAD_NUMBERS:
        results = tmp_path / f"results_{value}"
        argv = extractor_argv(inputs, results, **{flag: value})
        assert_fuzz_outcome(capsys, lambda argv=argv: call_main(extractor, argv), results, f"{flag} {value}")
