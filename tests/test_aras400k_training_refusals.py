"""Bad input to the ARAS400k training scripts ends in one line, exit 2, and nothing written:
the GAN's `--epochs -1`, segmentation's `--demo` with a results dir that is a file, and segformer_vis
on a corrupt `.keras` model (named, not "File not found").
"""

import pytest
from conftest import assert_fuzz_outcome, assert_main_error, call_main

import generative_trainer_unet_spade_gan as gan
import segformer_vis as vis
import segmentation_train as seg
from common import atomic
from common.aras400k import demo_data


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return demo_data.write_demo_patches(tmp_path_factory.mktemp("fuzz_data"), 32, 4, seed=0)


# ---- generative_trainer_unet_spade_gan.py ----

GAN_TINY = "--image_size 32 --width_divisor 64 --batch_size 4 --epochs 1"


def test_gan_epochs_minus_one_writes_nothing(data_root, tmp_path, capsys):
    argv = f"--data_root {data_root} {GAN_TINY} --results_dir {tmp_path} --epochs -1"
    assert assert_fuzz_outcome(capsys, lambda: call_main(gan, argv), tmp_path, "--epochs -1") == 2
    assert not any(tmp_path.iterdir())


# ---- segmentation_train.py ----


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
