"""igarss_exp1.py's triplet losses, task-guidance score and task-guided selection, against brute-force
loops over all triplets and hand-made inputs."""

import math

import numpy as np
import pytest
import tensorflow as tf

import igarss_exp1

MARGIN = 0.1


def brute_distance(points):
    return np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)


def brute_batch_all(points, labels, valid, margin=MARGIN):
    distance = brute_distance(points)
    losses = []
    kept = [i for i in range(len(labels)) if valid[i]]
    for a in kept:
        for p in kept:
            for n in kept:
                if len({a, p, n}) == 3 and labels[a] == labels[p] != labels[n]:
                    losses.append(max(0.0, distance[a, p] - distance[a, n] + margin))
    losses = np.array(losses)
    return losses.sum() / ((losses > 1e-16).sum() + 1e-16) if losses.size else 0.0


def brute_batch_hard(points, labels, valid, margin=MARGIN):
    distance = brute_distance(points)
    kept = [i for i in range(len(labels)) if valid[i]]
    per_anchor = []
    for a in kept:
        positives = [distance[a, p] for p in kept if p != a and labels[p] == labels[a]]
        negatives = [distance[a, n] for n in kept if labels[n] != labels[a]]
        hardest_positive = max(positives) if positives else 0.0
        hardest_negative = min(negatives) if negatives else max(distance[a, j] for j in kept)
        per_anchor.append(max(0.0, hardest_positive - hardest_negative + margin))
    return float(np.mean(per_anchor)) if per_anchor else 0.0


def brute_selection(score, labels, valid, top_percent, random_percent, random_key=None):
    keep = np.zeros(len(labels), dtype=bool)
    for label in set(labels[valid].tolist()):
        members = [i for i in range(len(labels)) if valid[i] and labels[i] == label]
        count = len(members)
        k_top = max(1, math.floor(count * top_percent + 1e-5))
        k_more = min(math.floor(count * random_percent + 1e-5), count - k_top)
        ranked = sorted(members, key=lambda i: (-score[i], i))  # ties: the earlier sample first
        keep[ranked[:k_top]] = True
        if random_key is None:
            keep[ranked[k_top : k_top + k_more]] = True
        else:
            rest = sorted(ranked[k_top:], key=lambda i: (-random_key[i], i))
            keep[rest[:k_more]] = True
    return keep


def random_batches(seed, num_models=4, batch_size=11, width=5, num_labels=3):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(num_models, batch_size, width)).astype(np.float32)
    labels = rng.integers(0, num_labels, (num_models, batch_size)).astype(np.int32)
    valid = rng.random((num_models, batch_size)) < 0.85
    return points, labels, valid


def stacked(function, points, labels, valid, *extra):
    distance = igarss_exp1.pairwise_distance(tf.constant(points))
    return function(distance, tf.constant(labels), tf.constant(valid), *extra).numpy()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale", [1.0, 0.02])
def test_distance_batch_all_and_batch_hard_equal_brute_force(seed, scale):
    """At scale 1 the points lie about 3 apart and few triplets bind; at 0.02 most do."""
    points, labels, valid = random_batches(seed)
    points *= scale
    distance = igarss_exp1.pairwise_distance(tf.constant(points)).numpy()
    for model in range(len(points)):
        np.testing.assert_allclose(distance[model], brute_distance(points[model]), atol=2e-5)
    batch_all = stacked(igarss_exp1.batch_all_triplet_loss, points, labels, valid, MARGIN)
    batch_hard = stacked(igarss_exp1.batch_hard_triplet_loss, points, labels, valid, MARGIN)
    for model in range(len(points)):
        assert batch_all[model] == pytest.approx(
            brute_batch_all(points[model], labels[model], valid[model]), rel=1e-4, abs=1e-5
        )
        assert batch_hard[model] == pytest.approx(
            brute_batch_hard(points[model], labels[model], valid[model]), rel=1e-4, abs=1e-5
        )


def test_batch_all_is_zero_without_violations_and_hard_uses_row_maximum_without_negatives():
    # Two tight, far-apart classes: no triplet violates the margin.
    points = np.array([[[0, 0], [0, 0.01], [10, 0], [10, 0.01]]], np.float32)
    labels = np.array([[0, 0, 1, 1]], np.int32)
    valid = np.ones((1, 4), bool)
    assert stacked(igarss_exp1.batch_all_triplet_loss, points, labels, valid, MARGIN)[0] == 0.0
    # One class only: d- falls back to the row maximum, as in the reference implementation.
    same_class = np.zeros((1, 4), np.int32)
    expected = brute_batch_hard(points[0], same_class[0], valid[0])
    assert expected > 0
    assert stacked(igarss_exp1.batch_hard_triplet_loss, points, same_class, valid, MARGIN)[
        0
    ] == pytest.approx(expected, rel=1e-5)


def test_batch_all_gradient_equals_relu_form():
    """The count-based loss has the gradient of sum(relu(D_ap - D_an + m)) / count."""
    points, labels, valid = random_batches(7, num_models=2, batch_size=9)
    points = tf.Variable(points)

    def relu_form(distance, labels, valid):
        same = tf.equal(labels[:, :, None], labels[:, None, :])
        index = tf.range(labels.shape[1])
        distinct = (
            (index[:, None, None] != index[None, :, None])
            & (index[:, None, None] != index[None, None, :])
            & (index[None, :, None] != index[None, None, :])
        )
        mask = (
            distinct[None]
            & same[:, :, :, None]
            & ~same[:, :, None, :]
            & valid[:, :, None, None]
            & valid[:, None, :, None]
            & valid[:, None, None, :]
        )
        loss = tf.nn.relu(distance[:, :, :, None] - distance[:, :, None, :] + MARGIN) * tf.cast(
            mask, tf.float32
        )
        return tf.reduce_sum(loss, [1, 2, 3]) / (
            tf.reduce_sum(tf.cast(loss > 1e-16, tf.float32), [1, 2, 3]) + 1e-16
        )

    with tf.GradientTape(persistent=True) as tape:
        distance = igarss_exp1.pairwise_distance(points)
        ours = tf.reduce_sum(
            igarss_exp1.batch_all_triplet_loss(distance, tf.constant(labels), tf.constant(valid), MARGIN)
        )
        reference = tf.reduce_sum(relu_form(distance, tf.constant(labels), tf.constant(valid)))
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        tape.gradient(ours, points).numpy(), tape.gradient(reference, points).numpy(), atol=1e-6
    )


def test_distance_gradient_is_finite_for_coinciding_points():
    points = tf.Variable(np.zeros((1, 3, 4), np.float32))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(igarss_exp1.pairwise_distance(points))
    assert np.isfinite(tape.gradient(total, points).numpy()).all()


@pytest.mark.parametrize("seed", range(4))
def test_matl_equals_weighted_sum_of_brute_force_terms(seed):
    points, labels, valid = random_batches(seed)
    clusters = np.random.default_rng(seed + 100).integers(0, 3, labels.shape).astype(np.int32)
    box_weight = 0.3
    distance = igarss_exp1.pairwise_distance(tf.constant(points))
    ours = igarss_exp1.matl_loss(
        distance, tf.constant(labels), tf.constant(clusters), tf.constant(valid), MARGIN, box_weight
    ).numpy()
    for model in range(len(points)):
        expected = (1 - box_weight) * brute_batch_all(
            points[model], labels[model], valid[model]
        ) + box_weight * brute_batch_all(points[model], clusters[model], valid[model])
        assert ours[model] == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["ranked", "random"])
def test_task_guided_selection_equals_brute_force(seed, mode):
    rng = np.random.default_rng(seed)
    num_models, batch_size = 5, 32
    labels = rng.integers(0, 3, (num_models, batch_size)).astype(np.int32)
    labels[0, :] = 0
    labels[0, 3] = 2  # a class with a single member
    valid = rng.random((num_models, batch_size)) < 0.9
    # Coarse scores create ties; model 1 is all ties.
    score = np.round(rng.random((num_models, batch_size)), 1)
    score[1] = 0.5
    top_percent = np.array([0.3, 0.4, 0.5, 0.7, 0.3])
    random_percent = np.array([0.1, 0.05, 0.2, 0.3, 0.9])  # the last asks for more than the class has
    random_key = rng.random((num_models, batch_size)) if mode == "random" else None
    keep = igarss_exp1.task_guided_selection(
        tf.constant(score),
        tf.constant(labels),
        tf.constant(valid),
        tf.constant(top_percent),
        tf.constant(random_percent),
        None if random_key is None else tf.constant(random_key),
    ).numpy()
    for model in range(num_models):
        expected = brute_selection(
            score[model],
            labels[model],
            valid[model],
            top_percent[model],
            random_percent[model],
            None if random_key is None else random_key[model],
        )
        np.testing.assert_array_equal(keep[model], expected)


def test_selection_counts_follow_the_floor_rule():
    # 10 valid samples of one class: k_top = floor(10 * 0.7) = 7 (not 6 from 0.7's binary form) and
    # k_more = min(floor(10 * 0.5), 10 - 7) = 3.
    labels = np.zeros((1, 10), np.int32)
    valid = np.ones((1, 10), bool)
    score = np.arange(10, dtype=np.float64)[None]
    keep = igarss_exp1.task_guided_selection(
        tf.constant(score), tf.constant(labels), tf.constant(valid), tf.constant([0.7]), tf.constant([0.0])
    ).numpy()
    assert keep.sum() == 7 and keep[0, 3:].all()
    keep = igarss_exp1.task_guided_selection(
        tf.constant(score), tf.constant(labels), tf.constant(valid), tf.constant([0.7]), tf.constant([0.5])
    ).numpy()
    assert keep.all()


def test_tg_matl_is_matl_on_the_selected_triplets():
    points, labels, valid = random_batches(3, num_models=2, batch_size=24)
    clusters = np.random.default_rng(9).integers(0, 3, labels.shape).astype(np.int32)
    score = np.random.default_rng(10).random(labels.shape)
    keep = igarss_exp1.task_guided_selection(
        tf.constant(score),
        tf.constant(labels),
        tf.constant(valid),
        tf.constant([0.5, 0.5]),
        tf.constant([0.2, 0.2]),
    )
    distance = igarss_exp1.pairwise_distance(tf.constant(points))
    ours = igarss_exp1.matl_loss(
        distance, tf.constant(labels), tf.constant(clusters), keep, MARGIN, 0.5
    ).numpy()
    for model in range(2):
        kept = brute_selection(score[model], labels[model], valid[model], 0.5, 0.2)
        expected = 0.5 * brute_batch_all(points[model], labels[model], kept) + 0.5 * brute_batch_all(
            points[model], clusters[model], kept
        )
        assert ours[model] == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_self_and_duplicate_distances_are_exactly_zero(jit_compile):
    """Exact zeros where the training step computes them (XLA); close to brute force everywhere.

    Norms 0.6 and 31 (raw projections reach both): the old separately summed norms gave 6e-4 and
    0.016 here (0.027 under XLA), against a margin of 0.1. TensorFlow's eager CPU product may round
    a tail row of the batch differently (0.011 seen at norm 31, depending on the thread pool), so
    exactness is asserted for the compiled step that training runs.
    """
    generator = np.random.default_rng(3)
    points = generator.normal(size=(2, 40, 64)).astype(np.float32)
    points[0] *= 0.6 / np.linalg.norm(points[0], axis=1, keepdims=True)
    points[1] *= 31.0 / np.linalg.norm(points[1], axis=1, keepdims=True)
    points[:, 7] = points[:, 2]  # duplicates at several positions of the batch
    points[:, 39] = points[:, 2]
    points[:, 20] = points[:, 11]
    distance = tf.function(igarss_exp1.pairwise_distance, jit_compile=jit_compile)(
        tf.constant(points)
    ).numpy()
    for model in range(2):
        assert np.all(np.diag(distance[model]) == 0.0)
        if jit_compile:
            for i, j in [(2, 7), (7, 2), (2, 39), (7, 39), (11, 20), (20, 11)]:
                assert distance[model, i, j] == 0.0
    brute = np.sqrt(((points[:, :, None].astype(np.float64) - points[:, None]) ** 2).sum(-1))
    np.testing.assert_allclose(distance, brute, rtol=1e-4, atol=2e-3 if jit_compile else 2e-2)


def test_task_guidance_scores_weight_informative_box_geometry(tmp_path):
    rng = np.random.default_rng(0)
    class_label = rng.integers(0, 3, 200)
    # Box width is informative about the class; position is noise.
    width = 20 + 60 * class_label + rng.integers(0, 10, 200)
    x_min = rng.integers(0, 100, 200)
    y_min = rng.integers(0, 100, 200)
    box_label = np.stack([x_min, x_min + width, y_min, y_min + 30], axis=1)
    scores = igarss_exp1.task_guidance_scores(box_label, class_label, seed=0)
    assert scores.shape == (200,)
    # Larger (more class-informative) widths get larger scores on average.
    assert np.corrcoef(scores, width)[0, 1] > 0.5
