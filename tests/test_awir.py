"""The AWIR data protocol (common.tgmatl.awir): box features on hand-made boxes, clusters, the fold split."""

import json
import math

import numpy as np
import pytest

from common.errors import InputError
from common.tgmatl import awir


def test_box_features_equal_their_formulas_on_a_hand_made_box():
    # [xmin, xmax, ymin, ymax]: a 30 x 10 box.
    features = awir.raw_box_features(np.array([[10, 40, 20, 30]]))[0]
    width, height = 30.0, 10.0
    inertia_xx, inertia_yy = width * height**3 / 12, height * width**3 / 12
    expected = [
        width,
        height,
        300.0,
        1 - 1 / 3,
        80.0,
        math.sqrt(1000.0),
        3.0,
        math.log(3.0),
        4 * math.pi * 300 / 80**2,
        math.log(inertia_xx / inertia_yy),
        (inertia_xx + inertia_yy) / 300,
        math.log(300.0),
        math.atan2(height, width),
    ]
    np.testing.assert_allclose(features, expected, rtol=1e-9)
    assert len(awir.BOX_FEATURE_NAMES) == 13


def test_boxes_are_clipped_and_degenerate_boxes_stay_finite():
    features = awir.raw_box_features(np.array([[-20, 350, 5, 5], [0, 0, 0, 0]]))
    assert features[0, 0] == 300 and features[0, 1] == 0
    assert np.isfinite(features).all()
    np.testing.assert_allclose(awir.box_location(np.array([[0, 300, 100, 200]])), [[0.5, 0.5]])


def demo_labels(tmp_path, num_samples=240):
    data_path, _ = awir.make_demo_data(
        tmp_path / "demo", num_samples=num_samples, widths={"clip": 8, "dinov2": 8, "mae": 8}
    )
    return data_path, awir.load_labels(data_path)


def test_fold_protocol_sizes_determinism_and_reuse(tmp_path):
    _, (class_label, box_label) = demo_labels(tmp_path)
    cluster = awir.box_cluster_labels(box_label)
    np.testing.assert_array_equal(cluster, awir.box_cluster_labels(box_label))
    test, folds = awir.load_or_make_folds(tmp_path / "results", 0.7, class_label, box_label, cluster)
    assert len(test) == 168 and len(folds) == 8
    pool = np.setdiff1d(np.arange(240), test)
    for train, val in folds:
        assert len(train) == 63 and len(val) == 9
        assert not set(train) & set(val) and not set(val) & set(test)
        np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), pool)
    np.testing.assert_array_equal(np.sort(np.concatenate([val for _, val in folds])), pool)
    saved = json.loads(awir.folds_path(tmp_path / "results", 0.7).read_text())
    assert saved["num_samples"] == 240 and saved["test"] == test.tolist()
    # Recomputing gives the same split, and the saved file is what is reused.
    test_again, _ = awir.make_folds(class_label, cluster, 0.7)
    np.testing.assert_array_equal(test, test_again)
    reused_test, reused_folds = awir.load_or_make_folds(
        tmp_path / "results", 0.7, class_label, box_label, cluster
    )
    np.testing.assert_array_equal(reused_test, test)
    for (train, val), (train2, val2) in zip(folds, reused_folds, strict=True):
        np.testing.assert_array_equal(train, train2)
        np.testing.assert_array_equal(val, val2)


def test_folds_file_of_other_data_is_refused(tmp_path):
    _, (class_label, box_label) = demo_labels(tmp_path)
    cluster = awir.box_cluster_labels(box_label)
    awir.load_or_make_folds(tmp_path / "results", 0.7, class_label, box_label, cluster)
    changed = class_label.copy()
    changed[0] = (changed[0] + 1) % 3
    with pytest.raises(InputError, match="was made for other data"):
        awir.load_or_make_folds(tmp_path / "results", 0.7, changed, box_label, cluster)


def test_boxes_are_clipped_at_0_from_below_too():
    """The differences table: a box reaching past the left edge keeps the width it has inside the image
    (xmin -5, xmax 30: width 30 here, 35 in the reference, which clips at 300 from above only)."""
    _, width, height = awir.box_width_height(np.array([[-5, 30, 290, 310]]))
    assert width[0] == 30 and height[0] == 10
