"""Speed of segmentation_train.py's training and metrics, each against a peer in the same process.

1. Training throughput (images/s) of SegFormer on EfficientNet-B0 at 256 px, batch 8, Dice loss,
   AdamW: ours is the script's model (`build_segformer`) compiled as the script compiles it and fed by
   its tf.data pipeline (PNG decode, exact colour decoding, paired augmentation, prefetch), also fed
   from in-memory arrays (`ours in-memory`: the pipeline's cost is the ratio of the two). The peer
   is the same network in plain PyTorch written here (EfficientNet-B0 encoder with MBConv and
   squeeze-excitation, smp's SegFormer all-MLP decoder on its 5 stages, Dice loss, AdamW) fed from
   in-memory tensors, NCHW and `channels_last` (segmentation_models_pytorch and torchvision are not
   installed here; with smp the peer would be `smp.Segformer("efficientnet-b0")`).
2. Streaming metrics: ConfusionMatrix.update over label batches, then the metrics, against sklearn
   (precision_recall_fscore_support + jaccard_score + accuracy_score) on the flattened pixels.

Measured by `bench.measure` (alternating rounds, wall and CPU time, load; 1 thread and all cores);
the FLOPs of our training step per image are printed next to a float32 matmul's GFLOP/s. The last
line is the ratios ours / peer (> 1: ours is faster).

    python -m bench.segmentation_speed                  # about 10 minutes on 2 cores
    python -m bench.segmentation_speed --threads 1 --image_size 64 --images 4 --batch_size 2 --steps 1
"""

import argparse
import tempfile
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

import segmentation_train as st
from bench import measure
from common.aras400k import classes, demo_data, patches
from common.metrics import ConfusionMatrix


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    measure.add_arguments(parser, rounds=3)
    parser.add_argument("--images", type=int, default=32, help="Training patches written as PNG pairs.")
    parser.add_argument("--image_size", type=int, default=256, help="Patch side (256 in the paper).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="Training steps per round.")
    parser.add_argument(
        "--metric_batches",
        type=int,
        default=16,
        help="Label batches (batch_size x image_size^2 pixels each) for the metrics bench.",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


# ---- the PyTorch peer: EfficientNet-B0 + SegFormer decoder ----

# EfficientNet-B0 stages: (expansion, kernel, stride, output channels, repeats).
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3))
B0_STAGES += ((6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


def make_torch_segformer(num_classes, decoder_width=256):
    import torch
    from torch import nn

    class MBConv(nn.Module):
        def __init__(self, inputs, outputs, expand, kernel, stride):
            super().__init__()
            hidden = inputs * expand
            expansion = [nn.Conv2d(inputs, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU()]
            self.expand_depthwise = nn.Sequential(
                *(expansion if expand != 1 else []),
                nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden),
                nn.SiLU(),
            )
            squeeze = max(1, inputs // 4)
            self.excite = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(hidden, squeeze, 1),
                nn.SiLU(),
                nn.Conv2d(squeeze, hidden, 1),
                nn.Sigmoid(),
            )
            self.project = nn.Sequential(nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs))
            self.residual = stride == 1 and inputs == outputs

        def forward(self, x):
            hidden = self.expand_depthwise(x)
            out = self.project(hidden * self.excite(hidden))
            return x + out if self.residual else out

    class SegFormerB0(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU())
            self.stages, inputs, widths = nn.ModuleList(), 32, [32]
            for expand, kernel, stride, outputs, repeats in B0_STAGES:
                blocks = [
                    MBConv(inputs if i == 0 else outputs, outputs, expand, kernel, stride if i == 0 else 1)
                    for i in range(repeats)
                ]
                self.stages.append(nn.Sequential(*blocks))
                inputs = outputs
            # smp's features: the stem, then the last block before each further downsampling.
            self.taps, widths = (1, 2, 4, 6), [32, 24, 40, 112, 320]
            self.linear = nn.ModuleList(nn.Conv2d(width, decoder_width, 1) for width in widths)
            self.fuse = nn.Sequential(
                nn.Conv2d(5 * decoder_width, decoder_width, 1, bias=False),
                nn.BatchNorm2d(decoder_width),
                nn.ReLU(),
            )
            self.classifier = nn.Conv2d(decoder_width, num_classes, 1)

        def forward(self, x):
            features = [self.stem(x)]
            out = features[0]
            for index, stage in enumerate(self.stages):
                out = stage(out)
                if index in self.taps:
                    features.append(out)
            size = features[1].shape[2:]
            projected = []
            for stride, linear, feature in zip((2, 4, 8, 16, 32), self.linear, features, strict=True):
                y = linear(feature)
                if stride == 2:
                    y = nn.functional.avg_pool2d(y, 2)
                elif stride > 4:
                    y = nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)
                projected.append(y)
            logits = self.classifier(self.fuse(torch.cat(projected[::-1], 1)))
            return nn.functional.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)

    return SegFormerB0()


def torch_dice_loss(logits, labels, num_classes, ignore_index):
    """smp DiceLoss(mode="multiclass", from_logits=True): 1 - soft Dice per class over the batch, classes
    absent from the batch's labels masked out."""
    import torch

    valid = (labels != ignore_index).unsqueeze(1).float()
    probabilities = logits.softmax(1) * valid
    one_hot = torch.nn.functional.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2)
    one_hot = one_hot.float() * valid
    intersection = (probabilities * one_hot).sum((0, 2, 3))
    cardinality = (probabilities + one_hot).sum((0, 2, 3))
    dice = 2 * intersection / cardinality.clamp_min(1e-7)
    present = (one_hot.sum((0, 2, 3)) > 0).float()
    return ((1 - dice) * present).mean()


def metrics_rows(args, threads):
    from sklearn.metrics import accuracy_score, jaccard_score, precision_recall_fscore_support

    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size, args.image_size, args.image_size)
    batches = [
        (
            rng.integers(0, classes.NUM_CLASSES, shape, dtype=np.uint8),
            rng.integers(0, classes.NUM_CLASSES, shape, dtype=np.uint8),
        )
        for _ in range(args.metric_batches)
    ]
    pixels = args.metric_batches * int(np.prod(shape))
    found = {}

    def streaming():
        confusion = ConfusionMatrix(classes.NUM_CLASSES, ignore_index=classes.IGNORE_INDEX)
        for truth, predicted in batches:
            confusion.update(truth, predicted)
        found["ours"] = confusion.metrics(classes.CLASS_NAMES)["macro_f1"]

    def sklearn():
        truth = np.concatenate([t.ravel() for t, _ in batches])
        predicted = np.concatenate([p.ravel() for _, p in batches])
        _, _, f1, _ = precision_recall_fscore_support(truth, predicted, average="macro", zero_division=0)
        jaccard_score(truth, predicted, average="macro")
        accuracy_score(truth, predicted)
        found["sklearn"] = f1

    samples = measure.alternate({"ours": streaming, "sklearn": sklearn}, args.rounds)
    if abs(found["ours"] - found["sklearn"]) > 1e-9:
        raise ValueError(f"macro F1 differs: ours {found['ours']}, sklearn {found['sklearn']}")
    return measure.rows_for("metrics", samples, pixels / 1e6, threads, "Mpixels")


def our_model(args):
    script = st.get_args_parser().parse_args([])
    model = st.build_segformer("efficientnetb0", args.image_size)
    # As segmentation_train.py compiles it: torch-convention AdamW, global clipnorm, Dice, no XLA on CPUs.
    st.compile_as_trained(model, script, st.MulticlassDiceLoss())
    return model, script


def torch_contenders(args, images, masks, script):
    """{name: one round of `args.steps` training steps} of the torch peer, NCHW and channels_last."""
    import torch

    torch_images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    torch_masks = torch.from_numpy(masks.astype(np.int64))
    contenders = {}
    for name, memory_format in (
        ("torch", torch.contiguous_format),
        ("torch channels_last", torch.channels_last),
    ):
        torch.manual_seed(args.seed)
        model = make_torch_segformer(classes.NUM_CLASSES).to(memory_format=memory_format)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=script.learning_rate, weight_decay=script.weight_decay, eps=script.epsilon
        )

        def steps(model=model, optimizer=optimizer, memory_format=memory_format):
            model.train()
            for step in range(args.steps):
                start = (step * args.batch_size) % len(torch_images)
                x = torch_images[start : start + args.batch_size].contiguous(memory_format=memory_format)
                loss = torch_dice_loss(
                    model(x),
                    torch_masks[start : start + args.batch_size],
                    classes.NUM_CLASSES,
                    classes.IGNORE_INDEX,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), script.clipnorm)
                optimizer.step()

        contenders[name] = steps
    return contenders


def training_rows(args, threads):
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as folder:
        root = demo_data.write_demo_patches(Path(folder) / "data", args.image_size, args.images, args.seed)
        pairs = patches.list_split(root, "train", args.image_size)
        model, script = our_model(args)
        # Each round's fit starts a new pass over the pipeline; it spans enough epochs for a round.
        epochs_needed = 1 + -(-args.steps * args.batch_size // len(pairs))
        pipeline = patches.train_batches(
            pairs, args.image_size, args.batch_size, args.seed, 0, epochs_needed, st.augment_pair
        )
        images, masks = [], []
        for image, mask in patches.eval_batches(pairs, args.image_size, args.batch_size).unbatch():
            images.append(image.numpy())
            masks.append(mask.numpy())
        images, masks = np.stack(images), np.stack(masks)
        in_memory = tf.data.Dataset.from_tensor_slices((images, masks)).repeat().batch(args.batch_size)
        contenders = {
            "ours": lambda: model.fit(pipeline, steps_per_epoch=args.steps, verbose=0),
            "ours in-memory": lambda: model.fit(in_memory, steps_per_epoch=args.steps, verbose=0),
        }
        contenders.update(torch_contenders(args, images, masks, script))
        print(
            f"SegFormer efficientnetb0 training, {args.image_size} px, batch {args.batch_size}, "
            f"{args.steps} steps per round, {threads} threads"
        )
        samples = measure.alternate(contenders, args.rounds)
    task = "SegFormer-B0 train"
    flops = measure.model_flops(model, (args.image_size, args.image_size, 3), True)
    return measure.rows_for(task, samples, args.steps * args.batch_size, threads), {task: flops}


def measure_rows(args, threads):
    rows, flops = training_rows(args, threads)
    rows += metrics_rows(args, threads)
    measure.print_fraction_of_peak(rows, flops)
    return rows


def main(args):
    return measure.run(args, measure_rows, "bench.segmentation_speed")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
