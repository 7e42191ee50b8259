"""Fuzzing segmentation_train.py: every file argument empty, truncated and random bytes, every numeric
flag 0, -1 and 10**12. Each case ends in exit 0, or exit 2 with one error line, no traceback and
nothing new in the results folder (conftest.assert_fuzz_outcome). Refused values stop in
`check_arguments`; the accepted ones train together on 32 px patches (one step per epoch), never one
run each.
"""

import keras
import pytest
from conftest import HUGE, fuzz_file_flag, fuzz_numeric_flags, swapped_in

import segmentation_train as seg
from common.aras400k import demo_data

NUMERIC_FLAGS = (
    "--image_size",
    "--decoder_width",
    "--bn_momentum",
    "--epochs",
    "--batch_size",
    "--learning_rate",
    "--weight_decay",
    "--epsilon",
    "--clipnorm",
    "--lr_patience",
    "--lr_factor",
    "--early_stopping_patience",
    "--num_examples",
    "--threads",
    "--demo_images",
    "--seed",
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return demo_data.write_demo_patches(tmp_path_factory.mktemp("seg_fuzz") / "data", 32, 4, seed=0)


def tiny_argv(data_root, results):
    tiny = "--image_size 32 --encoder efficientnetb0 --decoder_width 8 --batch_size 4 --epochs 1"
    return f"--data_root {data_root} {tiny} --threads 1 --results_dir {results}".split()


def test_numeric_flags(data_root, capsys):
    make_argv = lambda results: tiny_argv(data_root, results)  # noqa: E731
    codes = fuzz_numeric_flags(capsys, seg, make_argv, NUMERIC_FLAGS, check=seg.check_arguments)
    for flag in ("--image_size", "--decoder_width", "--epochs", "--batch_size", "--threads"):
        assert codes[f"{flag} 0"] == codes[f"{flag} -1"] == 2, flag
    for flag in ("--image_size", "--epochs", "--batch_size", "--demo_images", "--threads"):
        assert codes[f"{flag} {HUGE}"] == 2, flag


def test_damaged_files(data_root, tmp_path, capsys):
    results = tmp_path / "results"
    base = tiny_argv(data_root, results)
    weights = tmp_path / "dense.weights.h5"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save_weights(weights)
    fuzz_file_flag(capsys, seg, base, "--weights", weights, tmp_path / "weights", results)
    config = tmp_path / "config.yaml"
    config.write_text("seed: 3\n")
    # An accepted file only prints the settings: -c is read by the parser, before main.
    printing = [*base, "--print_config"]
    fuzz_file_flag(capsys, seg, printing, "-c", config, tmp_path / "config", results, refused=False)
    for split in ("train", "val", "test"):
        for folder in ("images", "masks"):
            valid = sorted((data_root / split / folder).glob("*.png"))[0]
            original = valid.read_bytes()
            try:
                bad_folder = tmp_path / split / folder
                fuzz_file_flag(capsys, seg, swapped_in(valid, base), None, valid, bad_folder, results)
            finally:
                valid.write_bytes(original)
