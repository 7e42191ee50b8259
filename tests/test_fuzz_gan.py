"""Fuzzing generative_trainer_unet_spade_gan.py: every file argument empty, truncated and random bytes,
every numeric flag 0, -1 and 10**12. Each case ends in exit 0, or exit 2 with one error line, no
traceback and nothing new in the results folder (conftest.assert_fuzz_outcome). Refused values stop in
`check_arguments`; the accepted ones train together on four 32 px patches (1 step), never one run each.
"""

import keras
import pytest
from conftest import HUGE, fuzz_file_flag, fuzz_numeric_flags, swapped_in

import generative_trainer_unet_spade_gan as gan
from common.aras400k import demo_data

NUMERIC_FLAGS = (
    "--image_size",
    "--width_divisor",
    "--epochs",
    "--batch_size",
    "--learning_rate",
    "--beta_1",
    "--beta_2",
    "--epsilon",
    "--vgg_weight",
    "--log_every",
    "--seed",
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return demo_data.write_demo_patches(tmp_path_factory.mktemp("gan_fuzz") / "data", 32, 4, seed=0)


def tiny_argv(data_root, results):
    tiny = "--image_size 32 --width_divisor 64 --batch_size 4 --epochs 1"
    return f"--data_root {data_root} {tiny} --results_dir {results}".split()


def test_numeric_flags(data_root, capsys):
    make_argv = lambda results: tiny_argv(data_root, results)  # noqa: E731
    codes = fuzz_numeric_flags(capsys, gan, make_argv, NUMERIC_FLAGS, check=gan.check_arguments)
    for flag in ("--image_size", "--width_divisor", "--epochs", "--batch_size", "--log_every"):
        assert codes[f"{flag} 0"] == codes[f"{flag} -1"] == 2, flag
    assert codes[f"--epochs {HUGE}"] == codes[f"--image_size {HUGE}"] == codes[f"--batch_size {HUGE}"] == 2


def test_damaged_files(data_root, tmp_path, capsys):
    results = tmp_path / "results"
    base = tiny_argv(data_root, results)
    weights = tmp_path / "dense.weights.h5"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save_weights(weights)
    fuzz_file_flag(capsys, gan, base, "--vgg_weights", weights, tmp_path / "vgg", results)
    config = tmp_path / "config.yaml"
    config.write_text("seed: 3\n")
    # An accepted file only prints the settings: -c is read by the parser, before main.
    printing = [*base, "--print_config"]
    fuzz_file_flag(capsys, gan, printing, "-c", config, tmp_path / "config", results, refused=False)
    for folder in ("images", "masks"):
        valid = sorted((data_root / "train" / folder).glob("*.png"))[0]
        original = valid.read_bytes()
        try:
            fuzz_file_flag(capsys, gan, swapped_in(valid, base), None, valid, tmp_path / folder, results)
        finally:
            valid.write_bytes(original)
