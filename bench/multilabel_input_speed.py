"""Input-pipeline speed of train_multilabel_model.py: tf.data readers vs a plain sequential Python reader.

Generates an AID-multilabel tree (600 px JPEGs, the real size) and a reBEN-layout LMDB (safetensors dicts
of all twelve Sentinel-2 bands) in a temporary folder, then times, on the same files:
  - baseline: a sequential Python loop (cv2.imread + resize; lmdb get + safetensors decode + resize),
  - ours: the script's tf.data pipelines (parallel decode, prefetch) exactly as training uses them.
Both sides are warmed once (file cache) and timed as the best of --repeats passes.

    python -m bench.multilabel_input_speed                 # about a minute on a laptop CPU
    python -m bench.multilabel_input_speed --aid_images 600 --ben_patches 3000

The last line is `speedup (tf.data / sequential): AID <x> | LMDB <y>`.
"""

import argparse
import tempfile
import time
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

import train_multilabel_model as tm
from common import aid_multilabel, bigearthnet, pipelines, spml


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aid_images", type=int, default=240, help="Generated 600 px AID-like JPEGs.")
    parser.add_argument(
        "--ben_patches", type=int, default=1500, help="Generated BigEarthNet-like LMDB records."
    )
    parser.add_argument("--image_size", type=int, default=224, help="AID model input size.")
    parser.add_argument("--bands", default="B04,B03,B02,B08,B05,B11", help="Bands read from the LMDB.")
    parser.add_argument("--batch_size", type=int, default=64, help="tf.data batch size.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed passes per reader (best is kept).")
    parser.add_argument("--workdir", default=None, help="Folder for the generated data (default: temporary).")
    return parser


def best_rate(function, count, repeats):
    function()  # warm the file cache and any lazy initialisation
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return count / best, best


def sequential_aid(paths, image_size):
    import cv2

    for path in paths:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        np.asarray(
            cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA), np.float32
        ) / 255.0


def sequential_lmdb(lmdb_path, patch_ids, bands, image_size):
    # The same read-only environment as the pipeline (LMDB allows one per process); one read transaction.
    with bigearthnet.open_lmdb(lmdb_path).begin(buffers=False) as transaction:
        for patch_id in patch_ids:
            bigearthnet.decode_value(transaction.get(patch_id.encode()), bands, image_size)


def drain(dataset):
    for _ in dataset:
        pass


def main(args):
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="multilabel_bench_"))
    print(f"data in {workdir}")
    aid_root = aid_multilabel.write_demo(workdir / "aid", args.aid_images, seed=0, image_size=600)
    ben_root = bigearthnet.write_demo(workdir / "ben", args.ben_patches, seed=0)
    aid_paths = sorted(str(p) for p in aid_root.glob("images_*/*/*.jpg"))
    import pandas as pd

    patch_ids = list(pd.read_parquet(ben_root / "metadata.parquet")["patch_id"].astype(str))
    bands = args.bands.split(",")

    aid_data = {"reader": "aid"}
    ben_data = {"reader": "benv2", "lmdb_path": str(ben_root / "lmdb"), "bands": bands}
    errors = pipelines.ReaderErrors()
    aid_loader = tm.make_loader(aid_data, args.image_size, errors)
    aid_pipeline = spml.make_dataset(aid_paths, aid_loader, args.batch_size)
    ben_pipeline = spml.make_dataset(patch_ids, tm.make_loader(ben_data, 120, errors), args.batch_size)

    rows = [
        (
            "AID sequential",
            *best_rate(lambda: sequential_aid(aid_paths, args.image_size), len(aid_paths), args.repeats),
        ),
        ("AID tf.data", *best_rate(lambda: drain(aid_pipeline), len(aid_paths), args.repeats)),
        (
            "LMDB sequential",
            *best_rate(
                lambda: sequential_lmdb(ben_root / "lmdb", patch_ids, bands, 120),
                len(patch_ids),
                args.repeats,
            ),
        ),
        ("LMDB tf.data", *best_rate(lambda: drain(ben_pipeline), len(patch_ids), args.repeats)),
    ]
    for name, rate, seconds in rows:
        print(f"{name:16s} {rate:9.1f} images/s  ({seconds:.2f} s per pass)")
    print(
        f"speedup (tf.data / sequential): AID {rows[1][1] / rows[0][1]:.2f} "
        f"| LMDB {rows[3][1] / rows[2][1]:.2f}"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
