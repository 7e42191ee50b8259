"""Fuzzing the LUCAS scripts: every file argument empty, truncated or random bytes, every numeric flag
0, -1 and 10^12. Each ends in exit 0, or exit 2 with one error line, no traceback and nothing new in
the results folder (`conftest.assert_fuzz_outcome`)."""

import shutil

import numpy as np
import pytest
from conftest import HUGE, assert_fuzz_outcome, call_main, corrupted_copies

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
    for kind, bad in corrupted_copies(labels_csv, tmp_path / "csv"):
        argv = classifier_argv(inputs, results, **{"--labels_csv": bad})
        assert_fuzz_outcome(
            capsys, lambda argv=argv: call_main(classifier, argv), results, f"labels CSV {kind}"
        )
    for kind, bad in corrupted_copies(inputs["embeddings"], tmp_path / "npy"):
        argv = classifier_argv(inputs, results, **{"--embeddings": bad})
        assert_fuzz_outcome(
            capsys, lambda argv=argv: call_main(classifier, argv), results, f"embeddings {kind}"
        )
    chip_based = {"--embeddings": "", "--backbone": "simplecnn"}
    for kind, bad in corrupted_copies(chip, tmp_path / "tif"):
        root = chips_with_one_replaced(inputs["chips"], tmp_path / f"root_{kind}", bad)
        argv = classifier_argv(inputs, results, **chip_based, **{"--data_root": root, "--labels_csv": ""})
        code = assert_fuzz_outcome(
            capsys, lambda argv=argv: call_main(classifier, argv), results, f"chip {kind}"
        )
        assert code == 2, f"a {kind} chip was accepted"
    for kind, bad in corrupted_copies(inputs["weights"], tmp_path / "h5"):
        argv = classifier_argv(
            inputs, results, **chip_based, **{"--data_root": inputs["chips"], "--weights": bad}
        )
        argv += ["--labels_csv", ""]
        code = assert_fuzz_outcome(
            capsys, lambda argv=argv: call_main(classifier, argv), results, f"weights {kind}"
        )
        assert code == 2, f"{kind} weights were accepted"


@pytest.mark.parametrize("flag", CLASSIFIER_NUMERIC_FLAGS)
def test_classifier_numeric_flags(flag, inputs, tmp_path, capsys):
    for value in BAD_NUMBERS:
        results = tmp_path / f"results_{value}"
        argv = classifier_argv(inputs, results, **{flag: value})
        assert_fuzz_outcome(capsys, lambda argv=argv: call_main(classifier, argv), results, f"{flag} {value}")


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
    for kind, bad in corrupted_copies(labels_csv, tmp_path / "csv"):
        argv = extractor_argv(inputs, results, **{"--labels_csv": bad})
        assert_fuzz_outcome(
            capsys, lambda argv=argv: call_main(extractor, argv), results, f"labels CSV {kind}"
        )
    for kind, bad in corrupted_copies(inputs["checkpoint"], tmp_path / "ckpt"):
        argv = extractor_argv(inputs, results, **{"--checkpoint": bad})
        code = assert_fuzz_outcome(
            capsys, lambda argv=argv: call_main(extractor, argv), results, f"checkpoint {kind}"
        )
        assert code == 2, f"a {kind} checkpoint was accepted"
    for kind, bad in corrupted_copies(chip, tmp_path / "tif"):
        root = chips_with_one_replaced(inputs["chips"], tmp_path / f"root_{kind}", bad)
        argv = extractor_argv(inputs, results, **{"--data_root": root})
        code = assert_fuzz_outcome(
            capsys, lambda argv=argv: call_main(extractor, argv), results, f"chip {kind}"
        )
        assert code == 2, f"a {kind} chip was accepted"


@pytest.mark.parametrize("flag", EXTRACTOR_NUMERIC_FLAGS)
def test_extractor_numeric_flags(flag, inputs, tmp_path, capsys):
    for value in BAD_NUMBERS:
        results = tmp_path / f"results_{value}"
        argv = extractor_argv(inputs, results, **{flag: value})
        assert_fuzz_outcome(capsys, lambda argv=argv: call_main(extractor, argv), results, f"{flag} {value}")
