"""The paper's pieces in segmentation_train.py and common/aras400k/: Dice loss against its formula,
streaming metrics against sklearn, exact colour decoding, paired augmentation, decoder output size per
encoder size, and mixed precision keeping float32 logits."""

import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import accuracy_score, jaccard_score, precision_recall_fscore_support

import segmentation_train as st
from common import metrics
from common.aras400k import classes, efficientnet
from common.errors import InputError


def softmax(logits):
    exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def dice_by_formula(labels, logits, num_classes, cross_entropy=False):
    """smp multiclass Dice written out class by class over the batch; IGNORE_INDEX pixels dropped."""
    valid = labels != st.IGNORE_INDEX
    probabilities = softmax(logits)[valid]
    truth = labels[valid]
    losses = []
    for c in range(num_classes):
        is_c = truth == c
        intersection = (probabilities[:, c] * is_c).sum()
        cardinality = probabilities[:, c].sum() + is_c.sum()
        losses.append((1 - 2 * intersection / max(cardinality, 1e-7)) if is_c.any() else 0.0)
    loss = np.mean(losses)
    if cross_entropy:
        loss += -np.mean(np.log(probabilities[np.arange(truth.size), truth]))
    return loss


def test_dice_loss_equals_formula_on_hand_made_logits():
    # Two 2x2 images, 3 classes; class 2 never occurs in the truth, so its term is zeroed (smp).
    labels = np.array([[[0, 1], [1, 0]], [[0, 0], [1, 1]]], dtype=np.uint8)
    logits = np.array(
        [
            [[[2.0, 0.5, -1.0], [0.1, 1.5, 0.3]], [[-0.5, 0.2, 2.0], [1.0, 1.0, 1.0]]],
            [[[0.0, 3.0, 0.0], [2.5, -2.0, 0.5]], [[0.3, 0.9, -0.7], [-1.0, 0.0, 1.0]]],
        ],
        dtype=np.float32,
    )
    for cross_entropy in (False, True):
        loss = st.MulticlassDiceLoss(num_classes=3, cross_entropy=cross_entropy)
        expected = dice_by_formula(labels, logits.astype(np.float64), 3, cross_entropy)
        assert float(loss(labels, logits)) == pytest.approx(expected, rel=1e-5)
    # Pixels with an unknown colour (IGNORE_INDEX) leave both sums.
    labels_with_ignore = labels.copy()
    labels_with_ignore[0, 0, 0] = st.IGNORE_INDEX
    loss = st.MulticlassDiceLoss(num_classes=3)
    assert float(loss(labels_with_ignore, logits)) == pytest.approx(
        dice_by_formula(labels_with_ignore, logits.astype(np.float64), 3), rel=1e-5
    )


def test_dice_loss_is_zero_for_perfect_predictions():
    labels = np.random.default_rng(0).integers(0, 7, (2, 8, 8)).astype(np.uint8)
    logits = 50.0 * np.eye(7, dtype=np.float32)[labels]
    assert float(st.MulticlassDiceLoss()(labels, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(st.MulticlassDiceLoss()(labels, -logits)) > 0.9


def test_streaming_metrics_equal_sklearn_including_absent_classes():
    rng = np.random.default_rng(0)
    # Classes 5 and 6 occur nowhere; class 4 only in the predictions; some truth pixels are ignored.
    truth = rng.integers(0, 4, (10, 16, 16)).astype(np.uint8)
    predicted = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, 5, truth.shape)).astype(
        np.uint8
    )
    truth[0, :2] = st.IGNORE_INDEX
    dataset = tf.data.Dataset.from_tensor_slices((predicted, truth)).batch(3)

    def step(batch):
        return tf.constant(0.0), tf.constant(float(batch[0].shape[0])), batch[0], batch[1]

    _, confusion = st.evaluate(step, tf.distribute.get_strategy(), dataset)
    scores = confusion.metrics(st.CLASS_NAMES)
    keep = truth.ravel() != st.IGNORE_INDEX
    flat_truth, flat_predicted = truth.ravel()[keep], predicted.ravel()[keep]
    present = [0, 1, 2, 3, 4]
    precision, recall, f1, _ = precision_recall_fscore_support(
        flat_truth, flat_predicted, labels=present, zero_division=0
    )
    iou = jaccard_score(flat_truth, flat_predicted, labels=present, average=None, zero_division=0)
    assert scores["accuracy"] == pytest.approx(accuracy_score(flat_truth, flat_predicted))
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1), ("iou", iou)):
        assert scores[f"macro_{name}"] == pytest.approx(values.mean())
        ours = [row[name] for row in scores["per_class"]]
        assert ours[:5] == pytest.approx(list(values))
        assert np.isnan(ours[5]) and np.isnan(ours[6])
    # metrics.json writes the absent classes as null.
    assert metrics.json_safe(scores)["per_class"][6]["f1"] is None


def test_mask_colours_round_trip_and_unknown_colours():
    labels = np.random.default_rng(0).integers(0, 7, (16, 16)).astype(np.uint8)
    colours = classes.labels_to_colours(labels)
    assert (classes.colours_to_labels(colours) == labels).all()
    assert (classes.decode_mask_tf(tf.constant(colours)).numpy() == labels).all()
    colours[3, 4] = (0, 100, 1)  # one step away from Tree: not a palette colour
    for decoded in (
        classes.colours_to_labels(colours),
        classes.decode_mask_tf(tf.constant(colours)).numpy(),
    ):
        assert decoded[3, 4] == st.IGNORE_INDEX
        assert (np.delete(decoded.ravel(), 3 * 16 + 4) == np.delete(labels.ravel(), 3 * 16 + 4)).all()
    assert (classes.PALETTE[[0, 6]] == [(0, 100, 0), (0, 0, 255)]).all()


def test_augmentation_moves_image_and_mask_identically():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 7, (16, 16)).astype(np.uint8)
    # The image encodes each pixel's class, so after any geometric transform the classes must agree.
    image = np.repeat((mask.astype(np.float32) * 30 + 20)[..., None], 3, axis=-1)
    augment = tf.function(st.augment_pair)
    changed, brightened = 0, 0
    for seed in range(60):
        new_image, new_mask = (
            value.numpy()
            for value in augment(tf.constant(image), tf.constant(mask), tf.constant([0, seed], tf.int64))
        )
        assert sorted(np.bincount(new_mask.ravel(), minlength=7)) == sorted(
            np.bincount(mask.ravel(), minlength=7)
        )
        # Brightness/contrast is one increasing affine map per image: each class keeps one value, in order.
        values = [np.unique(new_image[..., 0][new_mask == c]) for c in np.unique(new_mask)]
        assert all(v.size == 1 for v in values)
        assert np.all(np.diff([v[0] for v in values]) >= 0)
        changed += not np.array_equal(new_mask, mask)
        brightened += not np.allclose(new_image, new_mask[..., None] * 30.0 + 20)
    # Flips and rotations change most masks; brightness/contrast fires about 30 % of the time.
    assert changed > 40 and 5 < brightened < 35


# Decoder + head parameters of segmentation_models_pytorch's Segformer (5 stages, 1280 -> 256 fuse):
# 5 Linear(c, 256) + Conv 1280->256 (no bias) + BN(256) + Conv 256->7, with smp's stage channels
# b0 (32, 24, 40, 112, 320) and b7 (64, 48, 80, 224, 640); smp reports 601,607 for b7.
SMP_DECODER_PARAMETERS = {
    "efficientnetb0": (528 + 5) * 256 + 1280 * 256 + 512 + 256 * 7 + 7,
    "efficientnetb7": 601_607,
}


def decoder_parameter_count(model):
    """Trainable parameters of the decoder and head (layers named decoder_*), as smp counts them."""
    decoder = [layer for layer in model.layers if layer.name.startswith("decoder_")]
    return sum(int(np.prod(v.shape)) for layer in decoder for v in layer.trainable_weights)


# The smallest and the largest encoder (fewest and most blocks per stage); each build of the larger
# ones costs seconds of CPU, so the sizes in between are left to --encoder runs.
@pytest.mark.parametrize("encoder", ["efficientnetb0", "efficientnetb7"])
def test_decoder_matches_smp_and_has_input_size(encoder):
    model = st.build_segformer(encoder, 64)
    assert tuple(model.output.shape) == (None, 64, 64, st.NUM_CLASSES)
    strides = [64 // feature.shape[1] for feature in efficientnet.encoder_pyramid(model, 64)]
    assert strides == [2, 4, 8, 16, 32]
    assert model.get_layer("decoder_fuse_conv").kernel.shape == (1, 1, 1280, 256)
    assert decoder_parameter_count(model) == SMP_DECODER_PARAMETERS[encoder]


def test_stride2_stage_is_halved_as_pytorch_bilinear_does():
    import keras
    import torch

    feature = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype(np.float32)
    halved = keras.layers.AveragePooling2D(2)(feature)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(feature).permute(0, 3, 1, 2), size=(4, 4), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(np.asarray(halved), expected.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_official_keras_weights_file_gets_std_squared(tmp_path):
    # The keras.applications EfficientNet files store the ImageNet std in the Normalization
    # layer's variance (and rely on an extra Rescaling layer that weights=None models lack).
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    official = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    normalization = next(layer for layer in official.layers if isinstance(layer, keras.layers.Normalization))
    normalization.adapt_mean.assign(efficientnet.IMAGENET_MEAN)
    normalization.adapt_variance.assign(efficientnet.IMAGENET_STD)
    path = tmp_path / "efficientnetb0_notop.h5"
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, official)
    encoder = efficientnet.build_encoder("efficientnetb0", 32, weights=path)
    loaded = next(layer for layer in encoder.layers if isinstance(layer, keras.layers.Normalization))
    np.testing.assert_allclose(np.asarray(loaded.variance).ravel(), efficientnet.IMAGENET_STD**2, rtol=1e-6)
    image = np.full((1, 32, 32, 3), 255.0, np.float32)
    stem_input = keras.Model(encoder.input, loaded.output)(image)
    np.testing.assert_allclose(
        np.asarray(stem_input)[0, 0, 0],
        (1 - efficientnet.IMAGENET_MEAN) / efficientnet.IMAGENET_STD,
        rtol=1e-5,
    )


def test_mixed_precision_keeps_float32_logits():
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = st.build_segformer("efficientnetb0", 32, decoder_width=16)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=st.MulticlassDiceLoss())
        assert model.get_layer("decoder_fuse_conv").compute_dtype == "float16"
        assert model.output.dtype == "float32"
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        logits = model(np.zeros((1, 32, 32, 3), np.float32))
        assert logits.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_bad_image_size_and_weights_file(tmp_path):
    with pytest.raises(InputError, match="multiple of 32"):
        st.build_segformer("efficientnetb0", 48)
    bad = tmp_path / "weights.h5"
    bad.write_bytes(b"not an h5 file")
    with pytest.raises(InputError, match="cannot be loaded into efficientnetb0"):
        efficientnet.build_encoder("efficientnetb0", 32, weights=bad)


def small_compiled_model(width=4):
    import keras

    # A fresh session gives every build the same layer names, and so the same checkpoint keys.
    keras.backend.clear_session()
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(keras.layers.Dropout(0.5)(keras.layers.Dense(width)(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss=keras.losses.MeanSquaredError())
    model.optimizer.build(model.trainable_variables)
    return model


def test_checkpoint_round_trip_restores_weights_optimizer_and_seeds(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = small_compiled_model()
    model.train_on_batch(np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32))
    state = {"epochs_done": 1, "history": [{"epoch": 1, "loss": 0.5}]}
    st.save_checkpoint(model, tmp_path, state)
    assert (tmp_path / "checkpoint_epoch001.npz").is_file() and (tmp_path / "state.json").is_file()
    saved = [np.asarray(v) for v in (*model.variables, *model.optimizer.variables)]

    restored = small_compiled_model()
    loaded_state = st.load_checkpoint(restored, tmp_path)
    assert loaded_state["checkpoint"] == "checkpoint_epoch001" and loaded_state["epochs_done"] == 1
    loaded = [np.asarray(v) for v in (*restored.variables, *restored.optimizer.variables)]
    for a, b in zip(saved, loaded, strict=True):
        np.testing.assert_array_equal(a, b)
    # A later checkpoint replaces the earlier file; a checkpoint of another model is refused.
    state.update(epochs_done=2)
    st.save_checkpoint(restored, tmp_path, state)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["checkpoint_epoch002.npz"]
    with pytest.raises(InputError, match="has shape"):
        st.load_checkpoint(small_compiled_model(width=5), tmp_path)
