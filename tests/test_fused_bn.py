"""The fused batch-norm call equals Keras's BatchNormalization in both modes, gradients included."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from common import fused_bn


def small_conv_net(seed, center=True, scale=True):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, center=center, scale=scale)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, strides=2)(x)
    x = keras.layers.BatchNormalization(axis=3, epsilon=1.001e-5)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def twin_models(**kwargs):
    plain, fused = small_conv_net(0, **kwargs), small_conv_net(1, **kwargs)
    fused.set_weights(plain.get_weights())
    # Non-trivial moving statistics and affine parameters, so inference mode is a real check.
    rng = np.random.default_rng(3)
    for layer_a, layer_b in zip(
        fused_bn.batch_norm_layers(plain), fused_bn.batch_norm_layers(fused), strict=True
    ):
        values = [rng.uniform(0.5, 2.0, v.shape).astype("float32") for v in layer_a.weights]
        layer_a.set_weights(values)
        layer_b.set_weights(values)
    assert fused_bn.fuse(fused) == 2
    assert fused_bn.fuse(fused) == 0  # idempotent
    return plain, fused


@pytest.mark.parametrize("affine", [True, False])
def test_fused_outputs_gradients_and_moving_statistics_equal_keras(affine):
    plain, fused = twin_models(center=affine, scale=affine)
    x = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, (5, 8, 8, 3)).astype("float32"))
    for training in (False, True):
        gradients = []
        for model in (plain, fused):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(x, training=training) ** 2)
            gradients.append(tape.gradient(loss, model.trainable_variables))
        np.testing.assert_allclose(plain(x, training=False), fused(x, training=False), rtol=1e-5, atol=1e-5)
        # Gradients that are exactly 0 in exact arithmetic (a conv bias in front of a training-mode BN)
        # are round-off in both, so the absolute tolerance is relative to the largest gradient.
        scale = max(float(np.abs(g).max()) for g in gradients[0])
        for grad_plain, grad_fused in zip(*gradients, strict=True):
            np.testing.assert_allclose(grad_plain, grad_fused, rtol=1e-4, atol=1e-5 * scale)
    # Two training calls each (the tape loop above and one here) update the moving statistics alike.
    plain(x, training=True)
    fused(x, training=True)
    for layer_a, layer_b in zip(
        fused_bn.batch_norm_layers(plain), fused_bn.batch_norm_layers(fused), strict=True
    ):
        np.testing.assert_allclose(layer_a.moving_mean, layer_b.moving_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer_a.moving_variance, layer_b.moving_variance, rtol=1e-5, atol=1e-6)


def test_fused_model_trains_like_keras_under_fit():
    plain, fused = twin_models()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 8, 8, 3)).astype("float32"), rng.normal(size=(16, 2)).astype("float32")
    for model in (plain, fused):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.MeanSquaredError())
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(plain.weights, fused.weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fused_model_saves_and_loads_in_plain_keras(tmp_path):
    _, fused = twin_models()
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype("float32")
    fused.save(tmp_path / "model.keras")
    fused.save_weights(tmp_path / "model.weights.h5")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert all(type(layer) is keras.layers.BatchNormalization for layer in fused_bn.batch_norm_layers(loaded))
    np.testing.assert_allclose(loaded(x), fused(x), rtol=1e-5, atol=1e-6)
    rebuilt = small_conv_net(5)
    rebuilt.load_weights(tmp_path / "model.weights.h5")
    np.testing.assert_allclose(rebuilt(x), fused(x), rtol=1e-5, atol=1e-6)


def test_fallback_keeps_keras_call_where_the_kernel_does_not_apply():
    keras.utils.set_random_seed(0)
    layer = keras.layers.BatchNormalization(epsilon=1e-6)  # below the fused kernel's minimum epsilon
    dense = keras.layers.BatchNormalization()  # 2-D input
    model = keras.Sequential([keras.Input((4, 4, 2)), layer, keras.layers.Flatten(), dense])
    x = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype("float32")
    expected = model(x, training=True)
    fused_bn.fuse(model)
    np.testing.assert_allclose(model(x, training=True), expected, rtol=1e-6)
