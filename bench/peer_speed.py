"""Our training and evaluation steps against the plain PyTorch code a user would otherwise run.

Same model, loss, optimizer, batch, input size and thread count on each side, alternating rounds in
one process, medians of the per-round times:

1. SPML (train_multilabel_model.py): ResNet-50 at 224 px, batch 16, AN loss, Adam. Ours is the
   script's own model builder (`build_classifier`, fused batch-norm kernel) trained by its
   `SpmlTrainer`'s compiled step and evaluated by `common.spml.evaluation.predict_probabilities`. The
   peer is a ResNet-50 written here with torch only (no CPU torchvision exists for this torch build), in
   torchvision's v1.5 layout (stride in the 3x3 conv of each bottleneck) and, for the same FLOPs as
   Keras's v1 layout, in the v1 layout (stride in the first 1x1 conv).
2. LUCAS (train_lucas_classifier.py): the identity and MLP heads on cached TerraMind-base-sized tokens
   `(N, 196, 768)`, weighted CE, AdamW, batch 8: ours is the script's head trained by `fit` on the
   script's token dataset, the peer a torch loop over the same tokens.

The last lines print speed ratios ours / torch (> 1 means ours is faster).

    python -m bench.peer_speed                       # about 10 minutes on a 2-core CPU
    python -m bench.peer_speed --skip_spml --rounds 5
"""

import argparse
import statistics
import time
from types import SimpleNamespace

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import keras
import numpy as np
import tensorflow as tf
import torch
from torch import nn

import train_lucas_classifier as lucas_script
import train_multilabel_model as spml_script
from common import runs
from common.spml import evaluation, single_positives


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="Intra-op threads for both frameworks.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating timed rounds per comparison.")
    parser.add_argument("--spml_steps", type=int, default=4, help="Training steps (batches) per round.")
    parser.add_argument("--spml_batch", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=17, help="AID multi-label has 17 classes.")
    parser.add_argument("--lucas_chips", type=int, default=480, help="Cached token sets per LUCAS epoch.")
    parser.add_argument("--lucas_dim", type=int, default=768, help="Token width (TerraMind-v1-base: 768).")
    parser.add_argument("--skip_spml", action="store_true")
    parser.add_argument("--skip_lucas", action="store_true")
    return parser


# ---- the PyTorch peers ----


class Bottleneck(nn.Module):
    """ResNet bottleneck; `stride_in_3x3` selects torchvision's v1.5 layout, else the original v1."""

    def __init__(self, inputs, width, stride, stride_in_3x3):
        super().__init__()
        outputs = width * 4
        self.conv1 = nn.Conv2d(inputs, width, 1, 1 if stride_in_3x3 else stride, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride if stride_in_3x3 else 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, outputs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class TorchResNet50(nn.Module):
    def __init__(self, num_classes, stride_in_3x3=True):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, inputs = [], 64
        for width, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for index in range(count):
                blocks.append(Bottleneck(inputs, width, stride if index == 0 else 1, stride_in_3x3))
                inputs = width * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(inputs, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class TorchHead(nn.Module):
    """build_head of train_lucas_classifier.py: per-token [Linear ReLU] -> Dropout -> Linear, token mean."""

    def __init__(self, dim, num_classes, decoder, dropout=0.1):
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) if decoder == "mlp" else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        return self.classifier(self.dropout(self.decoder(tokens))).mean(dim=1)


def seconds(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def alternate(rounds, contenders):
    """Median seconds of each contender over `rounds` alternating rounds (after one untimed warm-up)."""
    for run in contenders.values():
        run()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            times[name].append(seconds(run))
    return {name: statistics.median(values) for name, values in times.items()}


# ---- SPML: ResNet-50 train step and evaluation ----


def spml_comparison(options):
    batch, size, classes = options.spml_batch, options.image_size, options.classes
    count = batch * options.spml_steps
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (count, size, size, 3)).astype(np.float32)
    full = (rng.random((count, classes)) < 0.2).astype(np.float32)
    full[np.arange(count), rng.integers(classes, size=count)] = 1.0
    observed = single_positives.single_positive_random(full, 0)
    runs.seed_everything(0)
    settings = SimpleNamespace(method="an", learning_rate=1e-4, seed=0, delta_rel=0.0)

    def build_model():
        mean, variance = np.full(3, 127.0, np.float32), np.full(3, 60.0**2, np.float32)
        return spml_script.build_classifier("resnet50", (size, size, 3), classes, mean, variance)

    trainer = spml_script.SpmlTrainer(
        settings, tf.distribute.get_strategy(), build_model, keras.optimizers.Adam, observed, full
    )
    indices = np.arange(count, dtype=np.int32)
    train_data = tf.data.Dataset.from_tensor_slices((images, indices)).batch(batch)
    eval_data = train_data.cache()

    torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    torch_observed = torch.from_numpy(observed.astype(np.float32))
    torch_mean, torch_std = 127.0, 60.0
    peers = {}
    for name, stride_in_3x3 in (("torch v1.5", True), ("torch v1", False)):
        torch.manual_seed(0)
        model = TorchResNet50(classes, stride_in_3x3)
        peers[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-4))

    def torch_train(model, optimizer):
        model.train()
        for start in range(0, count, batch):
            x = (torch_images[start : start + batch] - torch_mean) / torch_std
            logits = model(x)
            # AN: every unobserved label is a negative, binary cross-entropy averaged over the batch.
            loss = nn.functional.binary_cross_entropy_with_logits(
                logits, torch_observed[start : start + batch]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def torch_eval(model):
        model.eval()
        with torch.inference_mode():
            outputs = [
                torch.sigmoid(model((torch_images[s : s + batch] - torch_mean) / torch_std))
                for s in range(0, count, batch)
            ]
        return torch.cat(outputs).numpy()

    epoch = iter(range(1, 10**6))
    train = {"ours": lambda: trainer.train_epoch(train_data, "warmup", next(epoch))}
    train.update({name: (lambda peer=peer: torch_train(*peer)) for name, peer in peers.items()})
    print(f"SPML: {count} images of {size} px per round, batch {batch}, {options.threads} threads")
    train_times = alternate(options.rounds, train)
    evaluate = {"ours": lambda: evaluation.predict_probabilities(trainer.student, eval_data)}
    evaluate.update({name: (lambda peer=peer: torch_eval(peer[0])) for name, peer in peers.items()})
    eval_times = alternate(options.rounds, evaluate)
    rows = []
    for task, times in (("SPML train", train_times), ("SPML eval", eval_times)):
        for name, value in times.items():
            print(f"  {task:12s} {name:11s} {count / value:7.2f} img/s")
        rows += [(task, peer, times[peer] / times["ours"]) for peer in peers]
    return rows


# ---- LUCAS: heads on cached tokens ----


def lucas_comparison(options):
    count, dim, batch = options.lucas_chips, options.lucas_dim, 8
    num_classes = len(lucas_script.CLASS_NAMES)
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(count, 196, dim)).astype(np.float32)
    labels = rng.integers(num_classes, size=count).astype(np.int32)
    weights = lucas_script.class_weights_from_counts(labels, num_classes)
    args = SimpleNamespace(batch_size=batch, focal_weighting="alpha", focal_gamma=2.0, focal_form="smp")
    inputs = SimpleNamespace(
        labels=labels, splits={"train": np.arange(count), "val": np.arange(batch)}, image_size=None
    )
    data = lucas_script.training_data(args, inputs, tokens, seed=0)
    torch_tokens, torch_labels = torch.from_numpy(tokens), torch.from_numpy(labels.astype(np.int64))
    rows = []
    print(f"LUCAS heads: {count} token sets (196, {dim}) per epoch, batch {batch}, {options.threads} threads")
    for decoder in ("identity", "mlp"):
        runs.seed_everything(0)
        head = lucas_script.build_head((196, dim), num_classes, decoder, None, 0.1)
        head.compile(
            optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.05),
            loss=lucas_script.make_loss("wce", weights, args),
        )
        torch.manual_seed(0)
        peer = TorchHead(dim, num_classes, decoder)
        optimizer = torch.optim.AdamW(peer.parameters(), lr=1e-4, weight_decay=0.05)
        criterion = nn.CrossEntropyLoss(weight=torch.from_numpy(np.asarray(weights, np.float32)))

        def torch_epoch(peer=peer, optimizer=optimizer, criterion=criterion):
            peer.train()
            for start in torch.randperm(count).split(batch):
                loss = criterion(peer(torch_tokens[start]), torch_labels[start])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        times = alternate(
            options.rounds,
            {"ours": lambda head=head: head.fit(data.train, epochs=1, verbose=0), "torch": torch_epoch},
        )
        for name, value in times.items():
            print(f"  LUCAS {decoder:8s} {name:6s} {count / value:8.1f} token sets/s")
        rows.append((f"LUCAS {decoder} head", "torch loop", times["torch"] / times["ours"]))
    return rows


def main(options):
    tf.config.threading.set_intra_op_parallelism_threads(options.threads)
    tf.config.threading.set_inter_op_parallelism_threads(options.threads)
    torch.set_num_threads(options.threads)
    rows = []
    if not options.skip_lucas:
        rows += lucas_comparison(options)
    if not options.skip_spml:
        rows += spml_comparison(options)
    print("speed ratios, ours / torch (> 1: ours faster):")
    for task, peer, ratio in rows:
        print(f"  {task:18s} vs {peer:11s} {ratio:5.2f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
