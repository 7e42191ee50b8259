"""ARAS400k classes: the 7 land-cover classes, the WorldCover code remap, the mask palette, colour <-> label.

Caglar & Temizel, "Grounding Synthetic Data Generation With Vision and Language Models" (arXiv
2603.09625), label Sentinel-2 patches with ESA WorldCover 2021 codes remapped to 7 classes (the
reference dataset creator: 90 Wetland and 100 Moss/lichen -> 30 Grassland, 95 Mangrove -> 10 Tree,
70 Snow/ice -> 60 Bare/sparse) and store masks as RGB images in a fixed palette. `dataset_creator.py`
writes masks with `CODE_TO_BGR` (one table look-up a patch); the training scripts and the captioners'
percentage tables read them back by exact colour (`colours_to_labels`, `decode_mask_tf` in tf.data),
so a colour outside the palette is never silently class 0 as in the reference.
"""

import numpy as np

# ---- classes, remap and palette ----

CLASS_NAMES = ["Tree", "Shrubland", "Grassland", "Cropland", "Built-up", "Bare/sparse", "Water"]
# Column and key names of the classes in manifest.csv and report.json.
CLASS_KEYS = ("tree", "shrubland", "grassland", "cropland", "built_up", "bare_sparse", "water")
NUM_CLASSES = len(CLASS_NAMES)
# RGB mask colour per class index (the reference dataset creator's palette).
PALETTE = np.array(
    [
        (0, 100, 0),
        (255, 182, 193),
        (154, 205, 50),
        (255, 215, 0),
        (139, 69, 19),
        (211, 211, 211),
        (0, 0, 255),
    ],
    dtype=np.uint8,
)
# Label of pixels whose colour is not in the palette (segmentation_train.py --unknown_colour ignore).
IGNORE_INDEX = 255

# WorldCover 2021 codes (0 = no data) and the reference code's remap to the paper's 7 classes.
WORLDCOVER_CODES = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
REMAP = {90: 30, 100: 30, 95: 10, 70: 60}  # Wetland, Moss/lichen -> Grassland; Mangrove -> Tree; Snow -> Bare
REMAP_NAMES = {
    90: "90 Wetland -> 30 Grassland",
    100: "100 Moss/lichen -> 30 Grassland",
    95: "95 Mangrove -> 10 Tree",
    70: "70 Snow/ice -> 60 Bare/sparse",
}
CLASS_CODES = (10, 20, 30, 40, 50, 60, 80)  # the WorldCover code of each class index after the remap
WATER_CODE = 80
# CODE_TO_CLASS's entry for code 0 (no data) and for any code outside WORLDCOVER_CODES.
NODATA_CLASS, UNKNOWN_CLASS = 254, 255
CODE_TO_CLASS = np.full(256, UNKNOWN_CLASS, dtype=np.uint8)
CODE_TO_CLASS[0] = NODATA_CLASS
for _code in WORLDCOVER_CODES[1:]:
    CODE_TO_CLASS[_code] = CLASS_CODES.index(REMAP.get(_code, _code))
UNKNOWN_CODES = np.flatnonzero(CODE_TO_CLASS == UNKNOWN_CLASS)
# Mask colours looked up straight from the codes, in OpenCV's BGR order (one table look-up a patch).
CODE_TO_BGR = np.zeros((256, 1, 3), dtype=np.uint8)
for _code in WORLDCOVER_CODES[1:]:
    CODE_TO_BGR[_code, 0] = PALETTE[CODE_TO_CLASS[_code]][::-1]


# ---- colour <-> label ----

PALETTE_CODES = (PALETTE[:, 0].astype(np.int64) << 16) | (PALETTE[:, 1].astype(np.int64) << 8) | PALETTE[:, 2]


def colours_to_labels(mask_rgb) -> np.ndarray:
    """Map an `(H, W, 3)` RGB mask to class indices by exact colour; unknown colours -> IGNORE_INDEX."""
    mask_rgb = np.asarray(mask_rgb, dtype=np.int64)
    codes = (mask_rgb[..., 0] << 16) | (mask_rgb[..., 1] << 8) | mask_rgb[..., 2]
    order = np.argsort(PALETTE_CODES)
    position = np.clip(np.searchsorted(PALETTE_CODES[order], codes), 0, NUM_CLASSES - 1)
    known = PALETTE_CODES[order][position] == codes
    return np.where(known, order[position], IGNORE_INDEX).astype(np.uint8)


def labels_to_colours(labels) -> np.ndarray:
    """Colour-code class indices with the palette (IGNORE_INDEX -> black)."""
    labels = np.asarray(labels)
    colours = np.zeros((*labels.shape, 3), dtype=np.uint8)
    known = labels < NUM_CLASSES
    colours[known] = PALETTE[labels[known]]
    return colours


def decode_mask_tf(mask_rgb):
    """tf.data twin of `colours_to_labels` (same exact-colour rule, unknown -> IGNORE_INDEX)."""
    import tensorflow as tf

    mask_rgb = tf.cast(mask_rgb, tf.int32)
    codes = mask_rgb[..., 0] * 65536 + mask_rgb[..., 1] * 256 + mask_rgb[..., 2]
    matches = tf.equal(codes[..., None], tf.constant(PALETTE_CODES, dtype=tf.int32))
    labels = tf.where(
        tf.reduce_any(matches, axis=-1), tf.argmax(matches, axis=-1, output_type=tf.int32), IGNORE_INDEX
    )
    return tf.cast(labels, tf.uint8)
