"""TensorFlow's fused batch-norm kernel behind Keras 3's own BatchNormalization layers.

Keras 3 on TensorFlow normalises with separate moments, subtract, multiply and add ops; TensorFlow's
`FusedBatchNormV3` does the same computation in one kernel (and its gradient in one more), which makes
conv-net training on a CPU about a quarter faster. `fuse(model)` swaps the *call* of every
`keras.layers.BatchNormalization` in a model for the fused kernel where it applies (TensorFlow backend,
4-D channels-last input, no mask, renorm or synchronisation, epsilon >= 1.001e-5). Nothing else
changes: the layers keep their class, variables and names, so `.keras`, `.weights.h5` and `.h5`
files save and load in plain Keras, and a loaded model is fused again with one call.

The fused kernel returns the batch variance with Bessel's correction; Keras updates its moving
variance with the biased one, so the update below undoes the correction and the moving statistics stay
exactly Keras's. Outputs and gradients equal Keras's BN within float tolerance in training and
inference (tests/test_fused_bn.py).
"""

import os
import types

# keras and tensorflow are imported where used: common.aras400k.efficientnet imports this module, and its
# TensorFlow-free users (dataset_creator.py) must not load TensorFlow.

# tf.compat.v1.nn.fused_batch_norm raises smaller epsilons to this value; Keras would not.
MIN_FUSED_EPSILON = 1.001e-5


def _fused_call(self, inputs, training=None, mask=None):
    """`BatchNormalization.call` through `FusedBatchNormV3`; Keras's own call where that cannot apply."""
    import tensorflow as tf

    rank_ok = len(inputs.shape) == 4 and self.axis in (-1, 3)
    if (
        mask is not None
        or self.renorm
        or self.synchronized
        or not rank_ok
        or self.epsilon < MIN_FUSED_EPSILON
    ):
        return type(self).call(self, inputs, training=training, mask=mask)
    # As Keras: BN runs in float32 whatever the layer's compute dtype (float16 overflows easily).
    inputs = tf.cast(inputs, "float32")
    channels = inputs.shape[-1]
    gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones((channels,), "float32")
    beta = tf.cast(self.beta, "float32") if self.center else tf.zeros((channels,), "float32")
    if training and self.trainable:
        outputs, mean, corrected_variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
        )
        count = tf.cast(tf.size(inputs) // channels, "float32")
        variance = corrected_variance * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
    else:
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs,
            gamma,
            beta,
            mean=tf.cast(self.moving_mean, "float32"),
            variance=tf.cast(self.moving_variance, "float32"),
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=False,
        )
    return tf.cast(outputs, self.compute_dtype)


def batch_norm_layers(model) -> list:
    """Every `keras.layers.BatchNormalization` in `model`, nested models included."""
    import keras

    return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]


def fuse(model) -> int:
    """Run `model`'s BatchNormalization layers through the fused kernel; returns how many were switched.

    Call it before the model is compiled or traced. On a backend other than TensorFlow, or with the
    environment variable RSREPRO_KERAS_BN=1 (Keras's own BN, e.g. to compare), nothing changes and 0
    is returned.
    """
    import keras

    if keras.backend.backend() != "tensorflow" or os.environ.get("RSREPRO_KERAS_BN") == "1":
        return 0
    switched = 0
    for layer in batch_norm_layers(model):
        if getattr(layer, "_rsrepro_fused", False):
            continue
        layer.call = types.MethodType(_fused_call, layer)
        layer._rsrepro_fused = True
        switched += 1
    return switched
