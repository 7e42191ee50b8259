"""ARAS400k class percentages: each mask's share of the 7 classes, one CSV per split (the captioners' input).

`<root>/class_percentages/<split>.csv` holds a row per mask: its file name and each class's share of
the labelled pixels in percent (the reference layout and column names, `COLUMNS`).
`dataset_creator.py` writes it for every split it builds (and with `--percentages` for any folder
of palette masks); the captioners build their prompts from it (`common.aras400k.captions`).
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import atomic
from common.aras400k import classes, patches
from common.errors import InputError, require, require_dir

COLUMNS = ["filename", *classes.CLASS_NAMES]


def csv_path(data_root, split) -> Path:
    """A split's class-percentage table: `<root>/class_percentages/<split>.csv`, the reference layout."""
    return Path(data_root) / "class_percentages" / f"{split}.csv"


def class_percentages(mask_paths, threads: int = 1) -> list[dict]:
    """One row per mask: its file name and each class's share of the labelled pixels in percent.

    The captioners build their prompts from these rows (column names are `CLASS_NAMES`, as the
    reference captioners print them). Shares are of the pixels with a known class and are rounded to
    2 decimals; an unknown colour is one error line naming the mask.
    """
    mask_paths = [Path(path) for path in mask_paths]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        scans = list(pool.map(patches.scan_mask, mask_paths))
    rows = []
    for path, (counts, first_unknown) in zip(mask_paths, scans, strict=True):
        if first_unknown is not None:
            row, col, colour = first_unknown
            raise InputError(
                path,
                f"has a pixel of colour {colour} at row {row}, col {col}",
                "only ARAS400k palette colours",
            )
        known = counts[: classes.NUM_CLASSES]
        total = max(int(known.sum()), 1)
        shares = {
            name: round(100.0 * int(n) / total, 2) for name, n in zip(classes.CLASS_NAMES, known, strict=True)
        }
        rows.append({"filename": path.name, **shares})
    return rows


def write_class_percentages(mask_dir, out_path, threads: int = 1) -> Path:
    """Write the class-percentage CSV (`COLUMNS`) of every PNG mask in a folder, atomically."""
    mask_dir = require_dir(mask_dir, "a folder of PNG masks")
    masks = sorted(mask_dir.glob("*.png"))
    require(masks, mask_dir, "holds no .png masks", "at least one ARAS400k mask")
    atomic.write_csv(out_path, class_percentages(masks, threads), COLUMNS)
    return Path(out_path)
