"""Speed of generative_trainer_unet_spade_gan.py's training step (one D then one G update) against the
same architecture and step in PyTorch (the reference's framework) on the same CPU.

Both sides: 64 px masks and images, the demo's widths (the paper's divided by 16), Adam 2e-4
(0.5, 0.999), hinge losses; `--vgg` adds the VGG19 relu3_3 L1 term with random weights on both.
Rounds alternate between the two and the medians are compared; the last line is the ratio
ours / torch (below 1.0: ours is faster).

    python -m bench.spade_gan_speed                 # about a minute on a laptop CPU
    python -m bench.spade_gan_speed --vgg --jit_compile true
"""

import argparse
import statistics
import time

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import keras
import numpy as np
import tensorflow as tf
import torch
import torch.nn.functional as F
from torch import nn

import generative_trainer_unet_spade_gan as gan
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
        loss_g = -net_d(torch.cat([masks, fake], 1)).mean()
        if vgg is not None:
            loss_g = loss_g + F.l1_loss(vgg(real), vgg(fake)) * 10.0
        loss_g.backward()
        opt_g.step()
        return loss_d.detach().item()

    return step


def make_keras_step(args, use_vgg):
    parsed = gan.get_args_parser().parse_args(
        [
            "--image_size",
            str(args.image_size),
            "--width_divisor",
            "16",
            "--jit_compile",
            str(args.jit_compile),
        ]
    )
    model = gan.SpadeGAN(parsed, tf.distribute.get_strategy())
    if use_vgg:  # the step reads model.vgg when it is first traced, below
        shape = (args.image_size, args.image_size, 3)
        vgg = keras.applications.VGG19(include_top=False, weights=None, input_shape=shape)
        model.vgg = keras.Model(vgg.input, vgg.get_layer("block3_conv3").output)
    return lambda real, masks: float(model.train_step(real, masks)[0])


def median_seconds(step, inputs, steps):
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step(*inputs)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(args):
    threads = tf.config.threading.get_intra_op_parallelism_threads() or torch.get_num_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    size, batch = args.image_size, args.batch_size
    labels = rng.integers(0, LABELS, (batch, size // 8, size // 8)).repeat(8, 1).repeat(8, 2)
    masks = np.eye(LABELS, dtype=np.float32)[labels]
    real = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    keras_inputs = (tf.constant(real), tf.constant(masks))
    torch_inputs = (
        torch.from_numpy(real).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(masks).permute(0, 3, 1, 2).contiguous(),
    )
    ours, theirs = make_keras_step(args, args.vgg), make_torch_step(size, 16, args.vgg)
    ours(*keras_inputs), theirs(*torch_inputs)  # tracing and warm-up
    rounds = {"ours": [], "torch": []}
    for _ in range(args.rounds):
        rounds["ours"].append(median_seconds(ours, keras_inputs, args.steps))
        rounds["torch"].append(median_seconds(theirs, torch_inputs, args.steps))
    ours_s, torch_s = statistics.median(rounds["ours"]), statistics.median(rounds["torch"])
    what = "D + G step" + (" + VGG19 relu3_3 term" if args.vgg else "")
    print(f"{what}, {size} px, batch {batch}, widths / 16, {threads} threads, jit_compile {args.jit_compile}")
    print(f"ours (Keras 3 / TF): {1000 * ours_s:.1f} ms per step (median of {args.rounds} rounds)")
    print(f"torch {torch.__version__}: {1000 * torch_s:.1f} ms per step")
    print(f"ratio ours/torch: {ours_s / torch_s:.2f}")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16, help="The demo's batch size.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per round.")
    parser.add_argument("--rounds", type=int, default=5, help="Alternating rounds per side.")
    parser.add_argument(
        "--vgg", action="store_true", help="Add the VGG19 term (random weights on both sides)."
    )
    parser.add_argument("--jit_compile", type=cli.str2bool, default=False)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
