"""generative_trainer_unet_spade_gan.py: the SPADE block, generator and discriminator equal small PyTorch
versions of the reference's modules with copied weights; hinge losses; sizes; .keras save and reload;
generation; exact resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
from conftest import assert_main_error, assert_tensorboard_holds_log, call_main
from torch import nn

import generative_trainer_unet_spade_gan as gan
from common import checkpoints
from common.aras400k import classes, demo_data, patches

# ---- the reference's modules, written out in PyTorch ----


class TorchSPADE(nn.Module):
    def __init__(self, norm_nc, label_nc, hidden):
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

    def forward(self, x, segmap):
        segmap = F.interpolate(segmap, size=x.size()[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return self.param_free_norm(x) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class TorchBlock(nn.Module):
    def __init__(self, fin, fout, label_nc, hidden):
        super().__init__()
        self.learned_shortcut = fin != fout
        self.conv_0 = nn.Conv2d(fin, fout, 3, padding=1)
        self.conv_1 = nn.Conv2d(fout, fout, 3, padding=1)
        self.norm_0 = TorchSPADE(fin, label_nc, hidden)
        self.norm_1 = TorchSPADE(fout, label_nc, hidden)
        if self.learned_shortcut:
            self.norm_s = TorchSPADE(fin, label_nc, hidden)
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)

    def forward(self, x, seg):
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return x_s + dx


class TorchGenerator(nn.Module):
    def __init__(self, label_nc, widths, hidden, start):
        super().__init__()
        self.start = start
        self.fc = nn.Conv2d(label_nc, widths[0], 3, padding=1)
        for index in range(4):
            setattr(self, f"up_{index}", TorchBlock(widths[index], widths[index + 1], label_nc, hidden))
        self.conv_img = nn.Conv2d(widths[4], 3, 3, padding=1)

    def forward(self, seg):
        x = self.fc(F.interpolate(seg, size=(self.start, self.start)))
        for index in range(4):
            x = F.interpolate(getattr(self, f"up_{index}")(x, seg), scale_factor=2)
        return torch.tanh(self.conv_img(x))


class TorchDiscriminator(nn.Module):
    def __init__(self, input_nc, widths):
        super().__init__()

        def block(in_f, out_f, stride=2):
            return nn.Sequential(
                nn.Conv2d(in_f, out_f, 4, stride=stride, padding=1),
                nn.InstanceNorm2d(out_f),
                nn.LeakyReLU(0.2),
            )

        self.model = nn.Sequential(
            block(input_nc, widths[0]),
            block(widths[0], widths[1]),
            block(widths[1], widths[2]),
            block(widths[2], widths[3], stride=1),
            nn.Conv2d(widths[3], 1, 4, padding=1),
        )

    def forward(self, x):
        return self.model(x)


def copy_torch_weights(torch_module, keras_root, find):
    """Copy every torch Conv2d into the Keras conv that `find(torch name)` returns (OIHW -> HWIO)."""
    copied = 0
    for name, module in torch_module.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = find(name)
            weights = [module.weight.detach().numpy().transpose(2, 3, 1, 0)]
            if module.bias is not None:
                weights.append(module.bias.detach().numpy())
            conv.set_weights(weights)
            copied += 1
    return copied


def find_in(keras_root):
    def find(name):
        parts = [part for part in name.split(".") if not part.isdigit()]
        found = (
            keras_root.get_layer(parts[0])
            if hasattr(keras_root, "get_layer")
            else getattr(keras_root, parts[0])
        )
        for part in parts[1:]:
            found = getattr(found, part)
        return found

    return find


def to_nhwc(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def random_masks(rng, count, size):
    labels = rng.integers(0, classes.NUM_CLASSES, (count, size // 4, size // 4)).repeat(4, 1).repeat(4, 2)
    return torch.from_numpy(np.eye(classes.NUM_CLASSES, dtype=np.float32)[labels]).permute(0, 3, 1, 2)


# ---- equality with the reference's modules ----


def test_nearest_downsample_keeps_the_pixels_pytorch_keeps():
    segmap = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    for size in (16, 8, 2):
        expected = to_nhwc(F.interpolate(segmap, size=(size, size), mode="nearest"))
        np.testing.assert_array_equal(gan.nearest_downsample(to_nhwc(segmap), size), expected)


def test_spade_resnet_block_equals_the_reference():
    torch.manual_seed(0)
    reference = TorchBlock(6, 4, classes.NUM_CLASSES, 5)
    block = gan.SPADEResnetBlock(6, 4, 5)
    x = torch.randn(2, 6, 8, 8)
    seg = random_masks(np.random.default_rng(0), 2, 32)
    block((to_nhwc(x), to_nhwc(seg)))
    assert copy_torch_weights(reference, block, find_in(block)) == 3 * 3 + 3
    expected = to_nhwc(reference(x, seg))
    np.testing.assert_allclose(np.asarray(block((to_nhwc(x), to_nhwc(seg)))), expected, atol=2e-5)


def test_generator_equals_the_reference():
    torch.manual_seed(1)
    reference = TorchGenerator(classes.NUM_CLASSES, [32, 16, 8, 4, 2], 4, start=2)
    generator = gan.build_generator(32, width_divisor=32)
    assert copy_torch_weights(reference, generator, find_in(generator)) == 1 + 4 * 12 + 1
    seg = random_masks(np.random.default_rng(1), 2, 32)
    expected = to_nhwc(reference(seg))
    np.testing.assert_allclose(np.asarray(generator(to_nhwc(seg))), expected, atol=2e-5)


def test_discriminator_equals_the_reference():
    torch.manual_seed(2)
    reference = TorchDiscriminator(classes.NUM_CLASSES + 3, [2, 4, 8, 16])
    discriminator = gan.build_discriminator(32, width_divisor=32)
    copy_torch_weights(
        reference, discriminator, lambda name: discriminator.get_layer(f"model_{name.split('.')[1]}")
    )
    x = torch.randn(2, classes.NUM_CLASSES + 3, 32, 32)
    expected = to_nhwc(reference(x))
    assert expected.shape == (2, 2, 2, 1)
    np.testing.assert_allclose(np.asarray(discriminator(to_nhwc(x))), expected, atol=2e-5)


def test_hinge_losses_follow_their_formula():
    pred_real = np.array([[2.0, 0.5], [-1.0, 1.0]], dtype=np.float32)
    pred_fake = np.array([[-2.0, 0.0], [0.5, -0.5]], dtype=np.float32)
    # mean(max(0, 1 - real)) = (0 + 0.5 + 2 + 0) / 4; mean(max(0, 1 + fake)) = (0 + 1 + 1.5 + 0.5) / 4
    assert float(gan.discriminator_hinge_loss(pred_real, pred_fake)) == pytest.approx(2.5 / 4 + 3.0 / 4)
    assert float(gan.generator_hinge_loss(pred_fake)) == pytest.approx(0.5)


def test_sizes_at_256_px_and_tanh_range():
    discriminator = gan.build_discriminator(256, width_divisor=64)
    assert discriminator.output_shape == (None, 30, 30, 1)
    generator = gan.build_generator(256, width_divisor=64)
    assert generator.get_layer("fc").output.shape[1] == 16
    masks = np.eye(classes.NUM_CLASSES, dtype=np.float32)[
        np.random.default_rng(0).integers(0, 7, (1, 256, 256))
    ]
    images = np.asarray(generator(masks * 50.0))
    assert images.shape == (1, 256, 256, 3) and np.abs(images).max() <= 1.0
    assert gan.to_uint8(np.array([-1.0, 0.0, 0.999, 1.0, 3.0])).tolist() == [0, 127, 254, 255, 255]


def test_models_saved_as_keras_files_reload_with_equal_outputs(tmp_path):
    # The registered SPADE layers (and their get_config) let a saved generator load in Keras's safe
    # mode, without this script's code being passed in: the reloaded model gives the same images.
    generator = gan.build_generator(32, width_divisor=32)
    discriminator = gan.build_discriminator(32, width_divisor=32)
    generator.save(tmp_path / "g.keras")
    discriminator.save(tmp_path / "d.keras")
    reloaded_generator = keras.saving.load_model(tmp_path / "g.keras")
    reloaded_discriminator = keras.saving.load_model(tmp_path / "d.keras")
    assert isinstance(reloaded_generator.get_layer("up_0"), gan.SPADEResnetBlock)
    assert reloaded_generator.get_layer("up_0").get_config()["fout"] == 16
    rng = np.random.default_rng(3)
    masks = np.eye(classes.NUM_CLASSES, dtype=np.float32)[rng.integers(0, classes.NUM_CLASSES, (2, 32, 32))]
    np.testing.assert_array_equal(np.asarray(reloaded_generator(masks)), np.asarray(generator(masks)))
    pairs = rng.normal(size=(2, 32, 32, classes.NUM_CLASSES + 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(reloaded_discriminator(pairs)), np.asarray(discriminator(pairs)))


# ---- the script: training, generation, resume ----


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return demo_data.write_demo_patches(tmp_path_factory.mktemp("gan_data"), 32, 6, seed=0)


def train_argv(data_root, results, extra=""):
    """A tiny training run's command line: 32 px, widths / 32, batch 4."""
    tiny = "--image_size 32 --width_divisor 32 --batch_size 4"
    return f"--data_root {data_root} {tiny} --results_dir {results} {extra}"


@pytest.fixture(scope="module")
def straight_run(data_root, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    argv = train_argv(data_root, results, "--epochs 2 --run_name straight --generate")
    return results / "generative_trainer_unet_spade_gan" / "straight", call_main(gan, argv)


def test_generate_writes_one_png_per_mask_named_as_the_mask(straight_run, data_root):
    _, results = straight_run
    generated = data_root / "train" / "generated"
    masks = sorted(path.name for path in (data_root / "train" / "masks").glob("*.png"))
    assert sorted(path.name for path in generated.glob("*.png")) == masks
    assert all(patches.png_size(generated / name) == (32, 32) for name in masks)
    assert results["generated"]["images"] == len(masks) and not results["perceptual_term"]


def test_tensorboard_holds_the_epoch_log(straight_run):
    run_dir, _ = straight_run
    scalars = assert_tensorboard_holds_log(run_dir)
    assert sorted(scalars) == ["loss_D", "loss_G_adv", "loss_G_vgg", "seconds"]
    assert sorted(scalars["loss_D"]) == [1, 2]


def test_resume_continues_exactly(data_root, tmp_path):
    # In-process with one model, so the training step is traced once: epoch 2 run straight on from
    # epoch 1 must equal epoch 2 run again after restoring epoch 1's checkpoint (weights, Adam state).
    argv = train_argv(data_root, tmp_path, "--epochs 2 --no_tensorboard")
    args = gan.get_args_parser().parse_args(argv.split())
    pairs = patches.list_split(data_root, "train", 32)
    model = gan.SpadeGAN(args, tf.distribute.get_strategy())
    state = {"epochs_done": 0, "history": []}
    args.epochs = 1
    gan.train(model, args, pairs, tmp_path, state)
    after_first = checkpoints.load(tmp_path)
    args.epochs = 2
    gan.train(model, args, pairs, tmp_path, state)
    straight = model.arrays()
    resumed_state, arrays = after_first
    model.restore(arrays, "checkpoint")
    assert resumed_state["epochs_done"] == 1
    gan.train(model, args, pairs, tmp_path, resumed_state)
    resumed = model.arrays()

    def losses(history):
        return [{key: value for key, value in row.items() if key != "seconds"} for row in history]

    assert resumed.keys() == straight.keys() and losses(resumed_state["history"]) == losses(state["history"])
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    assert not (tmp_path / "tensorboard").exists()


def test_resume_refuses_changed_settings(straight_run, data_root, capsys):
    run_dir, _ = straight_run
    argv = train_argv(data_root, run_dir.parents[1], "--run_name straight --resume --batch_size 2")
    assert_main_error(capsys, lambda: call_main(gan, argv), "batch_size=4 (now 2)")
    assert not (run_dir / "checkpoint_epoch003.npz").exists()


def test_help_names_the_paper_flags():
    text = gan.get_args_parser().format_help()
    for flag in ("--vgg_weights", "--generate", "--strategy", "--demo", "--width_divisor"):
        assert flag in text
