"""ARAS400k demo data: seeded synthetic inputs in the real formats, for every script's --demo and the tests.

`write_demo_tiles`: Sentinel-2 RGBNIR and WorldCover map GeoTIFFs in the release's names and
formats (`dataset_creator.py --demo`, and the files `dataset_downloader.py --demo` serves);
`write_demo_patches`: image/mask PNG pairs in the segmentation layout (`segmentation_train.py`,
`segformer_vis.py` and the captioners' demos).
"""

import json
from pathlib import Path

import cv2
import numpy as np

from common import atomic
from common.aras400k import classes
from common.errors import require

# ---- demo patches in the segmentation layout ----

# Demo appearance of each class (mean RGB); shapes of each class are drawn on a background class.
DEMO_COLOURS = np.array(
    [
        (40, 90, 40),
        (150, 120, 110),
        (120, 170, 70),
        (200, 180, 90),
        (120, 100, 90),
        (190, 185, 175),
        (30, 60, 140),
    ],
    dtype=np.float32,
)


def _demo_patch(rng, rows, cols):
    """One synthetic (image, labels) pair: 2-4 rectangles or ellipses of random classes on a background."""
    image_size = rows.shape[0]
    labels = np.full((image_size, image_size), rng.integers(classes.NUM_CLASSES), dtype=np.uint8)
    for _ in range(rng.integers(2, 5)):
        centre = rng.uniform(0, image_size, 2)
        radii = rng.uniform(image_size / 8, image_size / 3, 2)
        if rng.random() < 0.5:
            inside = (np.abs(rows - centre[0]) < radii[0]) & (np.abs(cols - centre[1]) < radii[1])
        else:
            inside = ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 < 1
        labels[inside] = rng.integers(classes.NUM_CLASSES)
    image = DEMO_COLOURS[labels] + rng.normal(0, 18, (image_size, image_size, 3))
    return np.clip(cv2.GaussianBlur(image, (3, 3), 0), 0, 255).astype(np.uint8), labels


def write_demo_patches(root, image_size, train_images, seed):
    """Write a seeded synthetic dataset in the real layout: shapes of known classes on a background.

    Each class has its own mean colour plus texture noise, so a model can learn it; masks use the
    ARAS400k palette. Re-used when it already exists with the same parameters.
    """
    root = Path(root)
    recipe = {"image_size": image_size, "train_images": train_images, "seed": seed, "version": 1}
    if (root / "demo.json").exists() and json.loads((root / "demo.json").read_text()) == recipe:
        return root
    rng = np.random.default_rng(seed)
    counts = {"train": train_images, "val": max(4, train_images // 3), "test": max(4, train_images // 3)}
    rows, cols = np.mgrid[0:image_size, 0:image_size]
    for split, count in counts.items():
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for stale in (root / split / folder).glob("*.png"):
                stale.unlink()
        for index in range(count):
            image, labels = _demo_patch(rng, rows, cols)
            name = f"demo_{split}_{index:04d}.png"
            cv2.imwrite(str(root / split / "images" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            mask = cv2.cvtColor(classes.labels_to_colours(labels), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(root / split / "masks" / name), mask)
    atomic.write_json(root / "demo.json", recipe)
    return root


# ---- demo tiles in the release's formats ----

# Typical Sentinel-2 digital numbers (B, G, R, NIR) of each WorldCover code, for the synthetic demo tiles.
DEMO_BAND_MEANS = {
    0: (900, 900, 900, 1500),
    10: (300, 500, 250, 2800),
    20: (700, 800, 500, 2200),
    30: (800, 1000, 600, 2600),
    40: (1100, 1100, 800, 3000),
    50: (1600, 1500, 1400, 1800),
    60: (2200, 2000, 1800, 2400),
    70: (3500, 3600, 3700, 3400),
    80: (200, 400, 600, 150),
    90: (500, 700, 500, 1500),
    95: (250, 450, 300, 2000),
    100: (1200, 1300, 1000, 1900),
}


def write_demo_tiles(folder, size, seed) -> tuple[Path, Path]:
    """Two S2 RGBNIR tiles and the two WorldCover map tiles they straddle, in the release's formats.

    Tile N36E027 is on the maps' EPSG:4326 grid, shifted so its middle patch column straddles the
    N36E027 / N36E030 map boundary at 30 E; it holds a lake (a >90 % water patch), a map no-data block
    and an S2 no-data corner. Tile N36E030 is a UTM 35N scene across the same boundary, with a no-data
    corner. Land cover is a seeded Voronoi field using every WorldCover code (wetland, mangrove,
    moss, snow included), and the S2 reflectances follow each pixel's label plus noise.
    """
    import rasterio
    from rasterio.warp import transform as transform_points

    from common.raster import write_geotiff

    require(size % 4 == 0 and size >= 256, "--demo_size", f"got {size}", "a multiple of 4, at least 256")
    rng = np.random.default_rng(seed)
    s2_dir, map_dir = Path(folder) / "S2RGB_2021", Path(folder) / "worldcover_2021"
    res = 3.0 / (2 * size)  # map and aligned-S2 pixel size in degrees
    centres = np.column_stack([rng.uniform(29.2, 30.9, 44), rng.uniform(36.0, 38.7, 44)])  # both S2 tiles
    codes = rng.permutation(np.resize(np.array(classes.WORLDCOVER_CODES[1:]), 44))  # each code 4 times
    maps = {}
    for tile, lon0 in (("N36E027", 27.0), ("N36E030", 30.0)):
        lon = lon0 + (np.arange(2 * size) + 0.5) * res
        lat = 39.0 - (np.arange(2 * size) + 0.5) * res
        field = np.empty((2 * size, 2 * size), dtype=np.uint8)
        for r in range(2 * size):  # nearest Voronoi centre, one row at a time to bound memory
            distance = (lon[:, None] - centres[:, 0]) ** 2 + ((lat[r] - centres[:, 1]) * 1.25) ** 2
            field[r] = codes[distance.argmin(axis=1)]
        maps[tile] = (field, rasterio.Affine(res, 0, lon0, 0, -res, 39.0))
    a_transform = rasterio.Affine(res, 0, 30.0 - 384 * res, 0, -res, 39.0 - size / 4 * res)
    last = size // 256 - 1

    def paint(row0, col0, rows, cols, code):  # a block in tile N36E027's pixels, painted on the maps
        x0, y0 = a_transform @ (col0, row0)
        x1, y1 = a_transform @ (col0 + cols, row0 + rows)
        for field, transform in maps.values():
            lon = transform.c + (np.arange(field.shape[1]) + 0.5) * res
            lat = transform.f - (np.arange(field.shape[0]) + 0.5) * res
            field[np.ix_((lat < y0) & (lat > y1), (lon > x0) & (lon < x1))] = code

    paint(-10, -10, 276, 276, classes.WATER_CODE)  # lake over patch (0, 0) with a small island
    paint(100, 100, 12, 12, 30)
    paint(40, last * 256 + 60, 8, 8, 0)  # map no-data in patch (0, last)
    for tile, (field, transform) in maps.items():
        write_geotiff(
            map_dir / f"ESA_WorldCover_10m_2021_v200_{tile}_Map.tif",
            field,
            transform=transform,
            crs="EPSG:4326",
            nodata=0,
        )

    reflectance = np.zeros((256, 4), dtype=np.float32)
    for code, mean in DEMO_BAND_MEANS.items():
        reflectance[code] = mean
    utm_centre = transform_points("EPSG:4326", "EPSG:32635", [30.15], [36.55])
    pixel_m = 115200.0 / size
    b_transform = rasterio.Affine(
        pixel_m, 0, utm_centre[0][0] - size / 2 * pixel_m, 0, -pixel_m, utm_centre[1][0] + size / 2 * pixel_m
    )
    for tile, crs, transform in (
        ("N36E027", "EPSG:4326", a_transform),
        ("N36E030", "EPSG:32635", b_transform),
    ):
        cols, rows = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
        xs, ys = transform @ (cols.ravel(), rows.ravel())
        lon, lat = (np.asarray(v) for v in transform_points(crs, "EPSG:4326", xs, ys))
        labels = np.zeros(lon.size, dtype=np.uint8)
        for field, map_transform in maps.values():
            map_cols = np.floor((lon - map_transform.c) / res).astype(int)
            map_rows = np.floor((map_transform.f - lat) / res).astype(int)
            inside = (
                (map_cols >= 0) & (map_cols < field.shape[1]) & (map_rows >= 0) & (map_rows < field.shape[0])
            )
            labels[inside] = field[map_rows[inside], map_cols[inside]]
        pixels = reflectance[labels].T.reshape(4, size, size) + rng.normal(0, 120, (4, size, size))
        pixels = np.clip(pixels, 1, 10000).astype(np.uint16)
        corner = np.add.outer(np.arange(size), -np.arange(size)) > size - 80  # bottom-left triangle
        if tile == "N36E030":
            corner = np.add.outer(np.arange(size), np.arange(size)) > 2 * size - 80  # bottom-right
        pixels[:, corner] = 0
        write_geotiff(
            s2_dir / f"ESA_WorldCover_10m_2021_v200_{tile}_S2RGBNIR.tif",
            pixels,
            transform=transform,
            crs=crs,
            tile_size=256,
        )
    return s2_dir, map_dir
