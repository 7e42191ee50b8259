"""Formula, trigger and learning checks of the SPML baselines and AdaGC (train_multilabel_model.py) and of
the full-label metrics (common/spml/evaluation.py)."""

import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import train_multilabel_model as tm
from common import runs
from common.spml import evaluation, single_positives

LOGITS = np.array([[2.0, -1.0, 0.5, -3.0], [0.0, 1.5, -0.5, 4.0], [-2.0, 0.3, 0.3, -0.7]], np.float32)
# The last row is an all-unobserved image.
OBSERVED = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], np.float32)
FULL = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [0, 1, 1, 0]], np.float32)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def nlog(p):
    return -np.log(p)


def run(loss):
    matrix, regulariser = loss
    return np.asarray(matrix), float(regulariser)


P = sigmoid(LOGITS.astype(np.float64))
POS = OBSERVED == 1
UNOBS = OBSERVED == 0


def test_an_wan_an_ls_full_match_the_reference_formulas():
    an, reg = run(tm.loss_an(LOGITS, OBSERVED))
    np.testing.assert_allclose(an, np.where(POS, nlog(P), nlog(1 - P)), rtol=1e-5)
    assert reg == 0.0
    wan, _ = run(tm.loss_wan(LOGITS, OBSERVED))
    np.testing.assert_allclose(wan, np.where(POS, nlog(P), nlog(1 - P) / 3), rtol=1e-5)
    eps = 0.1
    an_ls, _ = run(tm.loss_an_ls(LOGITS, OBSERVED, eps))
    expected = np.where(POS, (1 - eps) * nlog(P) + eps * nlog(1 - P), (1 - eps) * nlog(1 - P) + eps * nlog(P))
    np.testing.assert_allclose(an_ls, expected, rtol=1e-5)
    full, _ = run(tm.loss_full(LOGITS, FULL))
    np.testing.assert_allclose(full, np.where(FULL == 1, nlog(P), nlog(1 - P)), rtol=1e-5)


def test_an_is_finite_for_extreme_logits_unlike_probabilities_plus_eps():
    logits = np.array([[80.0, -80.0]], np.float32)
    matrix, _ = run(tm.loss_an(logits, np.array([[0.0, 1.0]], np.float32)))
    np.testing.assert_allclose(matrix, [[80.0, 80.0]], rtol=1e-5)


def test_epr_and_role_match_cole_et_al():
    k = 2.0
    epr, reg = run(tm.loss_epr(LOGITS, OBSERVED, k))
    np.testing.assert_allclose(epr, np.where(POS, nlog(P), 0.0), rtol=1e-5)
    assert reg == pytest.approx((P.sum(1).mean() - k) ** 2 / 16, rel=1e-5)
    estimator = np.array([[5.0, -0.2, 0.1, 0.0], [0.3, -0.1, 0.2, 5.0], [0.1, 0.0, -0.3, 0.2]], np.float32)
    E = sigmoid(estimator.astype(np.float64))
    role, reg = run(tm.loss_role(LOGITS, OBSERVED, estimator, k))
    cross_1 = E * nlog(P) + (1 - E) * nlog(1 - P)
    cross_2 = P * nlog(E) + (1 - P) * nlog(1 - E)
    expected = 0.5 * (np.where(POS, nlog(P), 0) + np.where(POS, nlog(E), 0)) + 0.5 * (cross_1 + cross_2)
    np.testing.assert_allclose(role, expected, rtol=1e-5)
    expected_reg = 0.5 * ((P.sum(1).mean() - k) ** 2 + (E.sum(1).mean() - k) ** 2) / 16
    assert reg == pytest.approx(expected_reg, rel=1e-5)


def test_role_gradients_are_detached_across_the_two_models():
    logits = tf.Variable(LOGITS)
    estimator = tf.Variable(np.zeros_like(LOGITS))
    with tf.GradientTape() as tape:
        matrix, _ = tm.loss_role(logits, OBSERVED, estimator, 2.0)
        cross_only = tf.reduce_sum(matrix * (1 - OBSERVED))
    gradient_logits, gradient_estimator = tape.gradient(cross_only, [logits, estimator])
    # d/dz of 0.5 * BCE(target = sigmoid(e) = 0.5, z) is 0.5 * (sigmoid(z) - 0.5) on unobserved entries.
    np.testing.assert_allclose(
        gradient_logits.numpy(), np.where(UNOBS, 0.5 * (P - 0.5), 0), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        gradient_estimator.numpy(), np.where(UNOBS, 0.5 * (0.5 - P), 0), rtol=1e-5, atol=1e-7
    )


def test_em_and_em_apl_match_zhou_et_al():
    alpha, beta = 0.1, 0.4
    em, _ = run(tm.loss_em(LOGITS, OBSERVED, alpha))
    entropy = P * nlog(P) + (1 - P) * nlog(1 - P)
    np.testing.assert_allclose(em, np.where(POS, nlog(P), -alpha * entropy), rtol=1e-5)
    observed = OBSERVED.copy()
    observed[2, 1] = -0.7  # soft pseudo label 0.7
    apl, _ = run(tm.loss_em_apl(LOGITS, observed, alpha, beta))
    expected = np.where(POS, nlog(P), -alpha * entropy)
    expected[2, 1] = beta * (0.7 * nlog(P[2, 1]) + 0.3 * nlog(1 - P[2, 1]))
    np.testing.assert_allclose(apl, expected, rtol=1e-5)


def brute_force_apl(observed, predictions, counts):
    """Zhou et al.'s rule written out: per class, take the lowest still-unobserved prediction, count times."""
    observed = observed.astype(np.float64).copy()
    for column, count in enumerate(counts):
        for _ in range(count):
            candidates = [row for row in range(len(observed)) if observed[row, column] == 0]
            if not candidates:
                break
            row = min(candidates, key=lambda r: (predictions[r, column], r))
            observed[row, column] = -max(predictions[row, column], 1e-12)
    return observed


def test_apl_soft_negatives_equal_a_brute_force_version_over_the_epochs():
    rng = np.random.default_rng(3)
    full = (rng.random((40, 6)) < 0.4).astype(np.uint8)
    full[np.arange(40), rng.integers(0, 6, 40)] = 1
    original = single_positives.single_positive_random(full, 0)
    epochs, warmup = 8, 3
    counts = tm.apl_negative_counts(original, 0.9, epochs, warmup)
    # int(0.9 * U_c / (epochs - warmup)) as in the reference's main.py.
    np.testing.assert_array_equal(counts, [int(0.9 * (original[:, c] == 0).sum() / 5) for c in range(6)])
    ours, reference = original.astype(np.float32), original.astype(np.float64)
    for _ in range(warmup, epochs + 1):  # epochs warmup..epochs pseudo-label, cumulatively
        predictions = np.round(rng.random((40, 6)), 2).astype(np.float32)  # rounded: ties happen
        ours = tm.apl_negative_pseudo_labels(ours, predictions, counts)
        reference = brute_force_apl(reference, predictions, counts)
        np.testing.assert_allclose(ours, reference, rtol=1e-6)
    assert (ours[original == 1] == 1).all() and (ours > 0).sum() == original.sum()
    # Six labelling epochs of about 0.9 / 5 of each class: capped only by the unobserved count.
    negatives = (ours < 0).sum(axis=0)
    np.testing.assert_array_equal(negatives, np.minimum(6 * counts, (original == 0).sum(axis=0)))
    assert (ours[ours < 0] > -1).all()  # soft labels equal the (low) predictions


def test_ll_cp_flips_at_the_fixed_rate_at_the_config_sizes():
    """configs/ll_cp_aid_random.yaml on AID-multilabel: 2400 images_tr less 10 % validation, 17 classes."""
    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "ll_cp_aid_random.yaml").read_text())
    batch, epochs, delta_rel = config["batch_size"], config["epochs"], config["delta_rel"]
    count, classes = 2160, 17
    settings = tm.get_args_parser().parse_args(["--method", "ll_cp", "--delta_rel", str(delta_rel)])
    rng = np.random.default_rng(0)
    full = (rng.random((count, classes)) < 0.3).astype(np.uint8)
    full[np.arange(count), rng.integers(0, classes, count)] = 1
    observed = single_positives.single_positive_random(full, 0)
    state = tm.BaselineState("ll_cp", settings, observed, full)
    sizes = [batch] * (count // batch) + ([count % batch] if count % batch else [])
    for epoch in range(1, epochs + 1):
        state.start_epoch(epoch)
        order = np.random.default_rng(epoch).permutation(count)
        for start, size in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True):
            rows = order[start : start + size]
            labels = tf.gather(state.observed_matrix, rows)
            logits = tf.constant(rng.normal(size=(size, classes)).astype(np.float32))
            _, _, selected = state.loss(logits, labels, rows)
            state.after_step(tf.cast(selected, tf.float32), rows)
    flips = int((state.observed_matrix.numpy() == 1).sum() - observed.sum())
    # Kim et al.: k = ceil(B * C * delta_rel / 100) per batch from epoch 2 on: 33 x 3 + 1 x 2 per epoch.
    per_epoch = sum(math.ceil(size * classes * delta_rel / 100 - 1e-6) for size in sizes)
    assert per_epoch == 33 * 3 + 2 and flips == (epochs - 1) * per_epoch == 2929


def test_large_loss_rejection_and_correction():
    an, _ = run(tm.loss_an(LOGITS, OBSERVED))
    clean_rate = 1 - 3 / 12  # k = ceil(12 * 0.25) = 3 largest unobserved AN losses
    flat = np.where(UNOBS, an, -np.inf).ravel()
    top3 = np.argsort(-flat, kind="stable")[:3]  # ties: lower index first, as top_k
    selected = np.zeros(12, bool)
    selected[top3] = True
    selected = selected.reshape(an.shape)
    ll_r, mask = tm.loss_large_loss(LOGITS, OBSERVED, clean_rate, "ll_r")
    np.testing.assert_array_equal(mask.numpy(), selected)
    np.testing.assert_allclose(ll_r, np.where(selected, 0.0, an), rtol=1e-5)
    ll_ct, _ = tm.loss_large_loss(LOGITS, OBSERVED, clean_rate, "ll_ct")
    np.testing.assert_allclose(ll_ct, np.where(selected, nlog(P), an), rtol=1e-5)
    _, first_epoch = tm.loss_large_loss(LOGITS, OBSERVED, 1.0, "ll_r")
    assert not first_epoch.numpy().any()


def test_large_loss_ties_at_the_threshold_select_exactly_k():
    logits = np.zeros((2, 4), np.float32)  # every unobserved AN loss ties at log 2
    observed = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    mask = tm.large_loss_selection(tm.loss_an(logits, observed)[0], observed, rate=3 / 8).numpy()
    assert mask.sum() == 3 and not mask[0, 0]


def test_large_loss_k_larger_than_unobserved_count_never_touches_observed_positives():
    observed = np.array([[1, 0, 1, 1], [1, 1, 0, 1]], np.float32)  # only 2 unobserved entries
    mask = tm.large_loss_selection(tm.loss_an(LOGITS[:2], observed)[0], observed, rate=1.0).numpy()
    np.testing.assert_array_equal(mask, observed == 0)


def test_all_negative_batch_gives_finite_losses():
    observed = np.zeros_like(OBSERVED)
    for loss in (
        tm.loss_an(LOGITS, observed),
        tm.loss_wan(LOGITS, observed),
        tm.loss_epr(LOGITS, observed, 2.0),
        tm.loss_em(LOGITS, observed, 0.1),
        tm.loss_em_apl(LOGITS, observed, 0.1, 0.4),
    ):
        matrix, reg = run(loss)
        assert np.isfinite(matrix).all() and np.isfinite(reg)
    epr, _ = run(tm.loss_epr(LOGITS, observed, 2.0))
    assert (epr == 0).all()
    matrix, mask = tm.loss_large_loss(LOGITS, observed, 0.5, "ll_ct")
    assert mask.numpy().sum() == 6 and np.isfinite(matrix.numpy()).all()


def test_gradient_calibration_gradient_is_sigmoid_minus_pseudo_label():
    pseudo = np.array([[0.9, 0.2, 0.6, 0.1], [0.3, 0.8, 0.4, 0.5], [0.5, 0.5, 0.7, 0.05]], np.float32)
    logits = tf.Variable(LOGITS)
    for mode, expected in (
        ("target", np.where(POS, P - 1, P - pseudo)),
        ("scale", np.where(POS, P - 1, (1 - pseudo) * P)),
    ):
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(tm.loss_gradient_calibration(logits, OBSERVED, tf.constant(pseudo), mode))
        np.testing.assert_allclose(tape.gradient(total, logits).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_ranking_agreement_is_two_auc_minus_one():
    probabilities = tf.constant([[0.9, 0.5, 0.95, 0.1], [0.2, 0.2, 0.1, 0.3]])
    observed = tf.constant([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    agreed, pairs = tm.ranking_agreement(probabilities, observed)
    # row 1: above 0.5 and 0.1, below 0.95 -> +1; row 2: tie with 0.2, above 0.1, below 0.3 -> 0.
    assert float(pairs) == 6 and float(agreed) == pytest.approx(1.0)


def test_trigger_fires_near_the_knee_of_a_saturating_curve_and_not_on_a_linear_one():
    epochs = np.arange(1, 16)
    saturating = 0.9 * (1 - np.exp(-0.5 * epochs)) + np.random.default_rng(0).normal(0, 0.003, 15)
    # The slope a b exp(-b t) has fallen by 90 % at t = 1 + ln(10) / 0.5 = 5.6.
    detected, how, params = tm.detect_early_learning_end(saturating, ratio=0.9, min_epochs=3, patience=2)
    assert how == "curve_fit" and detected in (5, 6, 7)
    assert params[0] == pytest.approx(0.9, abs=0.05)
    # Too few epochs after the knee.
    assert tm.detect_early_learning_end(saturating[:6], patience=2)[0] is None
    linear = 0.05 * epochs + 0.1
    assert tm.detect_early_learning_end(linear, ratio=0.9, min_epochs=3, patience=2)[0] is None


def test_multilabel_metrics_skip_classes_without_test_positives():
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.7], [0.6, 0.4, 0.2], [0.1, 0.6, 0.3]])
    metrics = evaluation.multilabel_metrics(scores, labels, ["a", "b", "c"])
    assert metrics["classes_skipped"] == ["c"]
    # class a: perfect ranking -> AP 1; class b: positives at ranks 1 and 3 -> (1 + 2/3) / 2.
    assert metrics["mAP"] == pytest.approx((1 + (1 + 2 / 3) / 2) / 2)
    assert metrics["per_class"][0]["f1"] == pytest.approx(1.0)
    assert metrics["per_class"][1]["f1"] == pytest.approx(2 * 1 / (2 + 2))


# ---- learning check: real training loop on a synthetic single-positive task ----


def synthetic_task(seed=0, n_train=300, n_val=100, n_test=400, num_classes=10, dim=32, noise=1.5):
    """x = y W + noise with ~3 positives per sample; training keeps one random positive per sample."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(num_classes, dim))

    def draw(count):
        labels = (rng.random((count, num_classes)) < 0.3).astype(np.uint8)
        labels[labels.sum(1) == 0, rng.integers(0, num_classes)] = 1
        return (labels @ mixing + noise * rng.normal(size=(count, dim))).astype(np.float32), labels

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = draw(n_train), draw(n_val), draw(n_test)
    return {
        "class_names": [f"class{i}" for i in range(num_classes)],
        "train": {
            "sources": x_train,
            "full": y_train,
            "observed": single_positives.single_positive_random(y_train, seed),
        },
        "val": {
            "sources": x_val,
            "full": y_val,
            "observed": single_positives.single_positive_random(y_val, seed),
        },
        "test": {"sources": x_test, "full": y_test},
    }


def train_features(method, data, tmp_path, epochs=20):
    import keras

    argv = f"--method {method} --backbone mlp --epochs {epochs} --batch_size 32 --learning_rate 3e-3"
    args = tm.get_args_parser().parse_args(f"{argv} --teacher_a_decay 0.99".split())
    runs.seed_everything(0)

    def dataset(features, shuffle_seed=None):
        rows = tf.data.Dataset.from_tensor_slices((features, np.arange(len(features))))
        if shuffle_seed is not None:
            rows = rows.shuffle(len(features), seed=shuffle_seed)
        return rows.batch(32)

    run_dir = tmp_path / method
    run_dir.mkdir()
    dim = data["train"]["sources"].shape[1]

    class FeatureBatches:
        def for_epoch(self, epoch):
            return dataset(data["train"]["sources"], epoch)

    trainer = tm.make_trainer(
        args, lambda: tm.build_classifier("mlp", (dim,), len(data["class_names"])), data["train"]
    )
    state = tm.fit(args, trainer, data, run_dir, FeatureBatches(), dataset(data["val"]["sources"]))
    model = keras.models.load_model(run_dir / "best_model.keras")
    scores = evaluation.predict_probabilities(model, dataset(data["test"]["sources"]))
    return evaluation.multilabel_metrics(scores, data["test"]["full"], data["class_names"])["mAP"], state


@pytest.mark.slow
def test_adagc_beats_assume_negative_and_full_labels_are_best(tmp_path):
    data = synthetic_task()
    map_an, _ = train_features("an", data, tmp_path)
    map_adagc, state = train_features("adagc", data, tmp_path)
    map_full, _ = train_features("full", data, tmp_path)
    assert state["trigger_epoch"] is not None and state["trigger_how"] == "curve_fit"
    assert map_adagc >= map_an
    assert map_full > max(map_adagc, map_an)
    assert map_an > 0.5  # far above chance (about 0.3 for this label density)


def test_permanent_correction_and_apl_rewrite_the_stored_labels(tmp_path):
    data = synthetic_task(n_train=64, n_val=16, n_test=16)
    rows = tf.data.Dataset.from_tensor_slices((data["train"]["sources"], np.arange(64))).batch(32)
    original = data["train"]["observed"]
    for method, extra in (
        ("ll_cp", ["--delta_rel", "50"]),
        ("em_apl", ["--epochs", "4", "--warmup_epoch", "2"]),
    ):
        args = tm.get_args_parser().parse_args(
            ["--method", method, "--backbone", "mlp", "--batch_size", "32", *extra]
        )
        trainer = tm.make_trainer(args, lambda: tm.build_classifier("mlp", (32,), 10), data["train"], rows)
        for epoch in (1, 2):
            trainer.train_epoch(rows, "warmup", epoch)
            if epoch == 1:
                trainer.end_epoch(epoch)
                assert (trainer.baseline.observed_matrix.numpy() == original).all()  # LL and APL wait
                continue
            predictions = evaluation.predict_probabilities(
                trainer.student, rows
            )  # eval mode, training images
            trainer.end_epoch(epoch)
        stored = trainer.baseline.observed_matrix.numpy()
        assert (stored[original == 1] == 1).all()
        if method == "ll_cp":
            # Epoch 2 corrects ceil(32 * 10 * 0.5) = 160 entries per batch; each becomes an observed positive.
            assert (stored == 1).sum() == original.sum() + 2 * 160
        else:
            # Epoch 2 is the warm-up epoch: int(0.9 * U_c / (4 - 2)) soft negatives per class, -prediction.
            counts = [int(0.9 * (original[:, c] == 0).sum() / 2) for c in range(10)]
            np.testing.assert_array_equal((stored < 0).sum(axis=0), counts)
            expected = tm.apl_negative_pseudo_labels(original, predictions, counts)
            np.testing.assert_allclose(stored, expected, rtol=1e-5)


def test_reported_adagc_model_is_on_the_kept_trajectory(tmp_path, monkeypatch):
    import keras

    data = synthetic_task(n_train=200, n_val=100, n_test=100)

    # Early learning found at epoch 5 to have ended at epoch 2: the rollback undoes warm-up epochs 3-5.
    def trigger(args, agreement, epoch):
        return (2, "curve_fit", None) if epoch == 5 else (None, "waiting", None)

    monkeypatch.setattr(tm, "early_learning_trigger", trigger)
    _, state = train_features("adagc", data, tmp_path, epochs=7)
    assert state["trigger_epoch"] == 2
    undone = [row["val_mAP"] for row in state["log"] if row["phase"] == "warmup" and row["epoch"] > 2]
    kept = tm.kept_log(state)
    assert [(row["epoch"], row["phase"]) for row in kept] == [(1, "warmup"), (2, "warmup")] + [
        (epoch, "gc") for epoch in range(3, 8)
    ]
    assert max(undone) > max(row["val_mAP"] for row in kept[:2])  # an undone AN epoch was the best once
    best = max(kept, key=lambda row: row["val_mAP"])
    assert (state["best_epoch"], state["best_phase"]) == (best["epoch"], best["phase"])
    # best_model.keras is that epoch's model: it scores the recorded validation mAP again.
    model = keras.models.load_model(tmp_path / "adagc" / "best_model.keras")
    val = tf.data.Dataset.from_tensor_slices((data["val"]["sources"], np.arange(100))).batch(32)
    again = evaluation.multilabel_metrics(
        evaluation.predict_probabilities(model, val), data["val"]["full"], data["class_names"]
    )
    assert again["mAP"] == pytest.approx(state["best_val_mAP"], abs=1e-6)
    assert not list((tmp_path / "adagc" / "checkpoints").glob("best_*.keras"))  # pruned once GC runs


def test_the_kept_best_model_is_restored_from_the_warm_up_copies(tmp_path):
    checkpoint_dir = tmp_path / "checkpoints"
    checkpoint_dir.mkdir()
    values = [0.5, 0.7, 0.6, 0.8, 0.9]  # warm-up val mAP of epochs 1-5; the best moves to 4, then 5
    state = {"phase": "warmup", "trigger_epoch": None, "best_epoch": 5, "best_val_mAP": 0.9}
    state["log"] = [{"epoch": e, "phase": "warmup", "val_mAP": v} for e, v in enumerate(values, start=1)]
    for epoch in (2, 4, 5):
        (checkpoint_dir / f"best_{epoch:03d}.keras").write_bytes(b"model of epoch %d" % epoch)
    (checkpoint_dir / "state.json").write_text('{"checkpoints": ["epoch_003", "epoch_004", "epoch_005"]}')
    tm.keep_warmup_bests(checkpoint_dir, state)  # rollback targets 3, 4, 5 need the bests 2, 4, 5
    assert sorted(p.name for p in checkpoint_dir.glob("best_*")) == [f"best_00{e}.keras" for e in (2, 4, 5)]
    tm.select_on_kept_trajectory(state, tmp_path, 3)
    assert (tmp_path / "best_model.keras").read_bytes() == b"model of epoch 2"
    assert (state["best_epoch"], state["best_phase"], state["best_val_mAP"]) == (2, "warmup", 0.7)
