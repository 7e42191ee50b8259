"""Single-positive multi-label (SPML) baselines: losses, label protocol, metrics, batches and their trainer.

Sections: the baseline losses; `BaselineState` (label matrix, LL schedule, ROLE estimator); the
single-positive protocol (random / dominant positives); the full-label metrics (mAP, micro AP, F1);
(images, row index) tf.data batches with per-epoch orders; `SpmlTrainer`, the compiled step of one
baseline, whose hooks a method with more state overrides (AdaGC in train_multilabel_model.py); the
classifier (backbone + Dense logits); the best-epoch selection on a trajectory that a rollback shortened.

Every loss takes logits and an `observed` matrix (1 observed positive, 0 unobserved; EM+APL stores a
soft pseudo label s as -s) and returns `(loss_matrix (B, C), batch_regulariser)`; the training loss is
the mean of the loss matrix over the B x C entries plus the regulariser, as in Cole et al. (CVPR 2021,
`compute_batch_loss`). All losses use the softplus forms of -log(sigmoid), never probabilities + eps.

- AN, AN-LS, WAN, EPR, ROLE: Cole et al., "Multi-Label Learning from Single Positive Labels", CVPR 2021.
- EM, EM+APL: Zhou et al., "Acknowledging the Unknown for Multi-label Learning with Single Positive
  Labels", ECCV 2022.
- LL-R, LL-Ct, LL-Cp: Kim et al., "Large Loss Matters in Weakly Supervised Multi-Label
  Classification", CVPR 2022.
"""

import math
import os

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from common import atomic, checkpoints, fused_bn, pipelines
from common.errors import InputError, require, require_file

BASELINES = ("full", "an", "an_ls", "wan", "epr", "role", "em", "em_apl", "ll_r", "ll_ct", "ll_cp")


def neg_log_sigmoid(logits):
    """-log(sigmoid(z)) = softplus(-z), exact for any z."""
    return tf.nn.softplus(-logits)


def neg_log_one_minus_sigmoid(logits):
    """-log(1 - sigmoid(z)) = softplus(z)."""
    return tf.nn.softplus(logits)


def loss_full(logits, full_labels):
    """Upper bound: BCE against the complete label vector."""
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=full_labels, logits=logits), 0.0


def loss_an(logits, observed):
    """Assume negative (Cole et al., Sec. 3): every unobserved label is a negative."""
    positive = tf.cast(observed > 0, logits.dtype)
    return positive * neg_log_sigmoid(logits) + (1 - positive) * neg_log_one_minus_sigmoid(logits), 0.0


def loss_an_ls(logits, observed, smoothing: float = 0.1):
    """AN with label smoothing: target 1 - eps for positives, eps for assumed negatives."""
    positive = tf.cast(observed > 0, logits.dtype)
    target = positive * (1 - smoothing) + (1 - positive) * smoothing
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits), 0.0


def loss_wan(logits, observed):
    """Weighted AN: assumed negatives weighted 1 / (C - 1)."""
    num_classes = tf.cast(tf.shape(logits)[1], logits.dtype)
    positive = tf.cast(observed > 0, logits.dtype)
    return (
        positive * neg_log_sigmoid(logits)
        + (1 - positive) * neg_log_one_minus_sigmoid(logits) / (num_classes - 1)
    ), 0.0


def expected_positive_regulariser(probabilities, expected_num_positives: float):
    """R(f) = (mean over the batch of sum_c f_c - k)^2 (Cole et al., EPR, squared norm)."""
    return tf.square(tf.reduce_mean(tf.reduce_sum(probabilities, axis=1)) - expected_num_positives)


def loss_epr(logits, observed, expected_num_positives: float):
    """Positive BCE on observed positives + expected-positive regulariser / C^2."""
    num_classes = tf.cast(tf.shape(logits)[1], logits.dtype)
    positive = tf.cast(observed > 0, logits.dtype)
    regulariser = expected_positive_regulariser(tf.sigmoid(logits), expected_num_positives) / num_classes**2
    return positive * neg_log_sigmoid(logits), regulariser


def loss_role(logits, observed, estimator_logits, expected_num_positives: float):
    """ROLE: classifier and label estimator teach each other (each side sees the other detached)."""
    num_classes = tf.cast(tf.shape(logits)[1], logits.dtype)
    positive = tf.cast(observed > 0, logits.dtype)
    predictions, estimates = tf.sigmoid(logits), tf.sigmoid(estimator_logits)
    positive_classifier = positive * neg_log_sigmoid(logits)
    positive_estimator = positive * neg_log_sigmoid(estimator_logits)
    cross_classifier = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.stop_gradient(estimates), logits=logits
    )
    cross_estimator = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.stop_gradient(predictions), logits=estimator_logits
    )
    regulariser = (
        0.5
        * (
            expected_positive_regulariser(predictions, expected_num_positives)
            + expected_positive_regulariser(estimates, expected_num_positives)
        )
        / num_classes**2
    )
    loss_matrix = 0.5 * (positive_classifier + positive_estimator) + 0.5 * (
        cross_classifier + cross_estimator
    )
    return loss_matrix, regulariser


def binary_entropy(logits):
    """H(sigmoid(z)) = p * softplus(-z) + (1 - p) * softplus(z)."""
    probabilities = tf.sigmoid(logits)
    return probabilities * neg_log_sigmoid(logits) + (1 - probabilities) * neg_log_one_minus_sigmoid(logits)


def loss_em(logits, observed, alpha: float):
    """EM (Zhou et al.): BCE on positives, maximise entropy on unobserved (-alpha * H)."""
    positive = tf.cast(observed > 0, logits.dtype)
    unobserved = tf.cast(tf.equal(observed, 0), logits.dtype)
    return positive * neg_log_sigmoid(logits) - alpha * unobserved * binary_entropy(logits), 0.0


def loss_em_apl(logits, observed, alpha: float, beta: float):
    """EM + APL: entries stored as -s (s in (0, 1]) carry a soft pseudo label s, weighted by beta."""
    loss_matrix, _ = loss_em(logits, observed, alpha)
    pseudo = tf.cast(observed < 0, logits.dtype)
    soft_label = tf.maximum(-observed, 0.0)
    pseudo_term = beta * tf.nn.sigmoid_cross_entropy_with_logits(labels=soft_label, logits=logits)
    return loss_matrix + pseudo * pseudo_term, 0.0


def large_loss_rate(method: str, clean_rate, delta_rel: float):
    """Share of a batch's B x C entries that LL modifies (Kim et al., CVPR 2022, Sec. 3.2).

    LL-R and LL-Ct: 1 - clean_rate, growing by delta_rel percent per epoch. LL-Cp corrects labels for
    good, so its rate stays fixed at delta_rel percent per batch once the first epoch is over.
    """
    if method == "ll_cp":
        return tf.where(clean_rate < 1.0, delta_rel / 100.0, 0.0)
    return 1.0 - clean_rate


def large_loss_selection(an_loss_matrix, observed, rate):
    """LL (Kim et al.): mask of the k largest AN losses among unobserved entries.

    k = ceil(B * C * rate) (`large_loss_rate`), capped at the number of unobserved entries, chosen by
    rank with top_k so that exactly k entries are selected even when losses tie at the threshold (the
    reference's `loss < kth_value` test rejects every tie, and selects observed positives once k exceeds
    the unobserved count).
    """
    unobserved = tf.equal(tf.reshape(observed, [-1]), 0)
    flat = tf.where(unobserved, tf.reshape(an_loss_matrix, [-1]), tf.fill(tf.shape(unobserved), -np.inf))
    total = tf.cast(tf.size(flat), tf.float32)
    k = tf.cast(tf.math.ceil(total * tf.cast(rate, tf.float32) - 1e-6), tf.int32)
    k = tf.clip_by_value(k, 0, tf.reduce_sum(tf.cast(unobserved, tf.int32)))
    top = tf.math.top_k(flat, k=k).indices
    selected = tf.scatter_nd(top[:, None], tf.ones_like(top, dtype=tf.bool), tf.shape(flat))
    return tf.reshape(selected, tf.shape(an_loss_matrix))


def loss_large_loss(logits, observed, clean_rate, mode: str, delta_rel: float = 0.0):
    """LL-R rejects (zero loss), LL-Ct / LL-Cp correct (target 1) the selected large-loss entries.

    Returns `(loss_matrix, selected)`: the selection mask takes the regulariser's place.
    """
    an_matrix, _ = loss_an(logits, observed)
    selected = large_loss_selection(an_matrix, observed, large_loss_rate(mode, clean_rate, delta_rel))
    replacement = tf.zeros_like(an_matrix) if mode == "ll_r" else neg_log_sigmoid(logits)
    return tf.where(selected, replacement, an_matrix), selected


def baseline_loss(
    method: str, logits, observed, settings, full_labels=None, estimator_logits=None, clean_rate=1.0
):
    """`(loss_matrix, regulariser, selected)` of one baseline; `selected` is the LL mask, else None.

    `settings` carries label_smoothing, expected_num_positives, em_alpha, apl_beta and delta_rel (the
    parsed flags).
    """
    if method == "full":
        return (*loss_full(logits, full_labels), None)
    if method == "an":
        return (*loss_an(logits, observed), None)
    if method == "an_ls":
        return (*loss_an_ls(logits, observed, settings.label_smoothing), None)
    if method == "wan":
        return (*loss_wan(logits, observed), None)
    if method == "epr":
        return (*loss_epr(logits, observed, settings.expected_num_positives), None)
    if method == "role":
        return (*loss_role(logits, observed, estimator_logits, settings.expected_num_positives), None)
    if method == "em":
        return (*loss_em(logits, observed, settings.em_alpha), None)
    if method == "em_apl":
        return (*loss_em_apl(logits, observed, settings.em_alpha, settings.apl_beta), None)
    if method in ("ll_r", "ll_ct", "ll_cp"):
        loss_matrix, selected = loss_large_loss(logits, observed, clean_rate, method, settings.delta_rel)
        return loss_matrix, 0.0, selected
    raise ValueError(f"unknown SPML baseline {method!r}")


def apl_negative_counts(original_observed: np.ndarray, neg_proportion: float, epochs: int, warmup: int):
    """EM+APL (Zhou et al., code `main.py`): entries of class c pseudo-labelled per epoch from the warm-up on,
    int(neg_proportion * U_c / (epochs - warmup)), U_c being the class's unobserved count at the start."""
    unobserved = (np.asarray(original_observed) == 0).sum(axis=0)
    return (neg_proportion * unobserved / max(epochs - warmup, 1)).astype(np.int64)


def apl_negative_pseudo_labels(observed: np.ndarray, predictions: np.ndarray, counts) -> np.ndarray:
    """EM+APL's asymmetric pseudo-labelling step: per class c, the counts[c] still-unobserved entries with
    the lowest predictions p get a soft negative label, stored as -p (the loss's target is p, weight beta).

    Entries chosen in earlier epochs are no longer 0, so the selection accumulates epoch by epoch. Ties
    go to the lower row (stable sort); p is floored at 1e-12 so that a chosen entry never reads as 0.
    """
    observed = np.asarray(observed, dtype=np.float32).copy()
    for column, count in enumerate(counts):
        unobserved = np.flatnonzero(observed[:, column] == 0)
        chosen = unobserved[np.argsort(predictions[unobserved, column], kind="stable")[:count]]
        observed[chosen, column] = -np.maximum(predictions[chosen, column], 1e-12)
    return observed


def role_initial_estimates(observed: np.ndarray, seed: int) -> np.ndarray:
    """ROLE estimator init (Cole et al.): observed positives at logit(0.995), others in +-logit(0.6)."""
    rng = np.random.default_rng(seed)
    bound = math.log(0.6 / 0.4)
    logits = (bound * (2 * rng.random(observed.shape) - 1)).astype(np.float32)
    logits[observed > 0] = math.log(0.995 / 0.005)
    return logits


# ---- the single-positive protocol ----


def single_positive_random(full_labels: np.ndarray, seed: int) -> np.ndarray:
    """One uniformly drawn true positive per row (seeded). Rows without positives stay all-unobserved."""
    rng = np.random.default_rng(seed)
    observed = np.zeros_like(full_labels, dtype=np.uint8)
    for row, labels in enumerate(full_labels):
        positives = np.flatnonzero(labels)
        if positives.size:
            observed[row, rng.choice(positives)] = 1
    return observed


def single_positive_dominant(full_labels: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """The true positive with the largest area fraction."""
    masked = np.where(full_labels > 0, fractions, -np.inf)
    observed = np.zeros_like(full_labels, dtype=np.uint8)
    has_positive = full_labels.sum(1) > 0
    observed[np.flatnonzero(has_positive), np.argmax(masked, axis=1)[has_positive]] = 1
    return observed


def check_single_positives(observed: np.ndarray, full_labels: np.ndarray, path) -> None:
    """InputError unless `observed` has the shape of `full_labels` and marks only true positives."""
    require(
        observed.shape == full_labels.shape, path, f"shape {observed.shape}", f"shape {full_labels.shape}"
    )
    wrong = np.flatnonzero(((observed > 0) & (full_labels == 0)).any(1))
    require(
        wrong.size == 0,
        path,
        f"row {wrong[0] if wrong.size else 0} marks a label that is not a true positive",
        "one true positive per row (delete the file to regenerate it)",
    )


# ---- full-label evaluation ----


def average_precision(labels, scores) -> float:
    """AP = mean precision at each positive's rank (ties broken by a stable sort), as sklearn computes it."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, scores))


def multilabel_metrics(scores, labels, class_names, threshold: float = 0.5) -> dict:
    """mAP (macro over classes with a test positive; skipped classes reported), micro AP, F1 at threshold.

    Returns:
        `{"mAP", "micro_AP", "macro_F1", "micro_F1", "classes_skipped", "per_class"}`, per_class being
        one `{"class", "test_positives", "ap", "f1"}` row per class.
    """
    labels = np.asarray(labels).astype(np.int64)
    predicted = (np.asarray(scores) >= threshold).astype(np.int64)
    per_class, kept_ap, kept_f1 = [], [], []
    for c, name in enumerate(class_names):
        positives = int(labels[:, c].sum())
        true_positive = int((predicted[:, c] & labels[:, c]).sum())
        denominator = int(predicted[:, c].sum()) + positives
        f1 = 2 * true_positive / denominator if denominator else float("nan")
        ap = average_precision(labels[:, c], scores[:, c]) if positives else float("nan")
        if positives:
            kept_ap.append(ap)
            kept_f1.append(f1)
        per_class.append({"class": name, "test_positives": positives, "ap": ap, "f1": f1})
    tp = int((predicted & labels).sum())
    micro_denominator = int(predicted.sum() + labels.sum())
    return {
        "mAP": float(np.mean(kept_ap)) if kept_ap else float("nan"),
        "micro_AP": average_precision(labels.ravel(), np.asarray(scores).ravel())
        if labels.any()
        else float("nan"),
        "macro_F1": float(np.mean(kept_f1)) if kept_f1 else float("nan"),
        "micro_F1": 2 * tp / micro_denominator if micro_denominator else float("nan"),
        "classes_skipped": [row["class"] for row in per_class if row["test_positives"] == 0],
        "per_class": per_class,
    }


# ---- the baselines' training state ----


class BaselineState:
    """What the baselines keep besides the model: the label matrix, the LL schedule, ROLE's estimator.

    The observed labels live on the device because LL-Cp (after every step) and EM+APL (after every
    epoch from its warm-up on) rewrite them; ROLE trains one logit per training image and class with its
    own optimizer.
    Create it inside the tf.distribute strategy's scope.
    """

    def __init__(self, method: str, settings, train_observed, train_full, make_optimizer=None):
        self.method, self.settings = method, settings
        self.observed_matrix = tf.Variable(
            train_observed.astype(np.float32), trainable=False, name="observed"
        )
        self.full_matrix = tf.constant(train_full.astype(np.float32))
        self.clean_rate = tf.Variable(1.0, trainable=False, name="clean_rate")
        if method == "em_apl":
            epochs, warmup = settings.epochs, settings.warmup_epoch
            self.apl_counts = apl_negative_counts(train_observed, settings.neg_proportion, epochs, warmup)
        self.estimator_logits, self.estimator_optimizer = None, None
        if method == "role":
            initial = role_initial_estimates(train_observed, settings.seed)
            self.estimator_logits = tf.Variable(initial, name="role")
            self.estimator_optimizer = make_optimizer(settings.learning_rate * settings.role_lr_multiplier)
            self.estimator_optimizer.build([self.estimator_logits])

    def loss(self, logits, observed, indices, method=None):
        """`(loss_matrix, regulariser, selected)` of `method` (default: this state's) for a batch of rows."""
        method = method or self.method
        full = tf.gather(self.full_matrix, indices) if method == "full" else None
        estimator = None if self.estimator_logits is None else tf.gather(self.estimator_logits, indices)
        return baseline_loss(method, logits, observed, self.settings, full, estimator, self.clean_rate)

    def start_epoch(self, epoch: int) -> None:
        """LL (Kim et al.): no modification in epoch 1, then delta_rel percent more labels per epoch."""
        self.clean_rate.assign(max(0.0, 1.0 - (epoch - 1) * self.settings.delta_rel / 100.0))

    def after_step(self, selected, indices) -> None:
        """LL-Cp: the corrected labels (float mask `selected` of rows `indices`) become observed positives."""
        if self.method == "ll_cp":
            self.observed_matrix.scatter_max(tf.IndexedSlices(selected, indices))

    def wants_predictions(self, epoch: int) -> bool:
        """EM+APL pseudo-labels after every epoch from `warmup_epoch` on (the reference's `>=`)."""
        return self.method == "em_apl" and epoch >= self.settings.warmup_epoch

    def end_epoch(self, predictions: np.ndarray) -> None:
        """EM+APL: the epoch's soft negative labels, from eval-mode predictions on the training images."""
        current = np.asarray(self.observed_matrix.numpy())
        self.observed_matrix.assign(apl_negative_pseudo_labels(current, predictions, self.apl_counts))

    def checkpoint_groups(self) -> list[tuple[str, list]]:
        """(group name, variables) pairs for `common.checkpoints.variable_arrays` / `assign_arrays`."""
        groups = [("labels", [self.observed_matrix])]
        if self.estimator_logits is not None:
            groups += [
                ("role", [self.estimator_logits]),
                ("role_optimizer", self.estimator_optimizer.variables),
            ]
        return groups


# ---- batches of (images, row indices) ----


def augment_batch(images, seed):
    """Random flips and 90-degree rotations per image (stateless: the same for a given epoch and batch)."""
    count = tf.shape(images)[0]
    draws = tf.random.stateless_uniform(tf.stack([count, 3]), seed)
    images = tf.where((draws[:, 0] < 0.5)[:, None, None, None], tf.reverse(images, [2]), images)
    images = tf.where((draws[:, 1] < 0.5)[:, None, None, None], tf.reverse(images, [1]), images)
    rotations = tf.stack([tf.image.rot90(images, k) for k in range(4)])
    return tf.gather_nd(rotations, tf.stack([tf.cast(draws[:, 2] * 4, tf.int32), tf.range(count)], axis=1))


def load_batches(indices, sources, loader, batch_size: int, reader_threads: int | None = None):
    """Map a dataset of row indices to (images, indices) batches with parallel reads.

    `loader` maps one source to an image, or a batch of sources to images when it is marked `.batched`.
    """
    batched, sources = getattr(loader, "batched", False), tf.constant(np.asarray(sources))
    loader = tf.autograph.experimental.do_not_convert(loader)

    def load(index):
        return loader(tf.gather(sources, index)), index

    if batched:
        # A batched reader holds the GIL only between its NumPy copies: one thread per core (up to 4)
        # overlaps them; more only contend (measured by bench/multilabel_input_speed.py).
        threads = reader_threads or min(4, os.cpu_count() or 1)
        return indices.batch(batch_size).map(load, num_parallel_calls=threads)
    return indices.map(load, num_parallel_calls=reader_threads or tf.data.AUTOTUNE).batch(batch_size)


def make_dataset(sources, loader, batch_size: int, reader_threads: int | None = None):
    """(images, row indices) batches in row order, for validation, test and prediction."""
    indices = tf.data.Dataset.range(len(sources))
    dataset = load_batches(indices, sources, loader, batch_size, reader_threads).prefetch(tf.data.AUTOTUNE)
    return pipelines.without_autotune(dataset)  # a new iterator per pass: no end-of-pass wait


class TrainBatches:
    """Shuffled, augmented training batches; built once, re-ordered per epoch through two small variables.

    `for_epoch(e)` sets the order to `pipelines.epoch_order(count, seed, e)` and the augmentation seeds to
    e, so an epoch's batches are the same whether the run was resumed or not, and the map functions are
    traced once instead of once per epoch.
    """

    def __init__(self, sources, loader, batch_size: int, seed: int, augment_images: bool):
        self.seed, self.count = seed, len(sources)
        self.order = tf.Variable(np.arange(self.count, dtype=np.int64), trainable=False)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        indices = tf.data.Dataset.range(self.count).map(lambda position: tf.gather(self.order, position))
        dataset = load_batches(indices, sources, loader, batch_size)
        if augment_images:

            def augment(images, index):
                seed = tf.stack([tf.cast(self.seed, tf.int64) * 1000 + self.epoch, index[0]])
                return augment_batch(images, seed), index

            dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        # Iterated afresh every epoch: without autotune no pass ends waiting (bench/pass_end_idle.py).
        self.dataset = pipelines.without_autotune(dataset.prefetch(tf.data.AUTOTUNE))

    def for_epoch(self, epoch: int):
        self.order.assign(pipelines.epoch_order(self.count, self.seed, epoch))
        self.epoch.assign(epoch)
        return self.dataset


def compiled_probabilities(model):
    """The model's compiled inference step, sigmoid(model(images)), traced once per model and kept.

    A plain eager call runs the network op by op; the compiled graph is 1.5-1.7x faster on a CPU
    (bench/peer_speed.py). The batch size is left open so full and partial batches share one graph.
    """
    step = getattr(model, "_rsrepro_probabilities", None)
    if step is None:
        step = tf.function(lambda images: tf.sigmoid(model(images, training=False)), reduce_retracing=True)
        model._rsrepro_probabilities = step
    return step


def predict_probabilities(model, dataset) -> np.ndarray:
    """sigmoid(model) over (images, indices) batches, as float64 `(N, C)`."""
    step = compiled_probabilities(model)
    outputs = [step(images).numpy() for images, _ in dataset]
    return np.concatenate(outputs, axis=0).astype(np.float64)


# ---- the baselines' trainer ----


class SpmlTrainer:
    """The student, its optimizer, the baselines' state and the compiled step of one baseline.

    `batch_loss`, `after_step`, `end_epoch` and `checkpoint_groups` are the hooks a method with more
    state overrides (AdaGC's teachers in train_multilabel_model.py). `phase` names the step's graph.
    """

    def __init__(self, settings, strategy, build_model, make_optimizer, train_observed, train_full):
        self.settings, self.strategy = settings, strategy
        # The training images in row order, unaugmented: EM+APL's eval-mode prediction pass.
        self.prediction_dataset = None
        with strategy.scope():
            self.student = build_model()
            self.optimizer = make_optimizer(settings.learning_rate)
            self.optimizer.build(self.student.trainable_variables)
            self.baseline = BaselineState(
                settings.method, settings, train_observed, train_full, make_optimizer
            )
            self.step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_counter")
        self.estimator = self.baseline.estimator_logits
        self._steps = {}

    def checkpoint_groups(self) -> list[tuple[str, list]]:
        """(group, variables) of everything a checkpoint holds; keys are the variables' paths."""
        groups = [("student", self.student.variables), ("optimizer", self.optimizer.variables)]
        return [*groups, ("steps", [self.step_counter]), *self.baseline.checkpoint_groups()]

    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for group, variables in self.checkpoint_groups():
            arrays.update(checkpoints.variable_arrays(group, variables))
        return arrays

    def restore(self, arrays, source) -> None:
        for group, variables in self.checkpoint_groups():
            checkpoints.assign_arrays(arrays, group, variables, source)

    def batch_loss(self, images, indices, observed, phase, extra):
        """(loss matrix, regulariser); `extra` collects sums to report."""
        logits = self.student(images, training=True)
        loss_matrix, regulariser, selected = self.baseline.loss(logits, observed, indices)
        if selected is not None:
            extra["corrected"] = tf.cast(selected, tf.float32)
        return loss_matrix, regulariser

    def after_step(self) -> None:
        """Called once per step, in cross-replica context, before the step counter moves on."""

    def _replica_step(self, images, indices, phase):
        observed = tf.gather(self.baseline.observed_matrix, indices)
        variables = list(self.student.trainable_variables)
        extra = {}
        with tf.GradientTape() as tape:
            loss_matrix, regulariser = self.batch_loss(images, indices, observed, phase, extra)
            loss = tf.nn.compute_average_loss(tf.reduce_mean(loss_matrix, axis=1))
            loss += regulariser / self.strategy.num_replicas_in_sync
            if self.estimator is not None:
                variables.append(self.estimator)
        gradients = tape.gradient(loss, variables)
        if self.estimator is not None:
            self.optimizer.apply_gradients(zip(gradients[:-1], variables[:-1], strict=True))
            self.baseline.estimator_optimizer.apply_gradients([(gradients[-1], self.estimator)])
        else:
            self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return loss, indices, extra

    def _distributed_step(self, images, indices, phase):
        strategy = self.strategy
        loss, indices, extra = strategy.run(self._replica_step, args=(images, indices, phase))
        corrected = extra.pop("corrected", None)
        sums = {
            key: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for key, value in extra.items()
        }
        all_indices = tf.concat(strategy.experimental_local_results(indices), axis=0)
        if corrected is not None:
            self.baseline.after_step(
                tf.concat(strategy.experimental_local_results(corrected), axis=0), all_indices
            )
        self.after_step()
        self.step_counter.assign_add(1)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None), sums

    def train_epoch(self, dataset, phase: str, epoch: int) -> tuple[float, float]:
        """One epoch of compiled steps; returns (mean loss, agreed / agreement_pairs sums or NaN)."""
        self.baseline.start_epoch(epoch)
        distributed = self.strategy.experimental_distribute_dataset(dataset)
        if phase not in self._steps:
            # One graph per phase for full and partial batches (the signature leaves the batch size open);
            # no tensor-dependent Python control flow, so autograph is skipped (it costs seconds).
            self._steps[phase] = tf.function(
                lambda images, indices: self._distributed_step(images, indices, phase),
                input_signature=list(distributed.element_spec),
                autograph=False,
            )
        losses, agreed, pairs = [], 0.0, 0.0
        for images, indices in distributed:
            loss, sums = self._steps[phase](images, indices)
            losses.append(float(loss))
            agreed += float(sums.get("agreed", 0.0))
            pairs += float(sums.get("agreement_pairs", 0.0))
        return float(np.mean(losses)), (agreed / pairs if pairs else float("nan"))

    def end_epoch(self, epoch: int) -> None:
        if self.baseline.wants_predictions(epoch):
            self.baseline.end_epoch(predict_probabilities(self.student, self.prediction_dataset))


def evaluate(model, dataset, labels, class_names) -> dict:
    """`multilabel_metrics` of the model's sigmoid outputs over `dataset` against the full `labels`."""
    return multilabel_metrics(predict_probabilities(model, dataset), labels, class_names)


# ---- the classifier ----


def small_cnn(input_shape):
    """Three conv-BN-ReLU-pool stages and a global average pool: the CPU demos' backbone."""
    image = x = keras.Input(input_shape)
    for width in (16, 32, 64):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.Activation("relu")(layers.BatchNormalization()(x))
        x = layers.MaxPooling2D()(x)
    return keras.Model(image, layers.GlobalAveragePooling2D()(x), name="small_cnn")


def build_classifier(backbone, input_shape, num_classes, band_mean=None, band_variance=None, weights=""):
    """Backbone + global average pool + Dense(C) logits; ResNet-50 in the paper. The first layer
    standardises each band with the training set's statistics."""
    inputs = features = keras.Input(input_shape, name="image")
    if band_mean is not None:
        normalize = layers.Normalization(mean=band_mean, variance=band_variance, name="band_normalization")
        features = normalize(inputs)
    if backbone == "resnet50":
        resnet = keras.applications.ResNet50
        base = resnet(include_top=False, weights=None, input_shape=input_shape, pooling="avg")
    elif backbone == "small_cnn":
        base = small_cnn(input_shape)
    else:
        vector = keras.Input(input_shape)
        base = keras.Model(vector, layers.Dense(64, activation="relu")(vector), name="mlp")
    if weights:
        weights_path = require_file(weights, "a Keras weights file for the backbone")
        try:
            base.load_weights(str(weights_path))
        except Exception as error:
            problem = f"weights do not fit the {backbone} backbone ({type(error).__name__})"
            expected = f"weights saved from a {backbone} with input {input_shape}"
            raise InputError(weights_path, problem, expected) from None
    logits = layers.Dense(num_classes, name="logits")(base(features))
    model = keras.Model(inputs, logits, name=f"{backbone}_spml")
    fused_bn.fuse(model)  # TensorFlow's fused batch-norm kernel, same variables (common.fused_bn)
    return model


def make_optimizer(settings, learning_rate):
    """Adam, or AdamW with `settings.weight_decay`."""
    if settings.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=settings.weight_decay)
    return keras.optimizers.Adam(learning_rate=learning_rate)


# ---- model selection on the kept trajectory ----


def improves(row, best_val_map):
    """The selection rule: a higher validation mAP, or every epoch when there is no validation (NaN)."""
    return not np.isfinite(row["val_mAP"]) or row["val_mAP"] > best_val_map


def best_row(rows):
    """The row `improves` selects last among `rows` (in training order): the reported epoch."""
    best, best_val = None, -1.0
    for row in rows:
        if improves(row, best_val):
            best, best_val = row, (row["val_mAP"] if np.isfinite(row["val_mAP"]) else -1.0)
    return best


def kept_log(state):
    """The epochs that lead to the final model: after a rollback, warm-up up to the trigger, then GC."""
    trigger = state["trigger_epoch"]
    return [r for r in state["log"] if r["phase"] != "warmup" or trigger is None or r["epoch"] <= trigger]


def keep_warmup_bests(checkpoint_dir, state):
    """Keep best_<epoch>.keras for the best epoch as of each epoch a rollback can return to, no others."""
    names = (checkpoints.read_state(checkpoint_dir) or {}).get("checkpoints", [])
    targets = [int(name.split("_")[1]) for name in names] if state["phase"] == "warmup" else []
    needed = {best_row([r for r in state["log"] if r["epoch"] <= target])["epoch"] for target in targets}
    for path in checkpoint_dir.glob("best_*.keras"):
        if int(path.stem.split("_")[1]) not in needed:
            path.unlink()


def select_on_kept_trajectory(state, run_dir, target):
    """After a rollback to `target` the reported model is the best of warm-up epochs 1..target, not an
    undone warm-up epoch (an AN model); GC epochs then compete with it."""
    best = best_row([row for row in state["log"] if row["epoch"] <= target])
    if best["epoch"] != state["best_epoch"]:
        saved = run_dir / "checkpoints" / f"best_{best['epoch']:03d}.keras"
        atomic.write_bytes(run_dir / "best_model.keras", saved.read_bytes())
    best_val = best["val_mAP"] if np.isfinite(best["val_mAP"]) else -1.0
    state.update(best_epoch=best["epoch"], best_phase="warmup", best_val_mAP=best_val)
