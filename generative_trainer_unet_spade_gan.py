"""ARAS400k mask-conditioned image generator: a SPADE GAN trained on real patches, then one image per mask.

Paper: U. M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language
Models" (ARAS400k; arXiv 2603.09625). The paper's "Generated" set is one image per training mask,
drawn by a SPADE generator (Park et al., CVPR 2019) trained with a PatchGAN discriminator, hinge
losses and a VGG19 perceptual term (reference `generative_trainer_unet_spade_gan.py`; despite the
name the generator has no U-Net skips). segmentation_train.py `--train_splits "train generated"` and
segformer_vis.py use the folder written here (docs/aras400k.md, "generative_trainer_unet_spade_gan.py").

Input: `<root>/train/{images,masks}/*.png` (dataset_creator.py's layout). Output of `--generate`:
`<root>/train/generated/<mask name>.png`, one per mask of `--generate_split`.

Commands:
    python generative_trainer_unet_spade_gan.py --data_root ARAS400k \
        --vgg_weights vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 --generate
    python generative_trainer_unet_spade_gan.py --data_root ARAS400k --resume --generate
    python generative_trainer_unet_spade_gan.py --demo --generate   # 64 px, widths / 16, ~1 min CPU

Runtime: the paper setting (256 px, batch 50, 20 epochs over ~80k patches) needs a GPU
(`--strategy mirrored`); the demo takes about a minute on a laptop CPU (53 s of CPU measured).
Outputs in `results/generative_trainer_unet_spade_gan/<run_name>/`: config.json, log.csv, state.json
+ checkpoint_epochNNN.npz, generator.weights.h5, samples.png, metrics.json. The generator and the
discriminator are plain Keras models whose custom layers are registered, so
`gan.generator.save("generator.keras")` reloads with `keras.saving.load_model`. The demo with
`--generate` prints (the losses depend on the CPU's floating-point order)
    gan: 20 epochs, 220 steps | last epoch loss_D 1.7220 loss_G_adv 0.3791 loss_G_vgg off | 176 masks
"""

import time
from pathlib import Path

from common import cli, precision, progress, tensorboard


def get_args_parser():
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data_root", default="", help="Dataset root holding train/{images,masks}/*.png.")
    add(
        "--image_size",
        type=int,
        default=256,
        help="Patch side; a multiple of 16 (the generator starts at /16).",
    )
    add("--width_divisor", type=int, default=1, help="Divide every channel width by this (1 = the paper's).")
    add("--epochs", type=int, default=20, help="Training epochs (the reference's 20).")
    add("--batch_size", type=int, default=50, help="Global batch size (the reference's 50).")
    add("--learning_rate", type=float, default=2e-4, help="Adam learning rate of G and D.")
    add("--beta_1", type=float, default=0.5, help="Adam beta_1 of G and D.")
    add("--beta_2", type=float, default=0.999, help="Adam beta_2 of G and D.")
    add("--epsilon", type=float, default=1e-8, help="Adam epsilon of G and D (torch.optim.Adam's default).")
    cli.add_optimizer_convention_argument(parser)
    add("--vgg_weights", default="", help="Local Keras VGG19 notop .h5 (none: perceptual term off).")
    add("--vgg_weight", type=float, default=10.0, help="Weight of the VGG19 relu3_3 L1 term.")
    add("--log_every", type=int, default=100, help="Print the losses every this many steps.")
    add("--jit_compile", type=cli.str2bool, default=False, help="XLA-compile the training step.")
    add("--generate", action="store_true", help="After training, write one image per mask (see below).")
    add("--generate_split", default="train", help="The split whose masks --generate draws from.")
    add("--generated_dir", default="", help="Where --generate writes; default <root>/<split>/generated.")
    cli.add_strategy_argument(parser)
    cli.add_demo_argument(parser, "(64 px crops of dataset_creator.py's demo, widths / 16, ~1 min).")
    cli.add_run_arguments(parser)
    precision.add_argument(parser)
    tensorboard.add_argument(parser)
    progress.add_argument(parser)
    parser.demo_defaults(image_size=64, width_divisor=16, epochs=20, batch_size=16, log_every=1000)
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import cv2
import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from common import atomic, checkpoints, optimizers, plots, runs
from common.aras400k import classes, efficientnet, patches
from common.errors import InputError, cli_entry, require, require_dir, require_file, require_in_range

NUM_CLASSES = classes.NUM_CLASSES
INSTANCE_NORM_EPS = 1e-5  # torch.nn.InstanceNorm2d's default
# The arguments that change what a checkpoint holds: --resume refuses a run made with others.
RESUME_SETTINGS = (
    "image_size",
    "width_divisor",
    "batch_size",
    "learning_rate",
    "beta_1",
    "beta_2",
    "vgg_weights",
    "vgg_weight",
    "optimizer_convention",
    "mixed_precision",
    "seed",
)
# Larger values are typing mistakes, refused before anything is written.
MAX_EPOCHS, MAX_IMAGE_SIZE, MAX_BATCH = 10_000, 8192, 1 << 20


# ---- the paper's pieces: SPADE, residual blocks, generator, discriminator, losses ----


def torch_conv(filters, kernel, in_channels, name, strides=1, padding="same", use_bias=True):
    """A Conv2D initialised as torch.nn.Conv2d: weights and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(in_channels * kernel * kernel)
    return layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        kernel_initializer=keras.initializers.RandomUniform(-bound, bound),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
        name=name,
    )


def instance_norm(x):
    """Parameter-free instance norm (InstanceNorm2d, affine=False): biased variance, eps 1e-5."""
    mean, variance = ops.moments(x, axes=[1, 2], keepdims=True)
    return (x - mean) * ops.rsqrt(variance + INSTANCE_NORM_EPS)


def nearest_downsample(segmap, size):
    """F.interpolate(mode="nearest") to `size` for an integer factor: PyTorch keeps pixel i * factor.

    tf.image.resize's nearest mode samples pixel centres (i * factor + factor / 2) instead, which
    would condition every feature on other mask pixels than the reference's.
    """
    factor = segmap.shape[1] // size
    if factor == 1:
        return segmap
    if factor * size != segmap.shape[1]:
        raise ValueError(f"mask side {segmap.shape[1]} is not a multiple of the feature side {size}")
    return segmap[:, ::factor, ::factor, :]


@keras.saving.register_keras_serializable(package="spade_gan")
class NearestDownsample(layers.Layer):
    """`nearest_downsample` of a mask to `size` x `size` as a layer: the generator's input at size / 16."""

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = size

    def call(self, segmap):
        return nearest_downsample(segmap, self.size)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "size": self.size}


@keras.saving.register_keras_serializable(package="spade_gan")
class InstanceNorm(layers.Layer):
    """`instance_norm` as a layer (no parameters): the discriminator's InstanceNorm2d(affine=False)."""

    def call(self, x):
        return instance_norm(x)


@keras.saving.register_keras_serializable(package="spade_gan")
class SPADE(layers.Layer):
    """Park et al. Eq. 1: x_hat * (1 + gamma(m)) + beta(m), gamma and beta from a shared conv of the mask.

    `x_hat` is the parameter-free instance norm of x; the one-hot mask is resized (nearest) to x's
    size, passed through a 3x3 conv to `hidden` channels + ReLU, then two 3x3 convs give gamma, beta.
    """

    def __init__(self, norm_channels, hidden=128, label_channels=NUM_CLASSES, **kwargs):
        super().__init__(**kwargs)
        self.norm_channels, self.hidden, self.label_channels = norm_channels, hidden, label_channels
        self.mlp_shared = torch_conv(hidden, 3, label_channels, "mlp_shared")
        self.mlp_gamma = torch_conv(norm_channels, 3, hidden, "mlp_gamma")
        self.mlp_beta = torch_conv(norm_channels, 3, hidden, "mlp_beta")

    def build(self, input_shape):
        x_shape, _ = input_shape
        mask_shape = (x_shape[0], x_shape[1], x_shape[2], self.label_channels)
        self.mlp_shared.build(mask_shape)
        self.mlp_gamma.build((*mask_shape[:3], self.hidden))
        self.mlp_beta.build((*mask_shape[:3], self.hidden))

    def call(self, inputs):
        x, segmap = inputs
        segmap = nearest_downsample(segmap, x.shape[1])
        activation = ops.relu(self.mlp_shared(segmap))
        return instance_norm(x) * (1.0 + self.mlp_gamma(activation)) + self.mlp_beta(activation)

    def get_config(self):
        return {
            **super().get_config(),
            "norm_channels": self.norm_channels,
            "hidden": self.hidden,
            "label_channels": self.label_channels,
        }


@keras.saving.register_keras_serializable(package="spade_gan")
class SPADEResnetBlock(layers.Layer):
    """SPADE residual block: two (SPADE, LeakyReLU 0.2, 3x3 conv) steps plus the shortcut.

    When the widths differ the shortcut is a learned SPADE + 1x1 conv without bias; no spectral norm
    (the reference has none).
    """

    def __init__(self, fin, fout, hidden=128, **kwargs):
        super().__init__(**kwargs)
        self.fin, self.fout, self.hidden = fin, fout, hidden
        self.learned_shortcut = fin != fout
        self.conv_0 = torch_conv(fout, 3, fin, "conv_0")
        self.conv_1 = torch_conv(fout, 3, fout, "conv_1")
        self.norm_0 = SPADE(fin, hidden, name="norm_0")
        self.norm_1 = SPADE(fout, hidden, name="norm_1")
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, hidden, name="norm_s")
            self.conv_s = torch_conv(fout, 1, fin, "conv_s", use_bias=False)

    def build(self, input_shape):
        x_shape, mask_shape = input_shape
        out_shape = (*x_shape[:3], self.fout)
        self.norm_0.build((x_shape, mask_shape))
        self.conv_0.build(x_shape)
        self.norm_1.build((out_shape, mask_shape))
        self.conv_1.build(out_shape)
        if self.learned_shortcut:
            self.norm_s.build((x_shape, mask_shape))
            self.conv_s.build(x_shape)

    def call(self, inputs):
        x, segmap = inputs
        shortcut = self.conv_s(self.norm_s((x, segmap))) if self.learned_shortcut else x
        dx = self.conv_0(ops.leaky_relu(self.norm_0((x, segmap)), 0.2))
        dx = self.conv_1(ops.leaky_relu(self.norm_1((dx, segmap)), 0.2))
        return shortcut + dx

    def get_config(self):
        return {**super().get_config(), "fin": self.fin, "fout": self.fout, "hidden": self.hidden}


def build_generator(image_size, width_divisor=1):
    """The reference Generator: mask -> 3x3 conv at size/16 -> 4 SPADE blocks with nearest x2 -> tanh RGB.

    Widths 1024 -> 512 -> 256 -> 128 -> 64 (each divided by `width_divisor`); a 256 px mask starts at
    16 x 16. Input: one-hot mask `(B, S, S, 7)`; output: RGB in [-1, 1] `(B, S, S, 3)`.
    """
    require(image_size % 16 == 0, "--image_size", f"is {image_size}", "a multiple of 16")
    widths = [width // width_divisor for width in (1024, 512, 256, 128, 64)]
    hidden = 128 // width_divisor
    segmap = keras.Input((image_size, image_size, NUM_CLASSES), name="mask")
    x = NearestDownsample(image_size // 16, name="mask_at_start")(segmap)
    x = torch_conv(widths[0], 3, NUM_CLASSES, "fc")(x)
    for index in range(4):
        x = SPADEResnetBlock(widths[index], widths[index + 1], hidden, name=f"up_{index}")((x, segmap))
        x = layers.UpSampling2D(2, interpolation="nearest", name=f"upsample_{index}")(x)
    x = torch_conv(3, 3, widths[4], "conv_img")(x)
    image = layers.Activation("tanh", dtype="float32", name="image")(x)
    return keras.Model(segmap, image, name="generator")


def build_discriminator(image_size, width_divisor=1):
    """The reference PatchGAN on concat(mask, image): 4x4 convs 64/128/256 stride 2, 512 stride 1, 1.

    Every conv pads 1 pixel on each side as PyTorch's padding=1 does (Keras "same" would pad a
    stride-1 4x4 conv 1 + 2); instance norm + LeakyReLU 0.2 follow the first four. 256 px -> 30 x 30.
    """
    widths = [width // width_divisor for width in (64, 128, 256, 512)]
    inputs = keras.Input((image_size, image_size, NUM_CLASSES + 3), name="mask_and_image")
    x, in_channels = inputs, NUM_CLASSES + 3
    for index, (width, stride) in enumerate(zip(widths, (2, 2, 2, 1), strict=True)):
        x = layers.ZeroPadding2D(1, name=f"pad_{index}")(x)
        x = torch_conv(width, 4, in_channels, f"model_{index}", strides=stride, padding="valid")(x)
        x = InstanceNorm(name=f"instance_norm_{index}")(x)
        x = layers.LeakyReLU(0.2, name=f"leaky_relu_{index}")(x)
        in_channels = width
    x = layers.ZeroPadding2D(1, name="pad_4")(x)
    logits = torch_conv(1, 4, in_channels, "model_4", padding="valid")(x)
    return keras.Model(inputs, logits, name="discriminator")


def discriminator_hinge_loss(pred_real, pred_fake):
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake))) (the reference's loss_D)."""
    pred_real, pred_fake = ops.cast(pred_real, "float32"), ops.cast(pred_fake, "float32")
    return ops.mean(ops.relu(1.0 - pred_real)) + ops.mean(ops.relu(1.0 + pred_fake))


def generator_hinge_loss(pred_fake):
    """-mean(D(fake)) (the reference's loss_G_adv)."""
    return -ops.mean(ops.cast(pred_fake, "float32"))


def build_vgg_features(image_size, weights_path):
    """VGG19 up to relu3_3 (torchvision features[:16]) from a local Keras notop file, or None."""
    if not weights_path:
        return None
    require_file(weights_path, "a Keras VGG19 notop .h5 weights file")
    try:
        vgg = keras.applications.VGG19(
            include_top=False, weights=str(weights_path), input_shape=(image_size, image_size, 3)
        )
    except (ValueError, OSError) as error:
        raise InputError(
            weights_path,
            f"cannot be loaded into VGG19 ({str(error).splitlines()[0][:100]})",
            "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 or weights saved the same way",
        ) from None
    features = keras.Model(vgg.input, vgg.get_layer("block3_conv3").output, name="vgg19_relu3_3")
    features.trainable = False
    return features


def vgg_input(images):
    """The image the reference shows torchvision's VGG19, in the Keras (Caffe) file's convention.

    The reference feeds images in [-1, 1] straight to torchvision VGG19, which reads its input as
    (rgb - mean) / std. The Keras weights come from the original Caffe model, which reads
    bgr * 255 - mean. The same implied image therefore reaches the Keras file as BGR of
    images * 255 * std. (The two weight sets are different trainings, so features still differ.)
    """
    return ops.flip(images, axis=-1) * ops.convert_to_tensor(255.0 * efficientnet.IMAGENET_STD[::-1])


class SpadeGAN:
    """Generator, discriminator, their Adam optimizers and the reference's D-then-G step."""

    def __init__(self, args, strategy):
        self.strategy, self.vgg_weight = strategy, args.vgg_weight
        with strategy.scope():
            self.generator = build_generator(args.image_size, args.width_divisor)
            self.discriminator = build_discriminator(args.image_size, args.width_divisor)
            self.vgg = build_vgg_features(args.image_size, args.vgg_weights)
            # The reference's torch.optim.Adam: epsilon 1e-8 added after the bias correction (the
            # torch convention, common/optimizers.py); --optimizer_convention keras gives Keras's rule.
            adam = {
                "beta_1": args.beta_1,
                "beta_2": args.beta_2,
                "epsilon": args.epsilon,
                "convention": args.optimizer_convention,
            }
            # Under mixed_float16 each optimizer scales its own loss (common/precision.py).
            self.opt_g = precision.loss_scaled(optimizers.make_optimizer("adam", args.learning_rate, **adam))
            self.opt_d = precision.loss_scaled(optimizers.make_optimizer("adam", args.learning_rate, **adam))
            self.opt_g.build(self.generator.trainable_variables)
            self.opt_d.build(self.discriminator.trainable_variables)
        # One trace for every batch size (the last batch of an epoch is smaller, as in the reference);
        # distributed batches carry their own per-replica shapes, so there tf.function relaxes them.
        size = args.image_size
        signature = [
            tf.TensorSpec((None, size, size, 3), tf.float32),
            tf.TensorSpec((None, size, size, NUM_CLASSES), tf.float32),
        ]
        distributed = strategy.num_replicas_in_sync > 1 or args.strategy != "default"
        self.train_step = tf.function(
            self._distributed_step,
            jit_compile=args.jit_compile,
            input_signature=None if distributed else signature,
            reduce_retracing=True,
        )
        self.generate = tf.function(
            lambda masks: self.generator(masks, training=False), input_signature=signature[1:]
        )

    def discriminator_loss(self, real, masks, fake):
        """D's hinge loss on (mask, real) and (mask, fake), the fake detached (the reference's
        `fake.detach()`): D's update never reaches the generator's weights."""
        discriminator = self.discriminator
        pred_real = discriminator(ops.concatenate([masks, real], -1), training=True)
        pred_fake = discriminator(ops.concatenate([masks, ops.stop_gradient(fake)], -1), training=True)
        return discriminator_hinge_loss(pred_real, pred_fake)

    def replica_step(self, real, masks):
        """One batch: update D on (real, G(mask) detached), then G on D's verdict + 10 x VGG L1."""
        replicas = self.strategy.num_replicas_in_sync
        generator, discriminator = self.generator, self.discriminator
        tape_g = tf.GradientTape()
        with tape_g:
            fake = generator(masks, training=True)
        # tape_g is paused here: the D update is not part of G's graph.
        with tf.GradientTape() as tape_d:
            loss_d = self.discriminator_loss(real, masks, fake)
            # Gradients are summed over replicas, so each replica's mean is divided by their number.
            # Under mixed_float16 the loss scaling is recorded by the tape too (else no gradients).
            scaled_loss_d = self.opt_d.scale_loss(loss_d / replicas)
        grads = tape_d.gradient(scaled_loss_d, discriminator.trainable_variables)
        self.opt_d.apply(grads, discriminator.trainable_variables)
        with tape_g:
            # The reference scores the same fake batch with the updated D.
            pred_fake_g = discriminator(ops.concatenate([masks, fake], -1), training=True)
            loss_g_adv = generator_hinge_loss(pred_fake_g)
            loss_vgg = tf.constant(0.0)
            if self.vgg is not None:
                features = [ops.cast(self.vgg(vgg_input(image)), "float32") for image in (real, fake)]
                distance = ops.abs(features[0] - features[1])
                loss_vgg = self.vgg_weight * ops.mean(distance)
            scaled_loss_g = self.opt_g.scale_loss((loss_g_adv + loss_vgg) / replicas)
        grads = tape_g.gradient(scaled_loss_g, generator.trainable_variables)
        self.opt_g.apply(grads, generator.trainable_variables)
        return ops.stack([loss_d, loss_g_adv, loss_vgg])

    def _distributed_step(self, real, masks):
        losses = self.strategy.run(self.replica_step, args=(real, masks))
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)

    def arrays(self):
        """Every variable of both models and both optimizers, keyed for checkpoints.save."""
        arrays = {}
        for group, variables in self._groups():
            arrays.update(checkpoints.variable_arrays(group, variables))
        return arrays

    def restore(self, arrays, source):
        for group, variables in self._groups():
            checkpoints.assign_arrays(arrays, group, variables, source)

    def _groups(self):
        return (
            ("generator", self.generator.variables),
            ("discriminator", self.discriminator.variables),
            ("adam_g", self.opt_g.variables),
            ("adam_d", self.opt_d.variables),
        )


# ---- data ----


def to_gan_inputs(image, mask, seed):
    """(image in [0, 255], labels) -> (image in [-1, 1], one-hot mask), the reference's transforms."""
    del seed  # the reference trains without augmentation
    return image / 127.5 - 1.0, tf.one_hot(tf.cast(mask, tf.int32), NUM_CLASSES)


def read_mask_batch(paths, image_size):
    """One-hot masks `(B, S, S, 7)` from PNG files; a colour outside the palette is an InputError."""
    batch = np.zeros((len(paths), image_size, image_size, NUM_CLASSES), dtype=np.float32)
    for row, path in enumerate(paths):
        mask = cv2.imread(str(path), cv2.IMREAD_COLOR)
        require(mask is not None, path, "cannot be decoded", "an RGB PNG mask")
        require(
            mask.shape[:2] == (image_size, image_size),
            path,
            f"is {mask.shape[1]}x{mask.shape[0]}",
            f"{image_size}x{image_size} (--image_size)",
        )
        labels = classes.colours_to_labels(cv2.cvtColor(mask, cv2.COLOR_BGR2RGB))
        require(
            labels.max() < NUM_CLASSES, path, "has colours outside the palette", "only ARAS400k class colours"
        )
        batch[row] = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    return batch


def to_uint8(images):
    """The reference's save: (x + 1) / 2 clamped to [0, 1], then ToPILImage's x * 255 truncated to uint8."""
    return (np.clip((np.asarray(images) + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_demo_dataset(args):
    """64 px crops of dataset_creator.py's demo patches, in the segmentation layout (made on first use).

    Each 256 px patch gives (256 / 64)^2 crops (mask and image cut alike, so the 10 m pixels stay).
    The creator's demo splits by patch (11 train, 2 val, 1 test); a source without a test split (e.g. a
    split by tile of two tiles) gives half of its val patches to the test split here.
    """
    root = cli.demo_data_dir(args, "generative_trainer_unet_spade_gan")
    if (root / "demo.json").exists():
        return root
    source = Path(args.results_dir) / "dataset_creator" / "demo"
    if not (source / "train" / "images").is_dir():
        import dataset_creator

        dataset_creator.main(
            dataset_creator.get_args_parser().parse_args(["--demo", "--results_dir", str(args.results_dir)])
        )
    size = args.image_size
    for split in patches.SPLITS:
        if not (source / split / "images").is_dir():
            continue
        names = sorted(path.name for path in (source / split / "images").glob("*.png"))
        for number, name in enumerate(names):
            target = "test" if split == "val" and number % 2 and not (source / "test").is_dir() else split
            for folder in ("images", "masks"):
                picture = cv2.imread(str(source / split / folder / name), cv2.IMREAD_COLOR)
                (root / target / folder).mkdir(parents=True, exist_ok=True)
                for top in range(0, picture.shape[0] - size + 1, size):
                    for left in range(0, picture.shape[1] - size + 1, size):
                        crop = root / target / folder / f"{Path(name).stem}_r{top:03d}_c{left:03d}.png"
                        cv2.imwrite(str(crop), picture[top : top + size, left : left + size])
    atomic.write_json(root / "demo.json", {"source": str(source), "crop": size})
    return root


# ---- main's steps ----


def open_run(args, run_name, count):
    """The run folder: fresh, or (with --resume and a checkpoint) the one whose settings match."""
    run_dir = runs.prepare_run_dir(
        args.results_dir, "generative_trainer_unet_spade_gan", run_name, args.overwrite, args.resume
    )
    if args.resume and (run_dir / checkpoints.STATE_FILE).exists():
        runs.check_same_settings(
            run_dir / "config.json",
            runs.settings_of(args, RESUME_SETTINGS),
            what="the checkpoints of this run",
            section="args",
            hint="the same arguments to resume it, --overwrite to start over, or another --run_name",
        )
        return run_dir, True
    if (run_dir / checkpoints.STATE_FILE).exists():
        raise InputError(
            run_dir, "an interrupted run with this name exists", "--resume, --overwrite or another --run_name"
        )
    runs.write_config(run_dir, args, train_patches=count, steps_per_epoch=-(-count // args.batch_size))
    return run_dir, False


def train(gan, args, pairs, run_dir, state):
    """The reference's loop: for each epoch, for each shuffled batch, one D then one G step."""
    steps_per_epoch = -(-len(pairs) // args.batch_size)
    dataset = patches.train_batches(
        pairs, args.image_size, args.batch_size, args.seed, state["epochs_done"], args.epochs, to_gan_inputs
    )
    batches = iter(gan.strategy.experimental_distribute_dataset(dataset))
    scalars = tensorboard.ScalarLog(run_dir, enabled=not args.no_tensorboard)
    # One bar over every step still to run: its rate and ETA cover the whole training.
    steps_left = (args.epochs - state["epochs_done"]) * steps_per_epoch
    bar = progress.bar(total=steps_left, desc="GAN steps", enabled=args.progress, unit="step")
    for epoch in range(state["epochs_done"], args.epochs):
        started, totals = time.time(), np.zeros(3)
        for step in range(steps_per_epoch):
            real, masks = next(batches)
            losses = gan.train_step(real, masks).numpy()
            totals += losses
            bar.update()
            if step % args.log_every == 0:
                loss_d, loss_g = losses[0], losses[1] + losses[2]
                print(f"Epoch {epoch} [{step}/{steps_per_epoch}] LossD: {loss_d:.4f} LossG: {loss_g:.4f}")
        means = totals / steps_per_epoch
        record = {
            "epoch": epoch + 1,
            "loss_D": means[0],
            "loss_G_adv": means[1],
            "loss_G_vgg": means[2],
            "seconds": time.time() - started,
        }
        state["history"].append({key: float(value) for key, value in record.items()})
        state["epochs_done"] = epoch + 1
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss_D {means[0]:.4f} loss_G_adv {means[1]:.4f} "
            f"loss_G_vgg {means[2]:.4f} ({record['seconds']:.1f} s)",
            flush=True,
        )
        checkpoints.save(run_dir, f"checkpoint_epoch{epoch + 1:03d}", gan.arrays(), state)
        atomic.write_csv(run_dir / "log.csv", state["history"], list(state["history"][0]))
        scalars.write(epoch + 1, state["history"][-1])
    bar.close()


def generate_images(gan, args, data_root, run_dir):
    """One PNG per mask of --generate_split, named as the mask; existing ones from this model are kept."""
    mask_dir = require_dir(Path(data_root) / args.generate_split / "masks", "a folder of PNG masks")
    out_dir = Path(args.generated_dir or Path(data_root) / args.generate_split / "generated")
    marker = out_dir / "generated_by.json"
    origin = {"run_dir": str(run_dir.resolve()), "epochs": args.epochs}
    if marker.exists() and not args.overwrite:
        runs.check_same_settings(
            marker,
            origin,
            what="the images in this folder",
            hint="--overwrite to replace them, or another --generated_dir",
        )
    elif out_dir.is_dir() and any(out_dir.glob("*.png")) and not args.overwrite:
        raise InputError(
            out_dir,
            "holds images this run did not make",
            "--overwrite to replace them, or another --generated_dir",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(marker, origin)
    masks = sorted(mask_dir.glob("*.png"))
    todo = [path for path in masks if args.overwrite or not (out_dir / path.name).exists()]
    batch = max(1, args.batch_size // gan.strategy.num_replicas_in_sync)
    for start in range(0, len(todo), batch):
        paths = todo[start : start + batch]
        images = to_uint8(gan.generate(read_mask_batch(paths, args.image_size)))
        for path, image in zip(paths, images, strict=True):
            atomic.write_bytes(
                out_dir / path.name, cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
            )
    print(f"generated {len(todo)} images ({len(masks) - len(todo)} already there) in {out_dir}")
    return out_dir, len(masks)


def plot_samples(gan, pairs, image_size, path, count=4):
    """Rows of mask | real | generated for the first training pairs."""
    plt = plots.pyplot()
    pairs = pairs[:count]
    fakes = to_uint8(gan.generate(read_mask_batch([mask for _, mask in pairs], image_size)))
    figure, axes = plt.subplots(len(pairs), 3, figsize=(6, 2 * len(pairs)), squeeze=False)
    for row, ((image_path, mask_path), fake) in enumerate(zip(pairs, fakes, strict=True)):
        panels = [cv2.imread(str(mask_path))[..., ::-1], cv2.imread(str(image_path))[..., ::-1], fake]
        for col, (panel, title) in enumerate(zip(panels, ("mask", "real", "generated"), strict=True)):
            axes[row, col].imshow(panel)
            axes[row, col].set_title(title, fontsize=8)
            axes[row, col].axis("off")
    plots.save(figure, path)


def check_arguments(args):
    """Every argument a user can get wrong, checked before anything is written."""
    require(
        args.image_size % 16 == 0 and 32 <= args.image_size <= MAX_IMAGE_SIZE,
        "--image_size",
        f"is {args.image_size}",
        f"a multiple of 16 from 32 to {MAX_IMAGE_SIZE}",
    )
    require(
        0 < args.width_divisor <= 64 and 1024 % args.width_divisor == 0,
        "--width_divisor",
        f"is {args.width_divisor}",
        "a power of 2 up to 64",
    )
    require(1 <= args.epochs <= MAX_EPOCHS, "--epochs", f"is {args.epochs}", f"1 to {MAX_EPOCHS}")
    # A batch of 10**12 patches kept tf.data busy for minutes without one step: refused, like absurd epochs.
    require_in_range(args, "batch_size", 1, MAX_BATCH)
    require(args.log_every >= 1, "--log_every", f"is {args.log_every}", "a positive number of steps")
    require(args.learning_rate > 0, "--learning_rate", f"is {args.learning_rate}", "a positive number")
    for flag, value in (("--beta_1", args.beta_1), ("--beta_2", args.beta_2)):
        require(0 <= value < 1, flag, f"is {value}", "a number in [0, 1)")
    require(args.epsilon > 0, "--epsilon", f"is {args.epsilon}", "a positive number")
    require(0 <= args.seed < 2**32, "--seed", f"is {args.seed}", "0 to 2**32 - 1")
    require(args.vgg_weight >= 0, "--vgg_weight", f"is {args.vgg_weight}", "zero or a positive weight")
    require(
        not Path(args.results_dir).exists() or Path(args.results_dir).is_dir(),
        args.results_dir,
        "is not a folder",
        "a folder for the results (--results_dir)",
    )


@cli_entry
def main(args):
    check_arguments(args)
    if args.demo and not args.data_root:
        args.data_root = str(write_demo_dataset(args))
    require(args.data_root, "--data_root", "is missing", "the dataset root, or --demo")
    runs.print_args(args)
    run_name = args.run_name or ("demo" if args.demo else f"spade_{args.image_size}px_seed{args.seed}")

    # ---- data ----
    pairs = patches.list_split(
        require_dir(args.data_root, "the dataset root folder"), "train", args.image_size
    )
    patches.check_masks(pairs, "error", threads=4)

    # ---- model ----
    runs.seed_everything(args.seed, args.deterministic)
    strategy = runs.make_strategy(args.strategy)
    precision.apply(args.mixed_precision)
    # Built before the run folder is made, so that a bad --vgg_weights file leaves nothing behind.
    gan = SpadeGAN(args, strategy)
    run_dir, resuming = open_run(args, run_name, len(pairs))
    state = {"epochs_done": 0, "history": []}
    if resuming:
        state, arrays = checkpoints.load(run_dir)
        gan.restore(arrays, run_dir / f"{state['checkpoint']}.npz")
        print(f"resuming {run_dir} after epoch {state['epochs_done']}")
    if gan.vgg is None:
        print("note: no --vgg_weights file given: the VGG19 perceptual term is off (adversarial loss only)")
    print(
        f"generator {gan.generator.count_params():,} / discriminator {gan.discriminator.count_params():,} "
        f"parameters, D output {gan.discriminator.output_shape[1]}x{gan.discriminator.output_shape[2]}, "
        f"{len(pairs)} training pairs, global batch {args.batch_size}, "
        f"{strategy.num_replicas_in_sync} replica(s)"
    )

    # ---- train ----
    if state["epochs_done"] < args.epochs:
        train(gan, args, pairs, run_dir, state)
    atomic.save_weights(gan.generator, run_dir / "generator.weights.h5")
    plot_samples(gan, pairs, args.image_size, run_dir / "samples.png")

    # ---- generate ----
    generated = None
    if args.generate:
        out_dir, count = generate_images(gan, args, args.data_root, run_dir)
        generated = {"folder": str(out_dir), "images": count}
    last = state["history"][-1]
    vgg = f"{last['loss_G_vgg']:.4f}" if gan.vgg is not None else "off"
    steps = state["epochs_done"] * -(-len(pairs) // args.batch_size)
    summary = (
        f"gan: {state['epochs_done']} epochs, {steps} steps | "
        f"last epoch loss_D {last['loss_D']:.4f} loss_G_adv {last['loss_G_adv']:.4f} loss_G_vgg {vgg}"
        + (f" | {generated['images']} masks" if generated else "")
    )
    results = {
        "history": state["history"],
        "perceptual_term": gan.vgg is not None,
        "generated": generated,
        "summary": summary,
    }
    atomic.write_json(run_dir / "metrics.json", results)
    print(f"wrote {run_dir}")
    print(summary)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
