"""Data flow of the SPML losses, label-state updates and AdaGC's pieces (train_multilabel_model.py).

Each test uses hand-made inputs on which a one-line slip (a permuted term left unpermuted, an EMA whose two
weights are swapped, an observed entry treated as unobserved, a loss seeing the wrong target) changes the
result, not only the arithmetic of a formula.
"""

import numpy as np
import pytest
import tensorflow as tf

import train_multilabel_model as tm


def parse(argv=""):
    return tm.get_args_parser().parse_args(argv.split())


def rows_dataset(features, batch_size):
    return tf.data.Dataset.from_tensor_slices((features, np.arange(len(features)))).batch(batch_size)


# ---- ROLE through the torch-convention optimizer: the reference's estimates ----


def torch_role_estimates(weights, features, observed, initial, settings, steps, batch_size):
    """Cole et al.'s ROLE step in PyTorch: classifier and estimator in one Adam, the estimator's lr scaled."""
    import torch

    torch.manual_seed(0)
    dense = [torch.tensor(w.T.copy() if w.ndim == 2 else w.copy(), requires_grad=True) for w in weights]
    estimator = torch.tensor(initial.copy(), requires_grad=True)
    lr = settings.learning_rate
    optimizer = torch.optim.Adam(
        [{"params": dense, "lr": lr}, {"params": [estimator], "lr": lr * settings.role_lr_multiplier}]
    )
    x_all, y_all = torch.tensor(features), torch.tensor(observed)
    k, classes = settings.expected_num_positives, observed.shape[1]
    for step in range(steps):
        rows = torch.arange(step * batch_size, (step + 1) * batch_size) % len(features)
        x, y = x_all[rows], y_all[rows]
        hidden = torch.relu(x @ dense[0].T + dense[1])
        logits = hidden @ dense[2].T + dense[3]
        est_logits = estimator[rows]
        preds, ests = torch.sigmoid(logits), torch.sigmoid(est_logits)
        softplus = torch.nn.functional.softplus
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        pos = y * (softplus(-logits) + softplus(-est_logits)) * 0.5
        cross = 0.5 * (
            bce(logits, ests.detach(), reduction="none") + bce(est_logits, preds.detach(), reduction="none")
        )
        prior = ((preds.sum(1).mean() - k) ** 2 + (ests.sum(1).mean() - k) ** 2) * 0.5 / classes**2
        loss = (pos + cross).mean() + prior
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return estimator.detach().numpy()


@pytest.mark.parametrize(
    "optimizer, close",
    [("--optimizer_convention torch", True), ("--optimizer_convention keras --adam_epsilon 1e-7", False)],
)
def test_role_estimates_match_the_torch_reference_with_torchs_adam(optimizer, close):
    """Torch's Adam with its 1e-8 epsilon gives the reference's estimates; Keras's Adam as it was does not."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(16, 6)).astype(np.float32)
    full = (rng.random((16, 5)) < 0.4).astype(np.float32)
    full[np.arange(16), rng.integers(0, 5, 16)] = 1
    observed = np.zeros_like(full)
    observed[np.arange(16), full.argmax(1)] = 1
    settings = parse(
        "--method role --backbone mlp --expected_num_positives 2 --learning_rate 1e-3 --batch_size 8 "
        + optimizer
    )
    tf.keras.utils.set_random_seed(0)
    trainer = tm.make_trainer(
        settings, lambda: tm.build_classifier("mlp", (6,), 5), {"observed": observed, "full": full}
    )
    initial = trainer.estimator.numpy().copy()
    weights = [w.numpy().astype(np.float32) for w in trainer.student.trainable_variables]
    for epoch in (1, 2, 3):
        trainer.train_epoch(rows_dataset(features, 8), "warmup", epoch)
    ours = tm.tf.sigmoid(trainer.estimator).numpy()
    reference = torch_role_estimates(weights, features, observed, initial, settings, 6, 8)
    gap = np.abs(ours - 1 / (1 + np.exp(-reference))).max()
    print(optimizer, gap)
    assert (gap < 1e-4) == close, gap


# ---- step 3: the trigger on a pause followed by a second rise ----

# Teacher A's agreement on the image bench (seed 0): a pause at epochs 6-8, then a second rise.
PAUSE_CURVE = [0.136, 0.291, 0.554, 0.641, 0.680, 0.696, 0.679, 0.664, 0.698, 0.709, 0.743, 0.772]
PAUSE_CURVE += [0.778, 0.781, 0.783, 0.785, 0.787]


def trigger_epochs(rule, curve):
    """(epoch it fires at, epoch it returns) when fed the curve one epoch at a time, or None."""
    for checked in range(1, len(curve) + 1):
        detected = rule(curve[:checked])[0]
        if detected is not None:
            return checked, detected
    return None


def test_the_default_trigger_waits_out_a_pause_and_lands_after_it():
    fired_at, detected = trigger_epochs(tm.detect_early_learning_end, PAUSE_CURVE)
    assert fired_at >= 9 and detected >= 9
    # Without the pause guard the fit reads the pause as saturation: epoch 5, checked at epoch 7.
    assert trigger_epochs(lambda c: tm.detect_early_learning_end(c, dip=1.0), PAUSE_CURVE) == (7, 5)


def test_the_aio2_trigger_needs_its_buffer_after_the_slope_minimum():
    fired_at, detected = trigger_epochs(tm.detect_early_learning_end_aio2, PAUSE_CURVE)
    # The 3-5 epoch windows' slopes are smallest in the pause (ending at epoch 8); more than 4 epochs
    # must follow before the detection counts; the trigger is (dep + mid) // 2 of the fit up to dep.
    assert fired_at == 14 and detected == 5
    assert trigger_epochs(tm.detect_early_learning_end_aio2, [0.1, 0.5, 0.7, 0.8, 0.85, 0.87, 0.88]) is None


# ---- steps 2, 4 and 5: the teachers' EMA, Gradient Calibration's targets, mixup's pairing ----


def tiny_model():
    import keras

    vector = keras.Input((3,))
    return keras.Model(vector, keras.layers.Dense(2)(vector))


def test_each_teacher_moves_toward_the_student_by_one_minus_its_decay():
    student = tiny_model()
    teachers = tm.MeanTeachers(tiny_model, student, 0.9, 0.8, ramp="constant")
    start = [w.copy() for w in student.get_weights()]
    student.set_weights([w + 1.0 for w in start])  # the student moved by 1 after the copy
    teachers.update_a(tf.constant(10_000, tf.int64))
    teachers.update_b(50)
    for name, decay in (("teacher_a", 0.9), ("teacher_b", 0.8)):
        for teacher_weight, old in zip(teachers.models[name].get_weights(), start, strict=True):
            np.testing.assert_allclose(teacher_weight, old + (1 - decay), rtol=1e-6, atol=1e-6)


def test_the_ramp_applies_until_the_teachers_are_copied_at_the_trigger():
    student = tiny_model()
    teachers = tm.MeanTeachers(tiny_model, student, 0.999, 0.99)
    assert teachers.decay(0.999, 0) == pytest.approx(0.1) and teachers.decay(0.99, 5) == pytest.approx(6 / 15)
    student.set_weights([w + 2.0 for w in student.get_weights()])
    teachers.copy_student()  # --teacher_init at_trigger
    for teacher in teachers.models.values():
        for teacher_weight, student_weight in zip(teacher.get_weights(), student.get_weights(), strict=True):
            np.testing.assert_array_equal(teacher_weight, student_weight)
    assert teachers.decay(0.999, 0) == 0.999 and teachers.decay(0.99, 5) == 0.99  # the decays as set


def test_gc_targets_keep_observed_positives_and_use_the_pseudo_label_elsewhere():
    logits = np.array([[0.3, -0.2, 1.0]], np.float32)
    observed = np.array([[0.0, 1.0, 0.0]], np.float32)
    pseudo = np.array([[0.8, 0.1, 0.3]], np.float32)
    loss = tm.loss_gradient_calibration(logits, observed, pseudo).numpy()
    expected = tf.nn.sigmoid_cross_entropy_with_logits(np.array([[0.8, 1.0, 0.3]], np.float32), logits)
    np.testing.assert_allclose(loss, expected.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(tm.gc_targets(pseudo, "hard").numpy(), [[1.0, 0.0, 0.0]])
    sharp = tm.gc_targets(pseudo, "sharpen").numpy()
    np.testing.assert_allclose(sharp, pseudo**2 / (pseudo**2 + (1 - pseudo) ** 2), rtol=1e-6)


def test_mixup_pairs_each_image_with_the_labels_of_the_image_it_was_mixed_with():
    batch, classes = 6, 4
    images = np.eye(batch, dtype=np.float32)  # row i is e_i: the mixed input reveals lam and the partner
    fixed_logits = tf.constant(np.linspace(-2, 2, batch * classes).reshape(batch, classes), tf.float32)
    seen = {}

    def student(inputs, training):
        seen["mixed"] = inputs.numpy()
        return fixed_logits

    observed = np.zeros((batch, classes), np.float32)
    observed[np.arange(batch), np.arange(batch) % classes] = 1
    pseudo = np.random.default_rng(0).random((batch, classes)).astype(np.float32)
    args = parse("--mixup_alpha 0.4")
    seed = tf.constant([3, 7], tf.int64)
    loss = tm.mixup_gradient_calibration(student, images, observed, pseudo, args, seed).numpy()
    mixed = seen["mixed"]
    off_diagonal = mixed - np.diag(np.diag(mixed))
    moved = off_diagonal.max(axis=1) > 1e-6
    assert moved.any()  # a permutation that moves rows
    lam = float(np.diag(mixed)[moved][0])
    partner = np.where(moved, off_diagonal.argmax(axis=1), np.arange(batch))

    def calibrated(rows):
        return tm.loss_gradient_calibration(fixed_logits, observed[rows], pseudo[rows]).numpy()

    expected = lam * calibrated(np.arange(batch)) + (1 - lam) * calibrated(partner)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


# ---- the baselines: which entries each loss and label-state update touches ----

LOGITS = np.array([[2.0, -1.0, 0.5, -3.0], [0.0, 1.5, -0.5, 4.0]], np.float32)
OBSERVED = np.array([[1, 0, 0, 0], [0, 0, 0, 1]], np.float32)


def softplus(z):
    return np.log1p(np.exp(z))


def test_an_sees_target_one_on_observed_and_zero_on_every_unobserved_entry():
    loss, regulariser = tm.loss_an(LOGITS, OBSERVED)
    expected = np.where(OBSERVED == 1, softplus(-LOGITS), softplus(LOGITS))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-6)
    assert float(regulariser) == 0.0  # no batch-level term: it would be added to every batch's loss


def test_epr_and_em_leave_unobserved_entries_out_of_the_bce_term():
    epr = tm.loss_epr(LOGITS, OBSERVED, 2.0)[0].numpy()
    assert (epr[OBSERVED == 0] == 0).all() and (epr[OBSERVED == 1] > 0).all()
    em, regulariser = tm.loss_em(LOGITS, OBSERVED, 0.1)
    em = em.numpy()
    assert float(regulariser) == 0.0  # EM has no batch-level term (EPR's prior is one)
    p = 1 / (1 + np.exp(-LOGITS.astype(np.float64)))
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    np.testing.assert_allclose(em[OBSERVED == 0], -0.1 * entropy[OBSERVED == 0], rtol=1e-4)


def test_apl_soft_targets_act_only_on_pseudo_labelled_entries():
    stored = OBSERVED.copy()
    stored[0, 2] = -0.25  # a soft negative with target 0.25
    with_apl = tm.loss_em_apl(LOGITS, stored, 0.1, 0.4)[0].numpy()
    without = tm.loss_em(LOGITS, stored, 0.1)[0].numpy()
    difference = with_apl - without
    bce = 0.25 * softplus(-LOGITS[0, 2]) + 0.75 * softplus(LOGITS[0, 2])
    assert difference[0, 2] == pytest.approx(0.4 * bce, rel=1e-5)
    difference[0, 2] = 0
    assert np.abs(difference).max() == 0


def test_apl_pseudo_labels_the_lowest_unobserved_predictions_and_keeps_positives():
    observed = np.array([[1, 0], [0, 0], [0, 1], [0, 0]], np.float32)
    predictions = np.array([[0.01, 0.9], [0.5, 0.2], [0.02, 0.99], [0.3, 0.1]])
    stored = tm.apl_negative_pseudo_labels(observed, predictions, [2, 1])
    # Class 0: unobserved rows 1, 2, 3; the two lowest are rows 2 (0.02) and 3 (0.3). Class 1: row 3 (0.1).
    expected = np.array([[1, 0], [0, 0], [-0.02, 1], [-0.3, -0.1]], np.float32)
    np.testing.assert_allclose(stored, expected, rtol=1e-6)


def test_large_loss_touches_only_the_largest_unobserved_losses():
    # Unobserved AN losses are softplus(logit): the two largest are row 1 col 1 (1.5) and row 0 col 2 (0.5).
    rate = 2 / 8
    for mode in ("ll_r", "ll_ct"):
        loss, selected = tm.loss_large_loss(LOGITS, OBSERVED, 1.0 - rate, mode)
        loss, selected = loss.numpy(), selected.numpy()
        assert sorted(zip(*np.nonzero(selected), strict=True)) == [(0, 2), (1, 1)]
        an = tm.loss_an(LOGITS, OBSERVED)[0].numpy()
        replaced = np.zeros_like(an) if mode == "ll_r" else softplus(-LOGITS)  # rejected / corrected to 1
        np.testing.assert_allclose(loss[selected], replaced[selected], rtol=1e-6)
        np.testing.assert_allclose(loss[~selected], an[~selected], rtol=1e-6)


def test_ll_cp_makes_the_corrected_entries_observed_positives_of_their_own_rows():
    args = parse("--method ll_cp --backbone mlp")
    observed = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    state = tm.BaselineState("ll_cp", args, observed, observed)
    selected = tf.constant([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    state.after_step(selected, tf.constant([2, 0]))  # the batch held rows 2 and 0, in that order
    np.testing.assert_array_equal(state.observed_matrix.numpy(), [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    state.after_step(tf.constant([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), tf.constant([2, 0]))
    np.testing.assert_array_equal(state.observed_matrix.numpy(), [[1, 0, 1], [0, 1, 0], [0, 1, 1]])


def test_role_moves_each_side_toward_the_other_and_observed_positives_up():
    logits = tf.Variable([[0.0, 2.0, -2.0]])
    estimates = tf.Variable([[0.0, -2.0, 2.0]])
    observed = np.array([[1, 0, 0]], np.float32)
    with tf.GradientTape() as tape:
        matrix, _ = tm.loss_role(logits, observed, estimates, 1.0)
        loss = tf.reduce_sum(matrix)
    grad_logits, grad_estimates = (g.numpy()[0] for g in tape.gradient(loss, [logits, estimates]))
    # Gradient descent raises the observed positive on both sides, and pulls each unobserved entry toward
    # the other model's belief: the classifier's high logit 2 down toward the estimator's low one.
    assert grad_logits[0] < 0 and grad_estimates[0] < 0
    assert grad_logits[1] > 0 and grad_logits[2] < 0
    assert grad_estimates[1] < 0 and grad_estimates[2] > 0
