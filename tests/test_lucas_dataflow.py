"""Data flow of the LUCAS classifier: which class's weight a sample gets, which axis each focal form
normalises over, which axis the heads pool, and which split the class weights come from."""

from types import SimpleNamespace

import keras
import numpy as np

import train_lucas_classifier as classifier

# Five samples, three classes: the batch and class axes differ in length, and every prediction
# (argmax) differs from the truth in samples 0, 1 and 3.
LOGITS = np.array(
    [[0.1, 2.0, -1.0], [1.5, -0.5, 0.3], [0.2, 0.1, 2.2], [-1.0, 0.4, 0.9], [2.5, 0.0, -0.7]], np.float32
)
LABELS = np.array([0, 2, 2, 1, 0])
WEIGHTS = np.array([0.5, 2.0, 4.0])


def log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_weighted_ce_weighs_each_sample_by_its_true_class():
    """sum_i w_{y_i} CE_i / sum_i w_{y_i}, with the weight of the true class, not the predicted one."""
    value = float(classifier.SoftmaxFocalLoss(WEIGHTS, gamma=0.0, weighted_mean=True)(LABELS, LOGITS))
    ce = -log_softmax(LOGITS.astype(np.float64))[np.arange(5), LABELS]
    true_weight, predicted_weight = WEIGHTS[LABELS], WEIGHTS[LOGITS.argmax(axis=1)]
    np.testing.assert_allclose(value, (true_weight * ce).sum() / true_weight.sum(), rtol=1e-5)
    assert abs(value - (predicted_weight * ce).sum() / predicted_weight.sum()) > 1e-2


def test_weighted_ce_normalises_by_the_weight_sum_also_when_it_is_below_one():
    """Small class weights (a batch sum of 0.11): the divisor is that sum, not a floor of 1."""
    weights = WEIGHTS / 100.0
    value = float(classifier.SoftmaxFocalLoss(weights, gamma=0.0, weighted_mean=True)(LABELS, LOGITS))
    ce = -log_softmax(LOGITS.astype(np.float64))[np.arange(5), LABELS]
    np.testing.assert_allclose(value, (weights[LABELS] * ce).sum() / weights[LABELS].sum(), rtol=1e-5)


def test_lin_focal_averages_over_samples_with_alpha_of_the_true_class():
    """Lin's form: mean over the batch of alpha_{y_i} (1 - p_{y_i})^gamma CE_i (no weight normaliser)."""
    value = float(classifier.SoftmaxFocalLoss(WEIGHTS, gamma=2.0)(LABELS, LOGITS))
    log_p = log_softmax(LOGITS.astype(np.float64))[np.arange(5), LABELS]
    terms = WEIGHTS[LABELS] * (1 - np.exp(log_p)) ** 2 * -log_p
    np.testing.assert_allclose(value, terms.mean(), rtol=1e-5)
    assert abs(value - terms.sum() / WEIGHTS[LABELS].sum()) > 1e-3


def test_smp_focal_normalises_each_class_over_the_batch():
    """smp's normaliser sums the focal factors of one class over the batch (axis 0), not over classes."""
    logits = LOGITS.astype(np.float64)
    targets = np.eye(3)[LABELS]
    bce = np.logaddexp(0.0, logits) - logits * targets
    factor = (1 - np.exp(-bce)) ** 2
    for reduction, combine in (("sum", np.sum), ("mean", np.mean)):
        loss = classifier.OneVsRestFocalLoss(gamma=2.0, normalized=True, class_reduction=reduction)
        value = float(loss(LABELS, LOGITS))
        batch_axis = combine((factor * bce / factor.sum(axis=0, keepdims=True)).mean(axis=0))
        class_axis = combine((factor * bce / factor.sum(axis=1, keepdims=True)).mean(axis=0))
        np.testing.assert_allclose(value, batch_axis, rtol=1e-5)
        assert abs(value - class_axis) > 1e-3


def test_heads_apply_per_token_then_pool_over_the_token_axis():
    """Tokens `(N, T, D)` with T != D: identity = Dense per token then mean over T; MLP = ReLU(Dense)
    per token, then Dense, then mean over T (the ReLU before the pooling)."""
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(4, 3, 5)).astype(np.float32)  # 3 tokens of 5 features
    keras.utils.set_random_seed(0)
    identity = classifier.build_head((3, 5), 2, "identity", None, 0.0)
    kernel, bias = identity.get_layer("classifier").get_weights()
    np.testing.assert_allclose(identity(tokens).numpy(), tokens.mean(axis=1) @ kernel + bias, atol=1e-5)
    mlp = classifier.build_head((3, 5), 2, "mlp", 6, 0.0)
    hidden_kernel, hidden_bias = mlp.get_layer("mlp_decoder").get_weights()
    kernel, bias = mlp.get_layer("classifier").get_weights()
    per_token = np.maximum(tokens @ hidden_kernel + hidden_bias, 0.0) @ kernel + bias
    np.testing.assert_allclose(mlp(tokens).numpy(), per_token.mean(axis=1), atol=1e-5)
    pooled_first = np.maximum(tokens.mean(axis=1) @ hidden_kernel + hidden_bias, 0.0) @ kernel + bias
    assert np.abs(mlp(tokens).numpy() - pooled_first).max() > 1e-3
    # Embeddings (N, h, w, D) become h * w tokens of the D features, features last.
    grid = rng.normal(size=(2, 2, 3, 5))
    np.testing.assert_array_equal(classifier.as_tokens(grid)[1, 4], grid[1, 1, 1])


def test_class_weights_come_from_the_training_split_only(tmp_path):
    """prepare_inputs' class weights are N / (C n_c) of the training chips, not of all chips."""
    labels = np.repeat([0, 1, 2], [10, 5, 3])
    csv = tmp_path / "labels.csv"
    csv.write_text("Point_ID,STR18\n" + "".join(f"{i},{label + 1}\n" for i, label in enumerate(labels)))
    embeddings = tmp_path / "embeddings.npy"
    np.save(embeddings, np.zeros((len(labels), 4), np.float32))
    args = classifier.get_args_parser().parse_args(
        ["--labels_csv", str(csv), "--embeddings", str(embeddings), "--val_fraction", "0.3"]
    )
    inputs = classifier.prepare_inputs(args)
    train = labels[inputs.splits["train"]]
    expected = np.zeros(10)
    expected[:3] = len(train) / (3 * np.bincount(train))
    np.testing.assert_allclose(inputs.class_weights, expected)
    everything = np.zeros(10)
    everything[:3] = len(labels) / (3 * np.bincount(labels))
    assert np.abs(inputs.class_weights - everything).max() > 1e-2
    assert isinstance(inputs, SimpleNamespace)
