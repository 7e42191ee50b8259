"""Input-pipeline speed of train_multilabel_model.py: its tf.data readers vs a plain Python loop.

Generates an AID-multilabel tree (600 px JPEGs, the real size) and a reBEN-layout LMDB (safetensors dicts
of all twelve Sentinel-2 bands, as rico-hdl writes them) in a temporary folder, then times, on the same
records, in alternating rounds (medians):
  - plain loop: one record after another (cv2.imread + resize; LMDB get + `band_records.decode_value`,
    the per-record reference decoder: safetensors load, ConfigILM nearest resampling, stacking),
  - tf.data: the script's pipelines exactly as training builds them (AID: parallel per-image decode;
    LMDB: one `numpy_function` per batch, `band_records.decode_records` on zero-copy LMDB buffers, one
    reader thread per core up to 4), and the LMDB pipeline with a single reader thread, whose ratio to
    the default shows how the reader scales with the cores.

Measured by `bench.measure` (wall and CPU time, load; 1 thread and all cores, each in a child
process). The last line is the ratios ours (tf.data) / peer (> 1: ours is faster); its values depend
on the CPU, its cores and its load.

    python -m bench.multilabel_input_speed                 # about a minute on a laptop CPU
    python -m bench.multilabel_input_speed --aid_images 600 --ben_patches 3000
"""

import argparse
import os
import tempfile
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

import train_multilabel_model as tm
from bench import measure
from common import pipelines
from common.spml import aid_multilabel, band_records, batches, bigearthnet


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aid_images", type=int, default=240, help="Generated 600 px AID-like JPEGs.")
    parser.add_argument(
        "--ben_patches", type=int, default=1500, help="Generated BigEarthNet-like LMDB records."
    )
    parser.add_argument("--image_size", type=int, default=224, help="AID model input size.")
    parser.add_argument("--bands", default="B04,B03,B02,B08,B05,B11", help="Bands read from the LMDB.")
    parser.add_argument("--batch_size", type=int, default=64, help="tf.data batch size.")
    measure.add_arguments(parser, rounds=3)
    parser.add_argument("--workdir", default=None, help="Folder for the generated data (default: temporary).")
    return parser


def plain_aid(paths, image_size):
    import cv2

    for path in paths:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        np.asarray(
            cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA), np.float32
        ) / 255.0


def plain_lmdb(lmdb_path, patch_ids, bands, image_size):
    # The same read-only environment as the pipeline (LMDB allows one per process); one read transaction.
    with bigearthnet.open_lmdb(lmdb_path).begin(buffers=False) as transaction:
        for patch_id in patch_ids:
            band_records.decode_value(transaction.get(patch_id.encode()), bands, image_size)


def drain(dataset):
    for _ in dataset:
        pass


def measure_rows(args, threads):
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="multilabel_bench_"))
    print(f"data in {workdir} | {os.cpu_count()} CPU cores")
    aid_root = aid_multilabel.write_demo(workdir / "aid", args.aid_images, seed=0, image_size=600)
    ben_root = bigearthnet.write_demo(workdir / "ben", args.ben_patches, seed=0)
    aid_paths = sorted(str(p) for p in aid_root.glob("images_*/*/*.jpg"))
    import pandas as pd

    patch_ids = list(pd.read_parquet(ben_root / "metadata.parquet")["patch_id"].astype(str))
    bands = args.bands.split(",")
    lmdb_path = str(ben_root / "lmdb")
    errors = pipelines.ReaderErrors()
    aid_loader = tm.make_loader({"reader": "aid"}, args.image_size, errors)
    aid_pipeline = batches.make_dataset(aid_paths, aid_loader, args.batch_size)
    ben_data = {"reader": "benv2", "lmdb_path": lmdb_path, "bands": bands}
    ben_loader = tm.make_loader(ben_data, 120, errors)
    ben_pipeline = batches.make_dataset(patch_ids, ben_loader, args.batch_size)
    ben_one_thread = batches.make_dataset(patch_ids, ben_loader, args.batch_size, reader_threads=1)

    aid = measure.alternate(
        {"ours": lambda: drain(aid_pipeline), "plain loop": lambda: plain_aid(aid_paths, args.image_size)},
        args.rounds,
    )
    ben = measure.alternate(
        {
            "ours": lambda: drain(ben_pipeline),
            "plain loop": lambda: plain_lmdb(lmdb_path, patch_ids, bands, 120),
            "ours 1 reader thread": lambda: drain(ben_one_thread),
        },
        args.rounds,
    )
    return measure.rows_for("AID input", aid, len(aid_paths), threads) + measure.rows_for(
        "LMDB input", ben, len(patch_ids), threads
    )


def main(args):
    return measure.run(args, measure_rows, "bench.multilabel_input_speed")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
