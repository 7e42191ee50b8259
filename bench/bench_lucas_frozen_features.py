"""Frozen-probe training: backbone run every epoch (the study's toolkit) vs features cached once (ours).

Both train the same identity head with weighted CE on the same demo chips for the same epochs; the
baseline streams chips through the frozen backbone each epoch, ours extracts the backbone tokens once
and trains the head on them (train_lucas_classifier.py's frozen path). Each round is a whole run
(model built, trained `--epochs` epochs) of each side, alternating, measured by `bench.measure`
(wall and CPU time, load; 1 thread and all cores). The last line is the speed-up baseline / ours.

    python -m bench.bench_lucas_frozen_features --backbone resnet50 --epochs 10
    python -m bench.bench_lucas_frozen_features --epochs 1 --demo_scale 0.02 --threads 1 --rounds 1
"""

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import keras
import numpy as np
import tensorflow as tf

import train_lucas_classifier as classifier
from bench import measure
from common import pipelines, runs
from common.lucas import demo_chips, lucas_chips


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--demo_scale", type=float, default=0.12)
    measure.add_arguments(parser, rounds=1)
    return parser


def measure_rows(options, threads):
    runs.seed_everything(0)
    root = demo_chips.write_demo_chips(Path(tempfile.mkdtemp()) / "chips", options.demo_scale)
    point_ids, labels = lucas_chips.read_labels(root / lucas_chips.LABELS_CSV_NAME)
    paths, sizes = lucas_chips.locate_chips(root, root / lucas_chips.LABELS_CSV_NAME, point_ids, labels)
    image_size = next(iter(sizes))[0]
    reader = lucas_chips.ChipReader(paths)
    splits = classifier.stratified_split(labels, 0.2, 0.0, 42)
    with reader.surface():
        mean, variance = pipelines.band_statistics(
            reader.dataset(splits["train"], image_size, 32).as_numpy_iterator()
        )
    inputs = SimpleNamespace(image_size=image_size, band_mean=mean, band_variance=variance)
    num_classes = len(lucas_chips.CLASS_NAMES)
    weights = classifier.class_weights_from_counts(labels[splits["train"]], num_classes)
    args = argparse.Namespace(
        backbone=options.backbone,
        weights=None,
        freeze_backbone=True,
        focal_weighting="alpha",
        focal_gamma=2.0,
    )
    print(f"{len(labels)} chips of {image_size} px, backbone {options.backbone}, {options.epochs} epochs")

    def compiled(model, steps_per_execution=1):
        model.compile(
            optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.05),
            loss=classifier.make_loss("wce", weights, args),
            steps_per_execution=steps_per_execution,
        )
        return model

    def baseline():
        """Chips -> frozen backbone -> head, every epoch."""
        extractor = classifier.build_feature_extractor(args, inputs)
        head = classifier.build_head(extractor.output.shape[1:], num_classes, "identity", None, 0.1)
        model = compiled(keras.Model(extractor.input, head(extractor.output)))
        train = reader.dataset(splits["train"], image_size, options.batch_size, labels, shuffle_seed=0)
        val = reader.dataset(splits["val"], image_size, options.batch_size, labels)
        model.fit(train, validation_data=val, epochs=options.epochs, shuffle=False, verbose=0)

    def ours():
        """Chips -> frozen backbone once; the head on the cached tokens."""
        extractor = classifier.build_feature_extractor(args, inputs)
        tokens = extractor.predict(reader.dataset(np.arange(len(labels)), image_size, 32), verbose=0)
        head = compiled(classifier.build_head(tokens.shape[1:], num_classes, "identity", None, 0.1), 16)

        def cached(indices, shuffle):
            data = tf.data.Dataset.from_tensor_slices((tokens[indices], labels[indices]))
            return (data.shuffle(len(indices), seed=0) if shuffle else data).batch(options.batch_size)

        head.fit(
            cached(splits["train"], True),
            validation_data=cached(splits["val"], False),
            epochs=options.epochs,
            shuffle=False,
            verbose=0,
        )

    samples = measure.alternate({"ours": ours, "baseline": baseline}, options.rounds, warmup=0)
    return measure.rows_for("LUCAS frozen probe", samples, options.epochs, threads, "epochs")


def main(options):
    return measure.run(options, measure_rows, "bench.bench_lucas_frozen_features")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
