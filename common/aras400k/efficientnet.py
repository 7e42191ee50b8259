"""ARAS400k EfficientNet: the Keras encoder of the SegFormer and its 5-stage feature pyramid.

`segmentation_train.py` puts its SegFormer decoder on these 5 stages and `segformer_vis.py` pools
the last one to compare feature distributions. The paper used segmentation_models_pytorch's
`Segformer(encoder_name="efficientnet-b7", encoder_weights="imagenet")`; here the encoder is
`keras.applications.EfficientNetB0..B7(include_top=False)` with ImageNet-normalised inputs, its
weights from a local notop `.h5` file (nothing is downloaded), and the stages smp takes
(`encoder_pyramid`).
"""

import re

import numpy as np

from common import fused_bn
from common.errors import InputError, require_file

# ImageNet mean and std of RGB in [0, 1]: the encoder's input normalisation (smp's preprocessing for
# ImageNet weights), and torchvision's VGG19 input convention (generative_trainer_unet_spade_gan.py).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
ENCODER_STRIDES = (2, 4, 8, 16, 32)


def encoder_pyramid(model, image_size):
    """smp's 5 EfficientNet encoder stages: the stem (stride 2), then the last block at strides 4-32.

    segmentation_models_pytorch takes the stem's activation as its stride-2 stage (64 channels for
    b7) and the output of the last block before each further downsampling (48, 80, 224, 640).
    """
    block_outputs = {}
    for layer in model.layers:
        match = re.match(r"^(block\d+[a-z])_", layer.name)
        if match:
            # Layers come in graph order, so the last one seen of a block is its output.
            block_outputs[match.group(1)] = layer.output
    by_stride = {image_size // output.shape[1]: output for output in block_outputs.values()}
    by_stride[2] = model.get_layer("stem_activation").output
    return [by_stride[stride] for stride in ENCODER_STRIDES]


def _official_variance_fix(normalization) -> bool:
    """Square the std that the official Keras EfficientNet files store as the input "variance".

    keras.applications' EfficientNet files hold the ImageNet std (0.229, 0.224, 0.225) in the
    Normalization layer's variance slot and, with weights="imagenet", add a Rescaling layer to
    undo it; a model built with weights=None has no such layer, so loading the file as is would
    divide inputs by sqrt(std) (about 0.47) instead of std. Returns True when it squared them.
    """
    variance = np.asarray(normalization.adapt_variance)
    if not np.allclose(variance, IMAGENET_STD, atol=1e-4):
        return False
    normalization.adapt_variance.assign(IMAGENET_STD**2)
    normalization.finalize_state()
    return True


def build_encoder(encoder_name, image_size, weights=""):
    """The paper's encoder: Keras EfficientNet without its top, ImageNet-normalised inputs.

    `weights` is a local notop .h5 file (nothing is downloaded); empty leaves the encoder random.
    """
    import keras

    builder = getattr(keras.applications, f"EfficientNetB{encoder_name[-1]}")
    encoder = builder(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    # The encoder scales inputs by 1/255 then applies its Normalization layer; give that layer the
    # ImageNet mean/std (the smp encoder's preprocessing). A weights file brings its own statistics.
    normalization = next(layer for layer in encoder.layers if isinstance(layer, keras.layers.Normalization))
    normalization.adapt_mean.assign(IMAGENET_MEAN)
    normalization.adapt_variance.assign(IMAGENET_STD**2)
    normalization.finalize_state()
    if weights:
        require_file(weights, f"a Keras {encoder_name} notop .h5 weights file")
        try:
            encoder.load_weights(weights)
        except (ValueError, OSError) as error:
            raise InputError(
                weights,
                f"cannot be loaded into {encoder_name} ({str(error).splitlines()[0][:100]})",
                f"Keras {encoder_name} weights saved with include_top=False",
            ) from None
        if _official_variance_fix(normalization):
            print(f"note: {weights} stores the ImageNet std as variance (official layout): squared it")
    fused_bn.fuse(encoder)  # TensorFlow's fused batch-norm kernel, same variables (common.fused_bn)
    return encoder
