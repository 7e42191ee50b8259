"""Formula checks for train_lucas_classifier.py: focal / weighted CE losses, class weights, macro
accuracy, the stratified split, the RGB -> 6-band kernel adaptation, the decoders and the cached
frozen features."""

from types import SimpleNamespace

import keras
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight

import train_lucas_classifier as classifier
from common.lucas import lucas_chips

LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-2.0, 3.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
LABELS = np.array([0, 2, 1, 0])
ALPHA = np.array([0.5, 2.0, 4.0])


def softmax(logits):
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_focal_loss_equals_its_formula():
    p_true = softmax(LOGITS.astype(np.float64))[np.arange(len(LABELS)), LABELS]
    expected = np.mean(-ALPHA[LABELS] * (1 - p_true) ** 2.0 * np.log(p_true))
    loss = classifier.SoftmaxFocalLoss(ALPHA, gamma=2.0)(LABELS, LOGITS)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    unweighted = np.mean(-((1 - p_true) ** 2.0) * np.log(p_true))
    np.testing.assert_allclose(
        float(classifier.SoftmaxFocalLoss(None, gamma=2.0)(LABELS, LOGITS)), unweighted, rtol=1e-5
    )


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    reference = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(LABELS, LOGITS)
    ours = classifier.SoftmaxFocalLoss(None, gamma=0.0)(LABELS, LOGITS)
    np.testing.assert_allclose(float(ours), float(reference), rtol=1e-6)


def test_weighted_ce_uses_pytorch_weighted_mean():
    # PyTorch CrossEntropyLoss(weight=w): sum_i w_{y_i} nll_i / sum_i w_{y_i}.
    nll = -np.log(softmax(LOGITS.astype(np.float64))[np.arange(len(LABELS)), LABELS])
    expected = np.sum(ALPHA[LABELS] * nll) / np.sum(ALPHA[LABELS])

    class Args:
        focal_weighting, focal_gamma, focal_form, focal_reduction = "alpha", 2.0, "lin", "sum"

    loss = classifier.make_loss("wce", ALPHA, Args)
    np.testing.assert_allclose(float(loss(LABELS, LOGITS)), expected, rtol=1e-5)
    assert classifier.make_loss("focal", ALPHA, Args).class_weights == list(ALPHA)
    Args.focal_weighting = "none"
    assert classifier.make_loss("focal", ALPHA, Args).class_weights is None
    assert classifier.make_loss("ce", ALPHA, Args).class_weights is None
    Args.focal_form = "smp"  # the study's form: no class weights at all
    smp = classifier.make_loss("focal", ALPHA, Args)
    assert isinstance(smp, classifier.OneVsRestFocalLoss) and smp.normalized and smp.gamma == 2.0


def smp_focal_transcription(logits, labels, normalized, gamma=2.0, version="0.5.0"):
    """segmentation_models_pytorch FocalLoss("multiclass", normalized=...) written out in torch.

    For each class: focal_loss_with_logits(logits[:, c], labels == c, alpha=None, reduction="mean"),
    i.e. logpt = BCE-with-logits, pt = exp(-logpt), f = (1 - pt)^gamma, loss = f * logpt, divided by
    clamp_min(sum f, 1e-6) when normalized, then averaged. smp 0.4.0 and 0.5.0 add the per-class
    losses up (`loss += self.focal_loss_fn(...)`); smp 0.6.0 stacks them and takes
    `class_losses.mean()` (no class_weights given).
    """
    import torch
    import torch.nn.functional as F

    class_losses = []
    for c in range(logits.shape[1]):
        target = (labels == c).to(logits.dtype)
        logpt = F.binary_cross_entropy_with_logits(logits[:, c], target, reduction="none")
        focal_term = (1.0 - torch.exp(-logpt)).pow(gamma)
        loss = focal_term * logpt
        if normalized:
            loss = loss / focal_term.sum().clamp_min(1e-6)
        class_losses.append(loss.mean())
    if version == "0.6.0":
        return torch.stack(class_losses).mean()
    total = 0
    for class_loss in class_losses:
        total = total + class_loss
    return total


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize(("class_reduction", "version"), [("sum", "0.5.0"), ("mean", "0.6.0")])
def test_one_vs_rest_focal_loss_equals_its_transcription(normalized, class_reduction, version):
    """Value and gradient equal smp's formula on hand-made logits, with and without the normaliser,
    summed over classes as in smp 0.4.0 / 0.5.0 and averaged as in smp 0.6.0."""
    import tensorflow as tf
    import torch

    torch_logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    expected = smp_focal_transcription(torch_logits, torch.tensor(LABELS), normalized, version=version)
    expected.backward()
    loss = classifier.OneVsRestFocalLoss(gamma=2.0, normalized=normalized, class_reduction=class_reduction)
    tf_logits = tf.Variable(LOGITS)
    with tf.GradientTape() as tape:
        value = loss(LABELS, tf_logits)
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(value, tf_logits).numpy(), torch_logits.grad.numpy(), atol=1e-6)
    # By hand for sample 0, class 0 (target 1, z = 2): BCE = log(1 + e^-2), f = (1 - sigmoid(2))^2.
    bce = np.log1p(np.exp(-2.0))
    np.testing.assert_allclose((1 - np.exp(-bce)) ** 2, (1 - 1 / (1 + np.exp(-2.0))) ** 2)
    probability = 1 / (1 + np.exp(-LOGITS.astype(np.float64)))
    targets = np.eye(3)[LABELS]
    bce = -(targets * np.log(probability) + (1 - targets) * np.log(1 - probability))
    factor = (1 - np.exp(-bce)) ** 2
    terms = factor * bce / (factor.sum(axis=0) if normalized else 1.0)
    per_class = terms.mean(axis=0)
    by_hand = per_class.sum() if class_reduction == "sum" else per_class.mean()
    np.testing.assert_allclose(float(value), by_hand, rtol=1e-5)
    # It is not Lin's softmax form (the 0.6.0 mean happens to land within 0.005 of it on these logits).
    assert (
        class_reduction == "mean"
        or abs(float(value) - float(classifier.SoftmaxFocalLoss(None, 2.0)(LABELS, LOGITS))) > 1e-2
    )


def test_focal_reduction_default_is_the_studys_smp_sum_and_mean_is_one_over_c():
    """The default is smp <= 0.5.0's sum over classes (terratorch's pin); mean = sum / C."""
    args = classifier.get_args_parser().parse_args([])
    assert args.focal_form == "smp" and args.focal_reduction == "sum"
    help_text = classifier.get_args_parser().format_help()
    assert "0.5.0" in help_text and "0.6.0" in help_text
    total = classifier.make_loss("focal", None, args)(LABELS, LOGITS)
    args.focal_reduction = "mean"
    mean = classifier.make_loss("focal", None, args)(LABELS, LOGITS)
    np.testing.assert_allclose(float(mean) * LOGITS.shape[1], float(total), rtol=1e-6)
    assert classifier.make_loss("focal", None, args).get_config()["class_reduction"] == "mean"


def test_class_weights_balanced_and_sqrt():
    train_labels = np.array([0] * 6 + [1] * 3 + [3] * 1)
    weights = classifier.class_weights_from_counts(train_labels, 4, "balanced")
    # N / (C n_c) over the 3 classes present; the absent class gets 0.
    np.testing.assert_allclose(weights, [10 / (3 * 6), 10 / (3 * 3), 0.0, 10 / (3 * 1)])
    sklearn_weights = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=train_labels)
    np.testing.assert_allclose(weights[[0, 1, 3]], sklearn_weights)
    np.testing.assert_allclose(
        classifier.class_weights_from_counts(train_labels, 4, "sqrt"), np.sqrt(weights)
    )


# sklearn warns (correctly) that class 9 is predicted but never true: that case is the point here.
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")
def test_macro_accuracy_equals_sklearn_balanced_accuracy():
    rng = np.random.default_rng(0)
    study_counts = np.array(lucas_chips.STUDY_CHIP_COUNTS)
    truth = rng.choice(10, size=300, p=study_counts / study_counts.sum())
    prediction = np.where(rng.random(300) < 0.6, truth, rng.integers(0, 10, 300))
    truth[truth == 9] = 8  # class 9 now only appears in the predictions
    metrics = classifier.classification_metrics(truth, prediction)
    assert np.isclose(metrics["macro_accuracy"], balanced_accuracy_score(truth, prediction))
    assert np.isclose(metrics["overall_accuracy"], np.mean(truth == prediction))
    streaming = classifier.MacroAccuracy(10)
    for start in range(0, 300, 64):
        streaming.update_state(truth[start : start + 64], np.eye(10)[prediction[start : start + 64]])
    assert np.isclose(float(streaming.result()), balanced_accuracy_score(truth, prediction), atol=1e-6)


def test_split_reproduces_study_split_sizes():
    labels = np.repeat(np.arange(10), lucas_chips.STUDY_CHIP_COUNTS)
    splits = classifier.stratified_split(labels, 0.2, 0.0, 42)
    assert (len(splits["train"]), len(splits["val"])) == (1595, 399)
    _, study_val = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=42)
    np.testing.assert_array_equal(splits["val"], np.sort(study_val))


@pytest.mark.parametrize("test_fraction", [0.0, 0.2])
def test_split_keeps_every_class_in_every_split(test_fraction):
    labels = np.repeat(np.arange(6), [60, 25, 7, 4, 3, 3])
    splits = classifier.stratified_split(labels, 0.2, test_fraction, 42)
    assert set(splits) == ({"train", "val", "test"} if test_fraction else {"train", "val"})
    for split in splits.values():
        assert set(labels[split]) == set(range(6))
    merged = np.concatenate(list(splits.values()))
    np.testing.assert_array_equal(np.sort(merged), np.arange(len(labels)))  # a partition


def test_rgb_weights_are_adapted_to_six_bands(tmp_path):
    rgb = classifier.simple_cnn((16, 16, 3))
    rgb.save_weights(tmp_path / "rgb.weights.h5")
    six = classifier.build_backbone("simplecnn", 16, tmp_path / "rgb.weights.h5")
    rgb_kernel, six_kernel = rgb.layers[1].get_weights()[0], six.layers[1].get_weights()[0]
    assert six_kernel.shape[2] == 6
    np.testing.assert_allclose(six_kernel[:, :, :3], rgb_kernel * 0.5, rtol=1e-6)
    np.testing.assert_allclose(six_kernel[:, :, 3], rgb_kernel.mean(axis=2) * 0.5, rtol=1e-5)
    for source, target in zip(rgb.layers[2:], six.layers[2:], strict=True):
        for a, b in zip(source.get_weights(), target.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        classifier.adapt_first_kernel(rgb_kernel, 6, bgr=True)[:, :, 0], rgb_kernel[:, :, 2] * 0.5
    )


def test_decoders_follow_terratorch_token_order():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((3, 5, 4)).astype(np.float32)
    identity = classifier.build_head((5, 4), 10, "identity", None, 0.1)
    kernel, bias = identity.get_layer("classifier").get_weights()
    # Identity decoder: per-token Dense then mean = Dense of the mean token (at inference).
    np.testing.assert_allclose(
        identity(tokens, training=False), tokens.mean(axis=1) @ kernel + bias, atol=1e-5
    )
    mlp = classifier.build_head((5, 4), 10, "mlp", 6, 0.1)
    hidden_kernel, hidden_bias = mlp.get_layer("mlp_decoder").get_weights()
    kernel, bias = mlp.get_layer("classifier").get_weights()
    per_token = np.maximum(tokens @ hidden_kernel + hidden_bias, 0) @ kernel + bias
    np.testing.assert_allclose(mlp(tokens, training=False), per_token.mean(axis=1), atol=1e-5)
    assert classifier.as_tokens(np.zeros((2, 3, 3, 7))).shape == (2, 9, 7)
    assert classifier.as_tokens(np.zeros((2, 7))).shape == (2, 1, 7)


def test_head_on_cached_tokens_equals_the_end_to_end_model():
    # The frozen probe trains the head on features computed once; this is the same function of the
    # chips as the frozen backbone and the head in one model.
    keras.utils.set_random_seed(0)
    inputs = SimpleNamespace(image_size=16, band_mean=np.full(6, 0.1), band_variance=np.full(6, 0.01))
    args = SimpleNamespace(backbone="simplecnn", weights=None, freeze_backbone=True)
    extractor = classifier.build_feature_extractor(args, inputs)
    head = classifier.build_head(extractor.output.shape[1:], 10, "mlp", None, 0.1)
    end_to_end = keras.Model(extractor.input, head(extractor.output))
    chips = np.random.default_rng(0).uniform(0, 0.3, (4, 16, 16, 6)).astype(np.float32)
    cached_tokens = extractor.predict(chips, verbose=0)
    np.testing.assert_allclose(
        head(cached_tokens, training=False), end_to_end(chips, training=False), atol=1e-5
    )
