"""Speed of generative_trainer_unet_spade_gan.py's training step (one D then one G update) against the
same architecture and step in PyTorch (the reference's framework) on the same CPU.

Both sides: Adam 2e-4 (0.5, 0.999), hinge losses, `--vgg` adds the VGG19 relu3_3 L1 term with random
weights on both. Two sizes (`--sizes`): `paper`, the paper's widths at 256 px with the reference's
batch of 50 (`--paper_batch`), and `demo`, the demo's widths (the paper's / 16) at 64 px, batch 16,
where per-op dispatch rather than arithmetic dominates. The torch G step freezes D's weights
(`requires_grad_(False)`), as is standard practice, so it computes no D weight gradients. Measured
by `bench.measure` (alternating rounds, wall and CPU time, load; 1 thread and all cores); the FLOPs
of our step per image are printed next to a float32 matmul's GFLOP/s. The last line is the ratios
ours / torch (> 1: ours is faster).

    python -m bench.spade_gan_speed                         # tens of minutes on 2 cores (paper size)
    python -m bench.spade_gan_speed --sizes demo
    python -m bench.spade_gan_speed --sizes paper --paper_batch 4 --rounds 2
    python -m bench.spade_gan_speed --sizes demo --vgg --jit_compile true
"""

import argparse

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import keras
import numpy as np
import tensorflow as tf
import torch
import torch.nn.functional as F
from torch import nn

import generative_trainer_unet_spade_gan as gan
from bench import measure
from common import cli

LABELS = gan.NUM_CLASSES


class TorchSPADE(nn.Module):
    def __init__(self, norm_nc, hidden):
        super().__init__()
        self.norm = nn.InstanceNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(LABELS, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

    def forward(self, x, segmap):
        actv = self.mlp_shared(F.interpolate(segmap, size=x.size()[2:], mode="nearest"))
        return self.norm(x) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class TorchBlock(nn.Module):
    def __init__(self, fin, fout, hidden):
        super().__init__()
        self.conv_0, self.conv_1 = nn.Conv2d(fin, fout, 3, padding=1), nn.Conv2d(fout, fout, 3, padding=1)
        self.norm_0, self.norm_1 = TorchSPADE(fin, hidden), TorchSPADE(fout, hidden)
        self.norm_s, self.conv_s = TorchSPADE(fin, hidden), nn.Conv2d(fin, fout, 1, bias=False)

    def forward(self, x, seg):
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        return self.conv_s(self.norm_s(x, seg)) + self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))


class TorchGenerator(nn.Module):
    def __init__(self, widths, hidden, start):
        super().__init__()
        self.start, self.fc = start, nn.Conv2d(LABELS, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(TorchBlock(widths[i], widths[i + 1], hidden) for i in range(4))
        self.conv_img = nn.Conv2d(widths[4], 3, 3, padding=1)

    def forward(self, seg):
        x = self.fc(F.interpolate(seg, size=(self.start, self.start)))
        for block in self.blocks:
            x = F.interpolate(block(x, seg), scale_factor=2)
        return torch.tanh(self.conv_img(x))


def torch_discriminator(widths):
    def block(in_f, out_f, stride=2):
        return [
            nn.Conv2d(in_f, out_f, 4, stride=stride, padding=1),
            nn.InstanceNorm2d(out_f),
            nn.LeakyReLU(0.2),
        ]

    return nn.Sequential(
        *block(LABELS + 3, widths[0]),
        *block(widths[0], widths[1]),
        *block(widths[1], widths[2]),
        *block(widths[2], widths[3], stride=1),
        nn.Conv2d(widths[3], 1, 4, padding=1),
    )


def torch_vgg19_relu3_3():
    layers, channels = [], 3
    for width, count in ((64, 2), (128, 2), (256, 3)):
        for _ in range(count):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
        if width != 256:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers).eval().requires_grad_(False)


def make_torch_step(image_size, divisor, use_vgg):
    """The reference's step, verbatim in structure: D on (real, fake.detach()), then G."""
    net_g = TorchGenerator(
        [w // divisor for w in (1024, 512, 256, 128, 64)], 128 // divisor, image_size // 16
    )
    net_d = torch_discriminator([w // divisor for w in (64, 128, 256, 512)])
    vgg = torch_vgg19_relu3_3() if use_vgg else None
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def step(real, masks):
        opt_d.zero_grad()
        fake = net_g(masks)
        pred_real, pred_fake = net_d(torch.cat([masks, real], 1)), net_d(torch.cat([masks, fake.detach()], 1))
        loss_d = F.relu(1 - pred_real).mean() + F.relu(1 + pred_fake).mean()
        loss_d.backward()
        opt_d.step()
        opt_g.zero_grad()
        net_d.requires_grad_(False)  # G's step computes no gradients for D's weights
        loss_g = -net_d(torch.cat([masks, fake], 1)).mean()
        if vgg is not None:
            loss_g = loss_g + F.l1_loss(vgg(real), vgg(fake)) * 10.0
        loss_g.backward()
        opt_g.step()
        net_d.requires_grad_(True)
        return loss_d.detach().item()

    return step


SIZES = {"paper": (256, 1), "demo": (64, 16)}  # image size, width divisor


def make_keras_model(image_size, divisor, jit_compile, use_vgg):
    argv = [
        "--image_size",
        str(image_size),
        "--width_divisor",
        str(divisor),
        "--jit_compile",
        str(jit_compile),
    ]
    model = gan.SpadeGAN(gan.get_args_parser().parse_args(argv), tf.distribute.get_strategy())
    if use_vgg:  # the step reads model.vgg when it is first traced, below
        shape = (image_size, image_size, 3)
        vgg = keras.applications.VGG19(include_top=False, weights=None, input_shape=shape)
        model.vgg = keras.Model(vgg.input, vgg.get_layer("block3_conv3").output)
    return model


def step_flops(model, image_size):
    """FLOPs of our D + G step for one image (TF's profiler on the step traced at batch 1)."""
    specs = [
        tf.TensorSpec((1, image_size, image_size, 3), tf.float32),
        tf.TensorSpec((1, image_size, image_size, LABELS), tf.float32),
    ]
    return measure.graph_flops(tf.function(model.replica_step), *specs)


def size_rows(options, threads, name):
    size, divisor = SIZES[name]
    batch = options.paper_batch if name == "paper" else options.demo_batch
    rng = np.random.default_rng(0)
    labels = rng.integers(0, LABELS, (batch, size // 8, size // 8)).repeat(8, 1).repeat(8, 2)
    masks = np.eye(LABELS, dtype=np.float32)[labels]
    real = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    keras_inputs = (tf.constant(real), tf.constant(masks))
    torch_inputs = (
        torch.from_numpy(real).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(masks).permute(0, 3, 1, 2).contiguous(),
    )
    model = make_keras_model(size, divisor, options.jit_compile, options.vgg)
    theirs = make_torch_step(size, divisor, options.vgg)

    def ours_steps():
        for _ in range(options.steps):
            float(model.train_step(*keras_inputs)[0])

    def torch_steps():
        for _ in range(options.steps):
            theirs(*torch_inputs)

    what = "D + G step" + (" + VGG19 relu3_3 term" if options.vgg else "")
    task = f"GAN {name} {size}px/{divisor}"
    print(
        f"{task}: {what}, batch {batch}, {options.steps} steps per round, jit_compile {options.jit_compile}"
    )
    samples = measure.alternate({"ours": ours_steps, "torch": torch_steps}, options.rounds)
    return measure.rows_for(task, samples, batch * options.steps, threads), {task: step_flops(model, size)}


def measure_rows(options, threads):
    rows, flops = [], {}
    for name in options.sizes.split(","):
        more_rows, more_flops = size_rows(options, threads, name)
        rows, flops = rows + more_rows, {**flops, **more_flops}
    measure.print_fraction_of_peak(rows, flops)
    return rows


def main(options):
    return measure.run(options, measure_rows, "bench.spade_gan_speed")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    measure.add_arguments(parser, rounds=3)
    parser.add_argument(
        "--sizes", default="paper,demo", help="Comma-separated: paper (256 px), demo (64 px)."
    )
    parser.add_argument("--paper_batch", type=int, default=50, help="The reference's batch size at 256 px.")
    parser.add_argument("--demo_batch", type=int, default=16, help="The demo's batch size.")
    parser.add_argument("--steps", type=int, default=1, help="Timed steps per round.")
    parser.add_argument(
        "--vgg", action="store_true", help="Add the VGG19 term (random weights on both sides)."
    )
    parser.add_argument("--jit_compile", type=cli.str2bool, default=False)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
