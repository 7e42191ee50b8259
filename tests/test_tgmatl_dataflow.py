"""Which triplets, which entries and which samples igarss_exp1.py's TG-MATL pieces use.

Hand-made batches at the scale of the margin (0.1): points a few hundredths apart, points that
coincide, and padded entries placed where they would change the result if they were read. Each
expected value is worked out by hand in the test.
"""

import numpy as np
import pytest
import tensorflow as tf

import igarss_exp1

MARGIN = 0.1


def on_a_line(*positions):
    """One model's batch of 2-D points at (x, 0)."""
    return tf.constant([[[x, 0.0] for x in positions]], tf.float32)


def batch(*values, dtype=tf.int32):
    return tf.constant([values], dtype)


def batch_all(points, labels, valid, margin=MARGIN):
    distance = igarss_exp1.pairwise_distance(points)
    return float(igarss_exp1.batch_all_triplet_loss(distance, labels, valid, margin)[0])


def batch_hard(points, labels, valid, margin=MARGIN):
    distance = igarss_exp1.pairwise_distance(points)
    return float(igarss_exp1.batch_hard_triplet_loss(distance, labels, valid, margin)[0])


# ---- batch-all (DTL) ----


def test_batch_all_uses_only_distinct_anchor_and_positive_where_the_margin_binds():
    # Class 0 at 0 and 0.05, class 1 at 0.08. The triplets (a, p, n) with a != p:
    # (0, 0.05, 0.08): 0.05 - 0.08 + 0.1 = 0.07; (0.05, 0, 0.08): 0.05 - 0.03 + 0.1 = 0.12.
    # Class 1 has no positive. Loss = (0.07 + 0.12) / 2. Counting a sample as its own positive
    # adds (a, a, n) terms 0.02, 0.07 and, for the class-1 anchor, 0.02, 0.07: 0.37 / 6 instead.
    loss = batch_all(on_a_line(0.0, 0.05, 0.08), batch(0, 0, 1), batch(True, True, True, dtype=tf.bool))
    assert loss == pytest.approx(0.095, abs=1e-5)


def test_batch_all_with_coinciding_points_counts_each_violating_triplet_once():
    # Two class-0 points coincide at 0 (D_ap = 0), the class-1 point sits at 0.04:
    # each of the 2 anchors has 1 positive and 1 negative: l = 0 - 0.04 + 0.1 = 0.06 twice.
    loss = batch_all(on_a_line(0.0, 0.0, 0.04), batch(0, 0, 1), batch(True, True, True, dtype=tf.bool))
    assert loss == pytest.approx(0.06, abs=1e-5)
    # A negative that coincides with the anchor: l = 0 - 0 + 0.1 for both anchors.
    loss = batch_all(on_a_line(0.0, 0.0, 0.0), batch(0, 0, 1), batch(True, True, True, dtype=tf.bool))
    assert loss == pytest.approx(0.1, abs=1e-5)


def test_batch_all_ignores_padded_entries_in_every_role():
    # The valid batch of the first test, plus padded points placed to violate as anchor, positive
    # and negative: a class-1 point on top of the first anchor, a class-0 point far away (a far
    # positive) and a class-0 point on top of the class-1 sample.
    valid = batch(True, True, True, False, False, False, dtype=tf.bool)
    loss = batch_all(on_a_line(0.0, 0.05, 0.08, 0.0, 3.0, 0.08), batch(0, 0, 1, 1, 0, 0), valid)
    assert loss == pytest.approx(0.095, abs=1e-5)


def test_batch_all_averages_over_violating_triplets_only():
    # Class 0 at 0 and 0.02, class 1 at 0.5 (satisfied) and at 0.06 (violating):
    # (0, 0.02, 0.06): 0.02 - 0.06 + 0.1 = 0.06; (0.02, 0, 0.06): 0.02 - 0.04 + 0.1 = 0.08;
    # the two class-1 samples are each other's positive: (0.5, 0.06, n): 0.44 - 0.5 + 0.1 = 0.04 and
    # 0.44 - 0.48 + 0.1 = 0.06; (0.06, 0.5, n): 0.44 - 0.06 + 0.1 and 0.44 - 0.04 + 0.1 (0.48, 0.5).
    # Satisfied triplets ((0, 0.02, 0.5) and (0.02, 0, 0.5)) are not counted.
    loss = batch_all(
        on_a_line(0.0, 0.02, 0.5, 0.06), batch(0, 0, 1, 1), batch(True, True, True, True, dtype=tf.bool)
    )
    assert loss == pytest.approx((0.06 + 0.08 + 0.04 + 0.06 + 0.48 + 0.5) / 6, abs=1e-5)


def test_batch_all_of_one_class_or_no_violation_is_zero():
    everything = batch(True, True, True, dtype=tf.bool)
    assert batch_all(on_a_line(0.0, 0.01, 0.02), batch(0, 0, 0), everything) == 0.0
    assert batch_all(on_a_line(0.0, 0.01, 5.0), batch(0, 0, 1), everything) == 0.0


def test_batch_all_gradient_moves_only_the_violating_points():
    # Class 0 at 0 and 0.05, class 1 at 0.08, a class-2 point at 5 (a satisfied negative) and a padded
    # class-1 point at 0.
    points = tf.Variable(on_a_line(0.0, 0.05, 0.08, 5.0, 0.0))
    labels = batch(0, 0, 1, 2, 1)
    valid = batch(True, True, True, True, False, dtype=tf.bool)
    with tf.GradientTape() as tape:
        distance = igarss_exp1.pairwise_distance(points)
        loss = igarss_exp1.batch_all_triplet_loss(distance, labels, valid, MARGIN)
    gradient = tape.gradient(loss, points).numpy()[0, :, 0]
    # L = [(D01 - D02 + m) + (D10 - D12 + m)] / 2 with x0 < x1 < x2: D01 = x1 - x0, D02 = x2 - x0 and
    # D12 = x2 - x1, so L = (3 x1 - x0 - 2 x2 + 2m) / 2 and dL/dx = (-0.5, 1.5, -1), 0 for the others.
    np.testing.assert_allclose(gradient, [-0.5, 1.5, -1.0, 0.0, 0.0], atol=1e-5)


def test_batch_all_counts_a_triplet_only_when_its_loss_exceeds_the_threshold():
    # A hand-made distance matrix with margin 0: (0, 1, 2) has l = 0.5 - 0 and (1, 0, 2) has l exactly
    # 1e-16 - 0, the threshold itself, which is not a violation: L = 0.5 / 1, not (0.5 + 1e-16) / 2.
    tiny = np.float32(igarss_exp1.TINY)
    distance = tf.constant([[[0.0, 0.5, 0.0], [tiny, 0.0, 0.0], [0.0, 0.0, 0.0]]], tf.float32)
    valid = batch(True, True, True, dtype=tf.bool)
    loss = igarss_exp1.batch_all_triplet_loss(distance, batch(0, 0, 1), valid, 0.0)
    assert float(loss[0]) == pytest.approx(0.5, abs=1e-6)


# ---- batch-hard (DTL-Hard) ----


def test_batch_hard_picks_the_hardest_valid_positive_and_negative():
    # Class 0 at 0, 0.03 and 0.2; class 1 at 0.1 and 0.25; padded class-0 point at 3 (a harder
    # positive) and padded class-1 point at 0.01 (a harder negative), both to be ignored.
    # Anchor 0: d+ 0.2, d- 0.1 -> 0.2; 0.03: d+ 0.17, d- 0.07 -> 0.2; 0.2: d+ 0.2, d- 0.05 -> 0.25;
    # 0.1: d+ 0.15, d- 0.07 -> 0.18; 0.25: d+ 0.15, d- 0.05 -> 0.2. Mean over the 5 valid anchors.
    loss = batch_hard(
        on_a_line(0.0, 0.03, 0.2, 0.1, 0.25, 3.0, 0.01),
        batch(0, 0, 0, 1, 1, 0, 1),
        batch(True, True, True, True, True, False, False, dtype=tf.bool),
    )
    assert loss == pytest.approx((0.2 + 0.2 + 0.25 + 0.18 + 0.2) / 5, abs=1e-5)


def test_batch_hard_fallback_is_the_row_maximum_over_valid_entries_only():
    # One class: no negative, so d- is the largest distance to a valid sample, which is also d+:
    # every anchor contributes exactly the margin. A padded point at 5 must not raise d-.
    loss = batch_hard(
        on_a_line(0.0, 0.03, 0.06, 5.0), batch(0, 0, 0, 0), batch(True, True, True, False, dtype=tf.bool)
    )
    assert loss == pytest.approx(MARGIN, abs=1e-6)
    # The same with the padded point of another class: it is not a negative either.
    loss = batch_hard(
        on_a_line(0.0, 0.03, 0.06, 0.01), batch(0, 0, 0, 1), batch(True, True, True, False, dtype=tf.bool)
    )
    assert loss == pytest.approx(MARGIN, abs=1e-6)


def test_batch_hard_anchor_without_positive_and_coinciding_negative():
    # Class 0 at 0, class 1 at 0 and 0.04: anchor 0 has d+ = 0 (no positive), d- = 0 -> 0.1;
    # anchor class-1 at 0: d+ 0.04, d- 0 -> 0.14; at 0.04: d+ 0.04, d- 0.04 -> 0.1.
    loss = batch_hard(on_a_line(0.0, 0.0, 0.04), batch(0, 1, 1), batch(True, True, True, dtype=tf.bool))
    assert loss == pytest.approx((0.1 + 0.14 + 0.1) / 3, abs=1e-5)


def test_batch_hard_of_a_single_valid_anchor_is_divided_by_one():
    # One valid sample and two padded ones: no positive (d+ 0), no negative (d- falls back to the row
    # maximum, 0): the one anchor contributes the margin, and the mean is over that one anchor.
    loss = batch_hard(on_a_line(0.0, 0.02, 0.05), batch(0, 0, 1), batch(True, False, False, dtype=tf.bool))
    assert loss == pytest.approx(MARGIN, abs=1e-6)


def test_batch_hard_of_a_fully_padded_model_is_zero():
    loss = batch_hard(on_a_line(0.0, 0.01), batch(0, 1), batch(False, False, dtype=tf.bool))
    assert loss == 0.0


# ---- MATL ----


def test_matl_weighs_the_class_term_and_the_box_cluster_term():
    # The batch of the first test: class term 0.095. Box clusters (0, 1, 1) pair 0.05 with 0.08:
    # (0.05, 0.08, 0): 0.03 - 0.05 + 0.1 = 0.08; (0.08, 0.05, 0): 0.03 - 0.08 + 0.1 = 0.05.
    points = on_a_line(0.0, 0.05, 0.08)
    distance = igarss_exp1.pairwise_distance(points)
    valid = batch(True, True, True, dtype=tf.bool)
    loss = igarss_exp1.matl_loss(distance, batch(0, 0, 1), batch(0, 1, 1), valid, MARGIN, 0.3)
    assert float(loss[0]) == pytest.approx(0.7 * 0.095 + 0.3 * 0.065, abs=1e-5)


# ---- task-guided selection ----


def select(score, labels, valid, top, more, random_key=None):
    return igarss_exp1.task_guided_selection(
        tf.constant([score], tf.float32),
        batch(*labels),
        tf.constant([valid]),
        tf.constant([top]),
        tf.constant([more]),
        None if random_key is None else tf.constant([random_key], tf.int32),
    ).numpy()[0]


def test_selection_counts_each_class_separately():
    # Class 0 has 4 valid members, class 1 has 2: top 50 % keeps 2 of class 0 and 1 of class 1, whatever
    # the scores of the other class (class 1's scores are all below class 0's).
    keep = select([0.9, 0.8, 0.7, 0.6, 0.2, 0.1], [0, 0, 0, 0, 1, 1], [True] * 6, 0.5, 0.0)
    np.testing.assert_array_equal(keep, [1, 1, 0, 0, 1, 0])
    # Interleaved classes, best scores last: the selection follows the scores within each class.
    keep = select([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0, 1, 0, 1, 0, 0], [True] * 6, 0.5, 0.0)
    np.testing.assert_array_equal(keep, [0, 0, 0, 1, 1, 1])


def test_selection_ignores_padded_samples_in_counts_and_ranks():
    # Class 0 has 4 valid members and 2 padded ones with the highest scores. Counted, they would raise
    # k_top to 3; ranked, they would push the valid members down. Expected: the valid top 2.
    keep = select(
        [0.99, 0.98, 0.5, 0.4, 0.3, 0.2], [0, 0, 0, 0, 0, 0], [False, False, True, True, True, True], 0.5, 0.0
    )
    np.testing.assert_array_equal(keep, [0, 0, 1, 1, 0, 0])


def test_selection_keeps_exactly_k_top_plus_k_more_by_rank():
    # 5 members: k_top = floor(5 * 0.4) = 2, k_more = floor(5 * 0.2) = 1: the ranks 0, 1 and 2.
    score = [0.5, 0.1, 0.9, 0.3, 0.7]
    keep = select(score, [0] * 5, [True] * 5, 0.4, 0.2)
    np.testing.assert_array_equal(keep, [1, 0, 1, 0, 1])
    # A class of one keeps its sample (k_top >= 1) even at top 10 %.
    keep = select([0.5, 0.1, 0.9], [0, 1, 0], [True] * 3, 0.1, 0.0)
    np.testing.assert_array_equal(keep, [0, 1, 1])
    # Ties are broken by position: the earlier sample first.
    keep = select([0.5, 0.5, 0.5, 0.5], [0] * 4, [True] * 4, 0.5, 0.0)
    np.testing.assert_array_equal(keep, [1, 1, 0, 0])


def test_random_extra_selection_draws_from_the_rest_of_the_class_by_key():
    # k_top = 2 by score (samples 2 and 4); k_more = 2 from the other 3 by the largest key: sample 0's
    # key is the largest overall but the top-scored samples are not drawn twice.
    score = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2]
    key = [50, 10, 99, 40, 98, 30]
    keep = select(score, [0] * 5 + [1], [True] * 6, 0.4, 0.4, random_key=key)
    np.testing.assert_array_equal(keep, [1, 0, 1, 1, 1, 1])
    # A padded sample with the largest key is never drawn.
    keep = select(score, [0] * 6, [True] * 5 + [False], 0.4, 0.2, random_key=[5, 10, 0, 40, 0, 99])
    np.testing.assert_array_equal(keep, [0, 0, 1, 1, 1, 0])


def test_rank_within_class_counts_valid_same_class_samples_ahead():
    key = tf.constant([[0.3, 0.9, 0.3, 0.8, 0.1]])
    labels = batch(0, 1, 0, 0, 0)
    valid = batch(True, True, True, False, True, dtype=tf.bool)
    # Class 0, valid: 0.3 (index 0), 0.3 (index 2), 0.1; the padded 0.8 counts for nobody.
    rank = igarss_exp1._rank_within_class(key, labels, valid).numpy()[0]
    np.testing.assert_array_equal(rank[[0, 1, 2, 4]], [0, 0, 1, 2])


# ---- the random selection key ----


def reference_key(model_key, model_step, sample_id):
    """The documented integer hash, in Python integers."""
    mask = 0xFFFFFFFF
    mixed = (model_key * 0x2545F491 + model_step * 0x6C8E9CF5 + sample_id * 0x1B873593) & mask
    for multiplier in (0x45D9F3B, 0x45D9F3B, 1):
        mixed = ((mixed ^ (mixed >> 16)) * multiplier) & mask
    return mixed - 2**31


def test_random_selection_key_is_a_fixed_hash_of_model_step_and_sample():
    model_key, model_step = np.array([3, 17]), np.array([0, 250])
    sample_id = np.array([[0, 1, 2, 1000], [7, 7, 65535, 123456]])
    keys = igarss_exp1.random_selection_key(model_key, model_step, sample_id).numpy()
    expected = [
        [reference_key(int(model_key[m]), int(model_step[m]), int(s)) for s in sample_id[m]] for m in range(2)
    ]
    np.testing.assert_array_equal(keys, expected)
    # A model's keys do not depend on which other models share the stack.
    alone = igarss_exp1.random_selection_key(model_key[1:], model_step[1:], sample_id[1:]).numpy()
    np.testing.assert_array_equal(alone, keys[1:])
    assert keys.dtype == np.int32


def test_random_selection_key_spreads_over_the_int32_range():
    keys = (
        igarss_exp1.random_selection_key(np.array([1]), np.array([2]), np.arange(4000)[None])
        .numpy()[0]
        .astype(np.int64)
    )
    assert len(set(keys.tolist())) == 4000
    assert keys.min() < -(2**30) and keys.max() > 2**30
    assert abs(keys.mean()) < 2**31 * 0.05


# ---- the task-guidance score ----


def test_task_guidance_score_is_the_mutual_information_weighted_scaled_geometry():
    from sklearn.feature_selection import mutual_info_classif

    rng = np.random.default_rng(1)
    class_label = rng.integers(0, 2, 60)
    x_min = rng.integers(0, 100, 60)
    width = 30 + 100 * class_label + rng.integers(0, 20, 60)
    y_min = rng.integers(0, 50, 60)
    height = rng.integers(10, 200, 60)
    box_label = np.stack([x_min, x_min + width, y_min, y_min + height], axis=1)
    scores = igarss_exp1.task_guidance_scores(box_label, class_label, seed=4)
    # X = [x_c, y_c, w, h] / 300, each column min-max scaled over these 60 samples.
    geometry = np.stack([x_min + width / 2, y_min + height / 2, width, height], axis=1) / 300.0
    geometry = (geometry - geometry.min(0)) / (geometry.max(0) - geometry.min(0))
    weights = [mutual_info_classif(geometry[:, [j]], class_label, random_state=4)[0] for j in range(4)]
    np.testing.assert_allclose(scores, geometry @ np.array(weights), rtol=1e-6, atol=1e-9)
    assert weights[2] > max(weights[0], weights[1], weights[3])
