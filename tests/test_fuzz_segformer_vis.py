"""Fuzzing segformer_vis.py: every file argument empty, truncated and random bytes, every numeric flag
0, -1 and 10**12. Each case ends in exit 0, or exit 2 with one error line, no traceback and nothing new
in the results folder (conftest.assert_fuzz_outcome). Refused values stop in `check_arguments`; the
accepted ones run together on two folders of four 32 px images with an untrained efficientnetb0.
"""

import keras
import pytest
from conftest import HUGE, fuzz_file_flag, fuzz_numeric_flags, swapped_in

import segformer_vis as vis
from common import atomic
from common.aras400k import demo_data

NUMERIC_FLAGS = ("--image_size", "--samples", "--batch_size", "--seed")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return demo_data.write_demo_patches(tmp_path_factory.mktemp("vis_fuzz") / "data", 32, 4, seed=0)


def tiny_argv(data_root, results):
    folders = f"{data_root / 'train' / 'images'} {data_root / 'val' / 'images'}"
    tiny = "--encoder efficientnetb0 --image_size 32 --embeddings tsne --batch_size 8"
    return f"--image_dirs {folders} {tiny} --results_dir {results}".split()


def test_numeric_flags(data_root, capsys):
    make_argv = lambda results: tiny_argv(data_root, results)  # noqa: E731
    codes = fuzz_numeric_flags(capsys, vis, make_argv, NUMERIC_FLAGS, check=vis.check_arguments)
    for flag in NUMERIC_FLAGS[:3]:
        assert codes[f"{flag} 0"] == codes[f"{flag} -1"] == 2, flag
    assert codes[f"--image_size {HUGE}"] == codes[f"--seed {HUGE}"] == 2


def test_damaged_files(data_root, tmp_path, capsys):
    results = tmp_path / "results"
    base = tiny_argv(data_root, results)
    # Small valid files to damage (every damaged copy is refused, whatever model it held).
    dense = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model, weights = tmp_path / "best_model.keras", tmp_path / "dense.weights.h5"
    atomic.save_keras(dense, model)
    dense.save_weights(weights)
    fuzz_file_flag(capsys, vis, base, "--model", model, tmp_path / "model", results)
    fuzz_file_flag(capsys, vis, base, "--weights", weights, tmp_path / "weights", results)
    config = tmp_path / "config.yaml"
    config.write_text("seed: 3\n")
    # An accepted file only prints the settings: -c is read by the parser, before main.
    printing = [*base, "--print_config"]
    fuzz_file_flag(capsys, vis, printing, "-c", config, tmp_path / "config", results, refused=False)
    valid = sorted((data_root / "val" / "images").glob("*.png"))[0]
    original = valid.read_bytes()
    try:
        fuzz_file_flag(capsys, vis, swapped_in(valid, base), None, valid, tmp_path / "image", results)
    finally:
        valid.write_bytes(original)
