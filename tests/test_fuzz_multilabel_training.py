"""Fuzzing train_multilabel_model.py and meta_parameters_tuning.py: every file argument empty, truncated
and random bytes, every numeric flag 0, -1 and 10**12. Each case ends in exit 0, or exit 2 with one
error line, no traceback and nothing new in the results folder (conftest.assert_fuzz_outcome).
Refused values stop in the scripts' argument checks; the accepted ones train together (a linear head on
8-d feature vectors, one epoch; the study one trial), never one run each.
"""

import pytest
from conftest import HUGE, fuzz_file_flag, fuzz_numeric_flags, swapped_in

import meta_parameters_tuning as tuning
import train_multilabel_model as tm
from common.spml import aid_multilabel, features

TRAINER_FLAGS = (
    *(flag for rows in tm.FLAGS.values() for flag, default, *_ in rows if type(default) in (int, float)),
    "--demo_images",
    "--seed",
)
TUNING_FLAGS = (*TRAINER_FLAGS, "--n_trials", "--tune_epochs")


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    path = tmp_path_factory.mktemp("spml_fuzz") / "features.npz"
    return features.memorisation_task(path, num_classes=4, dim=8, counts=(16, 8, 8))


def trainer_argv(vectors, results, method="adagc"):
    tiny = f"--backbone linear --method {method} --epochs 1 --batch_size 8 --expected_num_positives 1"
    return f"--dataset features --features {vectors} {tiny} --results_dir {results}".split()


def tuning_argv(vectors, results):
    return [*trainer_argv(vectors, results, "an_ls"), *"--n_trials 1 --tune_epochs 1".split()]


def test_trainer_numeric_flags(vectors, capsys):
    make_argv = lambda results: trainer_argv(vectors, results)  # noqa: E731
    codes = fuzz_numeric_flags(capsys, tm, make_argv, TRAINER_FLAGS, check=tm.resolve_derived)
    for flag in ("--epochs", "--batch_size", "--learning_rate", "--demo_images"):
        assert codes[f"{flag} 0"] == codes[f"{flag} -1"] == 2, flag
    for flag in ("--epochs", "--image_size", "--demo_images", "--seed"):
        assert codes[f"{flag} {HUGE}"] == 2, flag


def test_tuning_numeric_flags(vectors, capsys):
    make_argv = lambda results: tuning_argv(vectors, results)  # noqa: E731
    codes = fuzz_numeric_flags(capsys, tuning, make_argv, TUNING_FLAGS, check=tuning.check_arguments)
    for flag in ("--n_trials", "--epochs"):
        assert codes[f"{flag} 0"] == codes[f"{flag} -1"] == codes[f"{flag} {HUGE}"] == 2, flag
    assert codes["--tune_epochs -1"] == codes[f"--tune_epochs {HUGE}"] == 2


def test_damaged_features_weights_and_config(vectors, tmp_path, capsys):
    results = tmp_path / "results"
    for module, base in ((tm, trainer_argv(vectors, results)), (tuning, tuning_argv(vectors, results))):
        fuzz_file_flag(capsys, module, base, "--features", vectors, tmp_path / "features", results)
        config = tmp_path / "config.yaml"
        config.write_text("seed: 3\n")
        # An accepted file only prints the settings: -c is read by the parser, before main.
        printing = [*base, "--print_config"]
        fuzz_file_flag(capsys, module, printing, "-c", config, tmp_path / "config", results, refused=False)
    weights = tmp_path / "linear.weights.h5"
    tm.build_classifier("linear", (8,), 4).save_weights(weights)
    base = trainer_argv(vectors, results)
    fuzz_file_flag(capsys, tm, base, "--weights", weights, tmp_path / "weights", results)


def test_damaged_aid_files(tmp_path, capsys):
    """The AID tree's label CSVs and a JPEG: each is refused before the run folder is made."""
    data = aid_multilabel.write_demo(tmp_path / "aid", num_images=16, seed=1, image_size=24)
    results = tmp_path / "results"
    base = f"--data_dir {data} --backbone small_cnn --image_size 24 --epochs 1 --results_dir {results}"
    base = base.split()
    valid_files = [
        data / aid_multilabel.LABELS_CSV,
        sorted((data / "images_tr").rglob("*.jpg"))[0],
        sorted((data / "images_test").rglob("*.jpg"))[0],
    ]
    for valid in valid_files:
        original = valid.read_bytes()
        try:
            folder = tmp_path / "bad" / valid.parent.name
            fuzz_file_flag(capsys, tm, swapped_in(valid, base), None, valid, folder, results)
        finally:
            valid.write_bytes(original)
