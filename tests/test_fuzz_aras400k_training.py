"""Fuzzing the ARAS400k training scripts: every file argument empty, truncated and random, every numeric
flag 0, -1 and 10**12. Each run exits 0, or exits 2 with one error line, no traceback and nothing new in
the results folder (conftest.assert_fuzz_outcome).

In-process (TensorFlow imports once) and tiny. Values a script accepts are fed together in one run per
value (0 or 10**12), so that the suite trains a handful of tiny models rather than one per flag; the
values it refuses are each fed alone.
"""

import shutil

import keras
import pytest
from conftest import assert_fuzz_outcome, assert_main_error, call_main, corrupted_copies

import generative_trainer_unet_spade_gan as gan
import segformer_vis as vis
import segmentation_train as seg
from common import atomic
from common.aras400k import demo_data

BAD_NUMBERS = (0, -1, 10**12)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return demo_data.write_demo_patches(tmp_path_factory.mktemp("fuzz_data"), 32, 4, seed=0)


@pytest.fixture(scope="module")
def small_h5(tmp_path_factory):
    """A valid HDF5 weights file of the wrong model: its truncated and random copies are the fuzz."""
    path = tmp_path_factory.mktemp("weights") / "small.weights.h5"
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.save_weights(path)
    return path


def corrupt_roots(data_root, folder, relative_files):
    """[(case, root)]: copies of `data_root` with one file replaced by each corrupted version."""
    cases = []
    for relative in relative_files:
        for kind, bad in corrupted_copies(data_root / relative, folder / "bad" / relative.replace("/", "_")):
            root = folder / f"{relative.replace('/', '_')}_{kind}"
            shutil.copytree(data_root, root)
            shutil.copyfile(bad, root / relative)
            cases.append((f"{relative} {kind}", root))
    return cases


def first_file(data_root, split, folder):
    return f"{split}/{folder}/{sorted((data_root / split / folder).glob('*.png'))[0].name}"


def fuzz_numbers(capsys, script, base, results, flags, accepted):
    """Each refused (flag, value) alone; the accepted ones together, one run per value."""
    for value in BAD_NUMBERS:
        together = []
        for flag in flags:
            if flag in accepted.get(value, ()):
                together.append(f"--{flag} {value}")
                continue
            argv = f"{base} --results_dir {results} --run_name {flag}{value} --{flag} {value}"
            assert_fuzz_outcome(capsys, lambda argv=argv: call_main(script, argv), results, argv)
        if together:
            argv = f"{base} --results_dir {results} --run_name accepted{value} {' '.join(together)}"
            assert_fuzz_outcome(capsys, lambda argv=argv: call_main(script, argv), results, argv)


# ---- generative_trainer_unet_spade_gan.py ----

GAN_TINY = "--image_size 32 --width_divisor 64 --batch_size 4 --epochs 1"
GAN_NUMBERS = (
    "image_size width_divisor epochs batch_size learning_rate beta_1 beta_2 epsilon vgg_weight log_every seed"
)
GAN_ACCEPTED = {
    0: ("beta_1", "beta_2", "vgg_weight", "seed"),
    10**12: ("batch_size", "learning_rate", "epsilon", "vgg_weight", "log_every"),
}


def test_gan_epochs_minus_one_writes_nothing(data_root, tmp_path, capsys):
    argv = f"--data_root {data_root} {GAN_TINY} --results_dir {tmp_path} --epochs -1"
    assert assert_fuzz_outcome(capsys, lambda: call_main(gan, argv), tmp_path, "--epochs -1") == 2
    assert not any(tmp_path.iterdir())


# ---- segmentation_train.py ----

SEG_TINY = (
    "--image_size 32 --encoder efficientnetb0 --decoder_width 8 --batch_size 4 --epochs 1 --num_examples 1"
)
SEG_NUMBERS = (
    "image_size decoder_width bn_momentum epochs batch_size learning_rate weight_decay epsilon clipnorm "
    "lr_patience lr_factor early_stopping_patience num_examples threads demo_images seed"
)
SEG_ACCEPTED = {
    0: ("bn_momentum", "weight_decay", "lr_patience", "seed"),
    10**12: (
        "batch_size",
        "learning_rate",
        "weight_decay",
        "epsilon",
        "clipnorm",
        "lr_patience",
        "early_stopping_patience",
        "num_examples",
        "threads",
        "demo_images",
    ),
}


def test_segmentation_demo_with_a_results_dir_that_is_a_file(tmp_path, capsys):
    results = tmp_path / "results"
    results.write_text("not a folder")
    argv = f"--demo --results_dir {results}"
    assert_main_error(capsys, lambda: call_main(seg, argv), str(results), "is not a folder")
    assert sorted(tmp_path.iterdir()) == [results] and results.read_text() == "not a folder"


# ---- segformer_vis.py ----


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "best_model.keras"
    atomic.save_keras(seg.build_segformer("efficientnetb0", 32, decoder_width=8), path)
    return path


def vis_base(data_root):
    return f"--image_dirs {data_root / 'train' / 'images'} {data_root / 'val' / 'images'} --embeddings tsne"


def vis_argv(data_root, results, extra=""):
    return f"{vis_base(data_root)} --results_dir {results} {extra}"


def test_vis_corrupt_model_names_the_file(saved_model, data_root, tmp_path, capsys):
    bad = tmp_path / "best_model.keras"
    bad.write_bytes(saved_model.read_bytes()[:1000])
    argv = vis_argv(data_root, tmp_path / "results", f"--model {bad}")
    with pytest.raises(SystemExit):
        call_main(vis, argv)
    error = capsys.readouterr().err.strip()
    assert str(bad) in error and "cannot be read as a Keras model" in error and "not found" not in error
