"""Our training and evaluation steps against the PyTorch code a user would otherwise run.

Same model, loss, optimizer, batch, input size and thread count on each side, measured by
`bench.measure` (contenders in one process, alternating rounds, wall and CPU time, load average, 1
thread and all cores, each in a child process):

1. SPML (train_multilabel_model.py): ResNet-50 at 224 px, batch 16, AN loss, Adam. Ours is the
   script's own model builder (`build_classifier`, fused batch-norm kernel) trained by its
   `SpmlTrainer`'s compiled step and evaluated by `common.spml.evaluation.predict_probabilities`. The
   peers are a ResNet-50 written here with torch only (no CPU torchvision exists for this torch
   build): torchvision's v1.5 layout (stride in the 3x3 conv, as timm's `resnet50`), the v1 layout
   of Keras (stride in the first 1x1 conv, the same FLOPs as ours), v1 in `channels_last` memory
   format, and v1 `channels_last` under `torch.compile` (`--torch_compile`); timm's `resnet50`
   (NCHW and `channels_last`) when timm imports.
2. LUCAS (train_lucas_classifier.py): the identity and MLP heads on cached TerraMind-base-sized
   tokens `(N, 196, 768)`, weighted CE, AdamW, batch 8: ours is the script's head compiled as the
   script compiles it (its optimizer, two metrics, `steps_per_execution=16`, no XLA) and trained by
   `fit` on the script's token dataset; the peer a torch loop over the same tokens.

Each model's FLOPs per image (TensorFlow's profiler on our graph at batch 1) and the achieved GFLOP/s
per core-second are printed next to a float32 2048 x 2048 matmul's, measured in the same process.
The last line prints the ratios ours / peer (> 1: ours is faster).

    python -m bench.peer_speed                       # about 15 minutes on a 2-core CPU
    python -m bench.peer_speed --skip_spml --rounds 5
    python -m bench.peer_speed --threads 1 --spml_steps 1 --spml_batch 2 --image_size 64 --lucas_chips 16
"""

import argparse
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
from bench import measure
from common import cli, optimizers, runs
from common.spml import evaluation, single_positives


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    measure.add_arguments(parser, rounds=3)
    parser.add_argument("--spml_steps", type=int, default=2, help="Training steps (batches) per round.")
    parser.add_argument("--spml_batch", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=17, help="AID multi-label has 17 classes.")
    parser.add_argument("--lucas_chips", type=int, default=480, help="Cached token sets per LUCAS epoch.")
    parser.add_argument("--lucas_dim", type=int, default=768, help="Token width (TerraMind-v1-base: 768).")
    parser.add_argument(
        "--torch_compile",
        type=cli.str2bool,
        default=False,
        help="Add the torch.compile peer (off by default: compiling the ResNet-50 training step did not "
        "finish within 10 minutes on a loaded 2-core CPU; its first-pass time is printed).",
    )
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


# ---- SPML: ResNet-50 train step and evaluation ----


def torch_peers(options):
    """{name: (module called, module trained, optimizer, memory format)} of the torch contenders."""
    specs = [
        ("torch v1.5", True, torch.contiguous_format, False),
        ("torch v1", False, torch.contiguous_format, False),
        ("torch v1 channels_last", False, torch.channels_last, False),
    ]
    if not options.torch_compile:
        print(
            "torch.compile peer skipped: it compiled for over 10 minutes on a 2-core CPU "
            "(--torch_compile true adds it)"
        )
    else:
        specs.append(("torch v1 channels_last compile", False, torch.channels_last, True))
    peers = {}
    for name, stride_in_3x3, memory_format, compiled in specs:
        torch.manual_seed(0)
        model = TorchResNet50(options.classes, stride_in_3x3).to(memory_format=memory_format)
        called = torch.compile(model) if compiled else model
        peers[name] = (called, model, torch.optim.Adam(model.parameters(), lr=1e-4), memory_format)
    try:
        import timm
    except ImportError:
        print("timm is not installed here: no timm resnet50 row")
    else:
        for name, memory_format in (
            ("timm resnet50", torch.contiguous_format),
            ("timm cl", torch.channels_last),
        ):
            torch.manual_seed(0)
            model = timm.create_model("resnet50", num_classes=options.classes).to(memory_format=memory_format)
            peers[name] = (model, model, torch.optim.Adam(model.parameters(), lr=1e-4), memory_format)
    return peers


def spml_data(options):
    batch, size, classes = options.spml_batch, options.image_size, options.classes
    count = batch * options.spml_steps
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (count, size, size, 3)).astype(np.float32)
    full = (rng.random((count, classes)) < 0.2).astype(np.float32)
    full[np.arange(count), rng.integers(classes, size=count)] = 1.0
    return images, full, single_positives.single_positive_random(full, 0)


def spml_comparison(options, threads):
    batch, size, classes = options.spml_batch, options.image_size, options.classes
    images, full, observed = spml_data(options)
    count = len(images)
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
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    torch_observed = torch.from_numpy(observed.astype(np.float32))
    peers = torch_peers(options)

    def torch_train(called, model, optimizer, memory_format):
        model.train()
        for start in range(0, count, batch):
            x = ((nchw[start : start + batch] - 127.0) / 60.0).contiguous(memory_format=memory_format)
            # AN: every unobserved label is a negative, binary cross-entropy averaged over the batch.
            loss = nn.functional.binary_cross_entropy_with_logits(
                called(x), torch_observed[start : start + batch]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def torch_eval(called, model, optimizer, memory_format):
        model.eval()
        with torch.no_grad():
            outputs = [
                torch.sigmoid(
                    called(((nchw[s : s + batch] - 127.0) / 60.0).contiguous(memory_format=memory_format))
                )
                for s in range(0, count, batch)
            ]
        return torch.cat(outputs).numpy()

    for name, peer in peers.items():  # first passes (compilation where compiled), apart from the rounds
        started = time.perf_counter()
        torch_train(*peer)
        torch_eval(*peer)
        print(f"  {name}: first train + eval pass {time.perf_counter() - started:.1f} s")
    epoch = iter(range(1, 10**6))
    train = {"ours": lambda: trainer.train_epoch(train_data, "warmup", next(epoch))}
    train.update({name: (lambda peer=peer: torch_train(*peer)) for name, peer in peers.items()})
    print(f"SPML: {count} images of {size} px per round, batch {batch}, {threads} threads")
    rows = measure.rows_for("SPML train", measure.alternate(train, options.rounds), count, threads)
    evaluate = {"ours": lambda: evaluation.predict_probabilities(trainer.student, eval_data)}
    evaluate.update({name: (lambda peer=peer: torch_eval(*peer)) for name, peer in peers.items()})
    rows += measure.rows_for("SPML eval", measure.alternate(evaluate, options.rounds), count, threads)
    flops = {
        "SPML train": measure.model_flops(trainer.student, (size, size, 3), True),
        "SPML eval": measure.model_flops(trainer.student, (size, size, 3), False),
    }
    return rows, flops


# ---- LUCAS: heads on cached tokens, compiled as the script compiles them ----


def lucas_comparison(options, threads):
    count, dim = options.lucas_chips, options.lucas_dim
    script_args = lucas_script.get_args_parser().parse_args([])
    batch, num_classes = script_args.batch_size, len(lucas_script.CLASS_NAMES)
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(count, 196, dim)).astype(np.float32)
    labels = rng.integers(num_classes, size=count).astype(np.int32)
    weights = lucas_script.class_weights_from_counts(labels, num_classes)
    inputs = SimpleNamespace(
        labels=labels, splits={"train": np.arange(count), "val": np.arange(batch)}, image_size=None
    )
    data = lucas_script.training_data(script_args, inputs, tokens, seed=0)
    torch_tokens, torch_labels = torch.from_numpy(tokens), torch.from_numpy(labels.astype(np.int64))
    rows, flops = [], {}
    print(f"LUCAS heads: {count} token sets (196, {dim}) per epoch, batch {batch}, {threads} threads")
    for decoder in ("identity", "mlp"):
        runs.seed_everything(0)
        head = lucas_script.build_head((196, dim), num_classes, decoder, None, 0.1)
        # As train_and_evaluate compiles a head on tokens: the script's optimizer and metrics, 16 steps
        # per call, no XLA.
        head.compile(
            optimizer=optimizers.make_optimizer(
                "adamw", script_args.learning_rate, convention="torch", weight_decay=script_args.weight_decay
            ),
            loss=lucas_script.make_loss("wce", weights, script_args),
            metrics=[
                keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                lucas_script.MacroAccuracy(num_classes),
            ],
            steps_per_execution=16,
            jit_compile=False,
        )
        torch.manual_seed(0)
        peer = TorchHead(dim, num_classes, decoder)
        optimizer = torch.optim.AdamW(peer.parameters(), lr=1e-4, weight_decay=script_args.weight_decay)
        criterion = nn.CrossEntropyLoss(weight=torch.from_numpy(np.asarray(weights, np.float32)))

        def torch_epoch(peer=peer, optimizer=optimizer, criterion=criterion):
            peer.train()
            for start in torch.randperm(count).split(batch):
                loss = criterion(peer(torch_tokens[start]), torch_labels[start])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        contenders = {
            "ours": lambda head=head: head.fit(data.train, epochs=1, verbose=0),
            "torch": torch_epoch,
        }
        task = f"LUCAS {decoder} head"
        rows += measure.rows_for(
            task, measure.alternate(contenders, options.rounds), count, threads, "token sets"
        )
        flops[task] = measure.model_flops(head, (196, dim), True)
    return rows, flops


def measure_rows(options, threads):
    rows, flops = [], {}
    for skip, comparison in ((options.skip_lucas, lucas_comparison), (options.skip_spml, spml_comparison)):
        if not skip:
            more_rows, more_flops = comparison(options, threads)
            rows, flops = rows + more_rows, {**flops, **more_flops}
    measure.print_fraction_of_peak(rows, flops)
    return rows


def main(options):
    return measure.run(options, measure_rows, "bench.peer_speed")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
