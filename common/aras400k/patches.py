"""ARAS400k patches: the segmentation layout `<root>/{train,val,test}/{images,masks}/*.png` and its tf.data.

The layout `dataset_creator.py` writes, and the one the scripts expect the released archives
(train.zip, val.zip, test.zip, synth.zip) to unpack to: an RGB patch and an RGB mask of the same
name, coloured with the palette of `common.aras400k.classes`. `list_split` lists and checks a
split's pairs from the PNG headers alone; `check_masks` decodes every mask once before training so
that a colour outside the palette stops a run before its first step; `train_batches` and
`eval_batches` are the tf.data pipelines of `segmentation_train.py` and
`generative_trainer_unet_spade_gan.py`, whose order and augmentation are functions of (seed, epoch,
index) only, so a resumed run sees exactly the batches of an uninterrupted one.
"""

import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from common.aras400k import classes
from common.errors import InputError, require, require_dir

SPLITS = ("train", "val", "test")


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG header, without decoding the image.

    A file without the closing IEND chunk (a truncated copy, a download that stopped) is an
    InputError here, before training, rather than a decode error inside tf.data that names no file.
    """
    with open(path, "rb") as file:
        header = file.read(24)
        file.seek(0, 2)
        length = file.tell()
        file.seek(max(0, length - 12))
        tail = file.read(12)
    require(
        len(header) == 24 and header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR",
        path,
        "is not a PNG file",
        "a PNG image",
    )
    require(tail[4:8] == b"IEND", path, "is truncated (no IEND chunk at its end)", "a complete PNG image")
    return struct.unpack(">II", header[16:24])


def list_split(data_root, split, image_size) -> list[tuple[Path, Path]]:
    """Sorted (image, mask) path pairs of one split; every image needs a mask of the same size."""
    image_dir = require_dir(Path(data_root) / split / "images", f"a folder of PNG patches ({split}/images)")
    mask_dir = require_dir(Path(data_root) / split / "masks", f"a folder of PNG masks ({split}/masks)")
    images = {path.name: path for path in image_dir.glob("*.png")}
    masks = {path.name: path for path in mask_dir.glob("*.png")}
    require(images, image_dir, "holds no .png images (empty split)", "at least one patch per split")
    for have, lack, what, folder in ((images, masks, "mask", mask_dir), (masks, images, "image", image_dir)):
        missing = sorted(set(have) - set(lack))
        if missing:
            raise InputError(
                have[missing[0]],
                f"has no {what} ({len(missing)} {'images' if what == 'mask' else 'masks'} lack one)",
                f"a{'n' if what == 'image' else ''} {what} of the same name in {folder}",
            )
    pairs = [(images[name], masks[name]) for name in sorted(images)]
    for image_path, mask_path in pairs:
        image_shape = png_size(image_path)
        require(
            image_shape == (image_size, image_size),
            image_path,
            f"is {image_shape[0]}x{image_shape[1]} pixels",
            f"{image_size}x{image_size} (--image_size)",
        )
        mask_shape = png_size(mask_path)
        require(
            mask_shape == image_shape,
            mask_path,
            f"is {mask_shape[0]}x{mask_shape[1]} pixels",
            f"the size of its image, {image_shape[0]}x{image_shape[1]}",
        )
    return pairs


def scan_mask(mask_path) -> tuple[np.ndarray, tuple | None]:
    """Decode one mask: class pixel counts (index 7 = unknown colour) and the first unknown pixel."""
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 3 or mask.shape[2] not in (3, 4):
        problem = "cannot be decoded" if mask is None else "is not an RGB image"
        raise InputError(mask_path, problem, "an RGB mask coloured with the ARAS400k palette")
    rgb = cv2.cvtColor(mask[..., :3], cv2.COLOR_BGR2RGB)
    labels = classes.colours_to_labels(rgb)
    counts = np.bincount(np.minimum(labels, classes.NUM_CLASSES).ravel(), minlength=classes.NUM_CLASSES + 1)
    first_unknown = None
    if counts[classes.NUM_CLASSES]:
        row, col = (int(v) for v in np.argwhere(labels == classes.IGNORE_INDEX)[0])
        first_unknown = (row, col, tuple(int(v) for v in rgb[row, col]))
    return counts, first_unknown


def check_masks(pairs, unknown_colour: str, threads: int) -> np.ndarray:
    """Decode every mask once before training (so a bad colour never stops a run mid-way).

    Returns class pixel counts with unknown-colour pixels last. Under `unknown_colour="error"` the
    first mask with a colour outside the palette is an InputError naming the colour and its place.
    OpenCV releases the GIL while decoding, so threads are enough here.
    """
    totals = np.zeros(classes.NUM_CLASSES + 1, dtype=np.int64)
    masks = [mask for _, mask in pairs]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for mask_path, (counts, first_unknown) in zip(masks, pool.map(scan_mask, masks), strict=True):
            if first_unknown and unknown_colour == "error":
                row, col, colour = first_unknown
                unknown = counts[classes.NUM_CLASSES]
                raise InputError(
                    mask_path,
                    f"has {unknown} pixels of colour {colour} (first at row {row}, col {col}) "
                    "that is not an ARAS400k class colour",
                    "only the 7 palette colours, or --unknown_colour ignore",
                )
            totals += counts
    return totals


def load_pair(image_path, mask_path, image_size):
    """Read one PNG pair inside tf.data: float32 RGB in [0, 255] and uint8 class indices."""
    import tensorflow as tf

    image = tf.io.decode_png(tf.io.read_file(image_path), channels=3)
    mask = classes.decode_mask_tf(tf.io.decode_png(tf.io.read_file(mask_path), channels=3))
    image = tf.ensure_shape(tf.cast(image, tf.float32), (image_size, image_size, 3))
    return image, tf.ensure_shape(mask, (image_size, image_size))


# ---- tf.data pipelines over the segmentation layout ----


def train_batches(pairs, image_size, batch_size, seed, first_epoch, last_epoch, augment):
    """Shuffled batches for epochs first_epoch..last_epoch-1, each pair passed through `augment`.

    `augment(image, mask, seed)` gets a stateless seed `(seed, epoch * count + index)`.
    Order and augmentation are functions of (seed, epoch, index) only, so a resumed run sees exactly
    the batches an uninterrupted one would.
    """
    import tensorflow as tf

    image_paths = tf.constant([str(image) for image, _ in pairs])
    mask_paths = tf.constant([str(mask) for _, mask in pairs])
    count = len(pairs)

    def load_augmented(index, epoch):
        image, mask = load_pair(tf.gather(image_paths, index), tf.gather(mask_paths, index), image_size)
        return augment(image, mask, tf.stack([tf.constant(seed, tf.int64), epoch * count + index]))

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return (
            tf.data.Dataset.from_tensor_slices(order)
            .map(lambda index: load_augmented(index, epoch), num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
        )

    return tf.data.Dataset.range(first_epoch, last_epoch).flat_map(epoch_batches).prefetch(tf.data.AUTOTUNE)


def eval_batches(pairs, image_size, batch_size):
    """Batches of one split in file order, no augmentation."""
    import tensorflow as tf

    paths = tf.data.Dataset.from_tensor_slices(([str(i) for i, _ in pairs], [str(m) for _, m in pairs]))
    return (
        paths.map(
            lambda image, mask: load_pair(image, mask, image_size),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
