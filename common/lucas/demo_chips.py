"""Seeded synthetic LUCAS-like chips and their labels CSV, in the study's class proportions, for demos.

Written in the layout of `lucas_chips` (`<root>/<STR18>/<Point_ID>.tif` 6-band float32 reflectance
GeoTIFFs plus `chips_LC_class.csv`), so a demo runs the same reader as real chips.
"""

from pathlib import Path

import numpy as np

from common import atomic
from common.lucas import lucas_chips
from common.raster import write_geotiff

# A rough reflectance signature per class in [B4, B3, B2, B8, B11, B12]; neighbours overlap on purpose.
CLASS_SPECTRA = np.array(
    [
        [0.08, 0.09, 0.06, 0.30, 0.25, 0.15],  # Arable lands
        [0.07, 0.08, 0.05, 0.27, 0.22, 0.13],  # Permanent crops
        [0.06, 0.08, 0.05, 0.32, 0.24, 0.12],  # Grass
        [0.03, 0.05, 0.03, 0.30, 0.15, 0.07],  # Wooded areas
        [0.05, 0.07, 0.04, 0.24, 0.20, 0.11],  # Shrubs
        [0.15, 0.14, 0.12, 0.22, 0.30, 0.25],  # Bare/low vegetation
        [0.12, 0.11, 0.10, 0.18, 0.20, 0.18],  # Artificial
        [0.03, 0.04, 0.05, 0.02, 0.01, 0.01],  # Inland water
        [0.04, 0.06, 0.07, 0.04, 0.02, 0.01],  # Transitional/coastal water
        [0.30, 0.30, 0.32, 0.35, 0.28, 0.24],  # Not interpretable
    ],
    np.float32,
)


def write_demo_chips(root, scale: float, chip_size: int = 32, seed: int = 0) -> Path:
    """Write seeded synthetic LUCAS-like chips and their labels CSV under `root` (kept if present).

    Each class has a rough reflectance signature (`CLASS_SPECTRA`); every chip mixes in another class
    and gets texture and noise, in the study's class counts x `scale` (at least 5 chips per class;
    from scale 0.25 up the floor never binds, so the imbalance is LUCAS's, 704 : 20).

    Args:
        root: the chips folder to write (or keep).
        scale: chips per class = the study's counts x this, at least 5.
        chip_size: chip height and width in pixels.
        seed: the generator's seed.

    Returns:
        `root` as a Path.
    """
    root = Path(root)
    chips_per_class = [max(5, round(count * scale)) for count in lucas_chips.STUDY_CHIP_COUNTS]
    labels_csv = root / lucas_chips.LABELS_CSV_NAME
    if labels_csv.is_file():
        # Kept only when written with this scale; other counts (another --demo_scale) are rewritten.
        written = np.bincount(lucas_chips.read_labels(labels_csv)[1], minlength=len(lucas_chips.CLASS_NAMES))
        if written.tolist() == chips_per_class:
            return root
    rng = np.random.default_rng(seed)
    rows, point_id = [], 100000
    yy, xx = np.mgrid[0:chip_size, 0:chip_size] / chip_size
    bands = len(lucas_chips.BAND_NAMES)
    for class_index, count in enumerate(chips_per_class):
        for _ in range(count):
            # Land-cover mixing: each chip is partly another class, which makes minorities hard.
            other = rng.integers(len(CLASS_SPECTRA))
            mixing = rng.uniform(0.0, 0.5)
            spectrum = (1 - mixing) * CLASS_SPECTRA[class_index] + mixing * CLASS_SPECTRA[other]
            phase, frequency = rng.uniform(0, 2 * np.pi), rng.uniform(2, 8)
            texture = 0.15 * np.sin(2 * np.pi * frequency * (xx + (class_index % 3) * yy) + phase)
            noise = rng.normal(0, 0.25, (bands, chip_size, chip_size))
            chip = spectrum[:, None, None] * (1 + texture[None] + noise)
            point_id += 1
            write_geotiff(root / str(class_index + 1) / f"{point_id}.tif", chip.astype(np.float32))
            rows.append({"Point_ID": point_id, "STR18": class_index + 1})
    atomic.write_csv(labels_csv, rows, ["Point_ID", "STR18"])
    return root
