"""ARAS400k data flow: which pixels the Dice loss sees, and what each half of the SPADE GAN step trains.

A learning check is blind to these: a Dice loss that counts ignored pixels, or a GAN step whose D
update reaches the generator, still learns. Each test below fails when the corresponding line of
segmentation_train.py or generative_trainer_unet_spade_gan.py is broken.
"""

import numpy as np
import pytest
import tensorflow as tf

import generative_trainer_unet_spade_gan as gan
import segmentation_train as seg
from common.aras400k import classes

IGNORE = classes.IGNORE_INDEX

# ---- Dice loss: pixels marked ignore take no part ----


def dice_by_hand(labels, logits, num_classes=classes.NUM_CLASSES, eps=1e-7):
    """smp's multiclass Dice from logits over the listed pixels only, written out with NumPy."""
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    losses = []
    for c in range(num_classes):
        truth = (labels == c).astype(np.float64)
        if truth.sum() == 0:
            losses.append(0.0)
            continue
        intersection = (probabilities[:, c] * truth).sum()
        cardinality = (probabilities[:, c] + truth).sum()
        losses.append(1.0 - 2.0 * intersection / max(cardinality, eps))
    return float(np.mean(losses))


@pytest.fixture
def masks_with_ignored_pixels():
    """A 2 x 4 x 4 batch: a quarter of the pixels ignored, their logits strongly class 0 (which the
    valid pixels also hold), so that counting them in either sum would move the loss."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (2, 4, 4))
    labels[:, :2, :2] = IGNORE
    logits = rng.normal(size=(2, 4, 4, classes.NUM_CLASSES)).astype(np.float32)
    logits[:, :2, :2, 0] = 8.0
    return labels, logits


@pytest.mark.parametrize("cross_entropy", [False, True])
def test_dice_loss_ignores_pixels_marked_ignore(masks_with_ignored_pixels, cross_entropy):
    labels, logits = masks_with_ignored_pixels
    loss = seg.MulticlassDiceLoss(cross_entropy=cross_entropy)
    with_ignored = float(loss(labels, logits))
    valid = labels != IGNORE
    # The same loss on the valid pixels alone, laid out as one row: the ignored ones change nothing.
    only_valid = float(loss(labels[valid][None, None], logits[valid][None, None]))
    assert with_ignored == pytest.approx(only_valid, abs=1e-6)
    if not cross_entropy:
        assert with_ignored == pytest.approx(dice_by_hand(labels[valid], logits[valid]), abs=1e-5)
    # Counting the ignored pixels as class 0 (what a lost mask would do) gives another value.
    as_class_0 = np.where(valid, labels, 0)
    assert abs(float(loss(as_class_0, logits)) - with_ignored) > 1e-3


def test_dice_loss_of_an_all_ignored_batch_is_zero():
    labels = np.full((1, 2, 2), IGNORE)
    logits = np.random.default_rng(1).normal(size=(1, 2, 2, classes.NUM_CLASSES)).astype(np.float32)
    assert float(seg.MulticlassDiceLoss()(labels, logits)) == 0.0


def test_dice_loss_of_a_single_valid_pixel_counts_its_class_and_its_cross_entropy():
    # One valid pixel (class 2), the rest ignored: class 2 occurs once, so its Dice term counts, and the
    # cross-entropy is that one pixel's, divided by one valid pixel.
    labels = np.full((1, 2, 2), IGNORE)
    labels[0, 1, 0] = 2
    logits = np.random.default_rng(2).normal(size=(1, 2, 2, classes.NUM_CLASSES)).astype(np.float32)
    pixel_logits = logits[0, 1, 0].astype(np.float64)
    cross_entropy = float(np.log(np.exp(pixel_logits).sum()) - pixel_logits[2])
    dice = dice_by_hand(np.array([2]), logits[0, 1, 0][None])
    assert dice > 0.01
    assert float(seg.MulticlassDiceLoss()(labels, logits)) == pytest.approx(dice, abs=1e-5)
    with_ce = float(seg.MulticlassDiceLoss(cross_entropy=True)(labels, logits))
    assert with_ce == pytest.approx(dice + cross_entropy, abs=1e-5)


# ---- SPADE GAN: D then G, D's update sees the detached fake ----


@pytest.fixture
def tiny_gan():
    args = gan.get_args_parser().parse_args("--image_size 32 --width_divisor 64 --learning_rate 0.01".split())
    tf.keras.utils.set_random_seed(0)
    model = gan.SpadeGAN(args, tf.distribute.get_strategy())
    rng = np.random.default_rng(0)
    masks = np.eye(classes.NUM_CLASSES, dtype=np.float32)[rng.integers(0, classes.NUM_CLASSES, (2, 32, 32))]
    real = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    return args, model, tf.constant(real), tf.constant(masks)


def test_discriminator_loss_has_no_gradient_into_the_generator(tiny_gan):
    _, model, real, masks = tiny_gan
    with tf.GradientTape() as tape:
        fake = model.generator(masks, training=True)
        loss_d = model.discriminator_loss(real, masks, fake)
    gradients = tape.gradient(loss_d, model.generator.trainable_variables)
    assert all(gradient is None for gradient in gradients)
    # D's own weights do get a gradient (the loss is not cut off altogether).
    with tf.GradientTape() as tape:
        loss_d = model.discriminator_loss(real, masks, model.generator(masks, training=True))
    assert all(g is not None for g in tape.gradient(loss_d, model.discriminator.trainable_variables))


def test_step_updates_d_first_then_g_against_the_updated_d(tiny_gan):
    # The step written out: D's update from (real, detached fake), then G's from the updated D's
    # verdict on the same fake. A step that scores G with the old D, lets G's step move D, or gives
    # D a gradient of G's loss ends with other weights.
    args, model, real, masks = tiny_gan
    by_hand = gan.SpadeGAN(args, tf.distribute.get_strategy())
    by_hand.generator.set_weights(model.generator.get_weights())
    by_hand.discriminator.set_weights(model.discriminator.get_weights())
    generator, discriminator = by_hand.generator, by_hand.discriminator
    fake = generator(masks, training=True)
    with tf.GradientTape() as tape:
        pred_real = discriminator(tf.concat([masks, real], -1), training=True)
        pred_fake = discriminator(tf.concat([masks, fake], -1), training=True)
        loss_d = gan.discriminator_hinge_loss(pred_real, pred_fake)
    by_hand.opt_d.apply(
        tape.gradient(loss_d, discriminator.trainable_variables), discriminator.trainable_variables
    )
    d_after_d_step = [np.array(w) for w in discriminator.get_weights()]
    with tf.GradientTape() as tape:
        fake = generator(masks, training=True)
        loss_g = gan.generator_hinge_loss(discriminator(tf.concat([masks, fake], -1), training=True))
    by_hand.opt_g.apply(tape.gradient(loss_g, generator.trainable_variables), generator.trainable_variables)

    before_d = [np.array(w) for w in model.discriminator.get_weights()]
    losses = np.asarray(model.replica_step(real, masks))
    assert losses[0] == pytest.approx(float(loss_d), abs=1e-5)
    assert losses[1] == pytest.approx(float(loss_g), abs=1e-5)
    for ours, expected in zip(model.discriminator.get_weights(), d_after_d_step, strict=True):
        np.testing.assert_allclose(ours, expected, atol=1e-6)
    assert any(not np.allclose(new, old) for new, old in zip(d_after_d_step, before_d, strict=True))
    for ours, expected in zip(model.generator.get_weights(), generator.get_weights(), strict=True):
        np.testing.assert_allclose(ours, expected, atol=1e-6)
