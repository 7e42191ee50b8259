"""The AID-multilabel reader's bad-file handling: a truncated or corrupt JPEG is one line naming it."""

import numpy as np
import pytest
from conftest import assert_process_error, files_under, run_script

from common.errors import InputError
from common.spml import aid_multilabel


def encoded_jpeg(progressive=False) -> bytes:
    import cv2

    image = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)
    flags = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if progressive else []
    return cv2.imencode(".jpg", image, flags)[1].tobytes()


def decodes_in_tensorflow(data: bytes) -> bool:
    import tensorflow as tf

    try:
        tf.io.decode_jpeg(data, channels=3)
    except tf.errors.InvalidArgumentError:
        return False
    return True


GOOD = {
    "baseline": lambda: encoded_jpeg(),
    "progressive": lambda: encoded_jpeg(progressive=True),
    "bytes after the end marker": lambda: encoded_jpeg() + b"trailing data" * 8,
    "zero padding": lambda: encoded_jpeg() + b"\x00" * 100,
}
BAD = {
    "empty": lambda: b"",
    "truncated to half": lambda: encoded_jpeg()[: len(encoded_jpeg()) // 2],
    "end marker cut": lambda: encoded_jpeg()[:-2],
    "progressive, truncated": lambda: encoded_jpeg(progressive=True)[:-300],
    "header cut": lambda: encoded_jpeg()[:150],
    "random bytes": lambda: np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
    "random after the start marker": lambda: b"\xff\xd8" + bytes(range(256)) * 8,
}


@pytest.mark.parametrize("case", list(GOOD) + list(BAD))
def test_check_jpeg_agrees_with_tensorflows_decoder(tmp_path, case):
    data = (GOOD | BAD)[case]()
    path = tmp_path / "image.jpg"
    path.write_bytes(data)
    assert decodes_in_tensorflow(data) == (case in GOOD)
    if case in GOOD:
        aid_multilabel.check_jpeg(path)
    else:
        with pytest.raises(InputError, match=r"image\.jpg: .*JPEG"):
            aid_multilabel.check_jpeg(path)


@pytest.fixture
def aid_tree(tmp_path):
    data = aid_multilabel.write_demo(tmp_path / "aid", num_images=24, seed=3, image_size=48)
    broken = sorted((data / "images_tr").rglob("*.jpg"))[4]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    return data, broken


def test_a_truncated_jpeg_is_named_when_the_tree_is_read(aid_tree):
    data, broken = aid_tree
    with pytest.raises(InputError, match=f"{broken.name}: truncated JPEG"):
        aid_multilabel.load(data, "manual", seed=0, val_fraction=0.2)


def test_the_trainer_names_a_truncated_jpeg_in_one_line_and_writes_nothing(aid_tree, tmp_path):
    data, broken = aid_tree
    results = tmp_path / "results"
    argv = ["--dataset", "aid", "--data_dir", data, "--single_positive", "manual", "--epochs", "1"]
    completed = run_script("train_multilabel_model.py", *argv, "--results_dir", results, timeout=300)
    assert_process_error(completed, str(broken), "truncated JPEG")
    assert "DecodeJpeg" not in completed.stderr and not files_under(results)


def test_unreadable_label_csvs_are_one_line(tmp_path):
    path = tmp_path / aid_multilabel.LABELS_CSV
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="not UTF-8 text"):
        aid_multilabel.read_label_csv(path)
    path.write_text('image,airplane\n"unclosed,1\n', encoding="utf-8")
    with pytest.raises(InputError, match=aid_multilabel.LABELS_CSV):
        aid_multilabel.read_label_csv(path)


def test_the_demo_images_pass_the_check(tmp_path):
    data = aid_multilabel.write_demo(tmp_path / "aid", num_images=8, seed=3, image_size=48)
    for path in sorted(data.rglob("*.jpg")):
        aid_multilabel.check_jpeg(path)
