"""ARAS400k data: the 7 classes, the WorldCover code remap, the mask palette and the dataset readers.

Caglar & Temizel, "Grounding Synthetic Data Generation With Vision and Language Models" (arXiv
2603.09625), label Sentinel-2 patches with ESA WorldCover 2021 codes remapped to 7 classes (the
paper's dataset description; README "dataset_creator.py"). This module holds what
`dataset_creator.py` writes and `segmentation_train.py` and `segformer_vis.py` read:

- classes, palette and the WorldCover code remap (`CODE_TO_CLASS`, `CODE_TO_BGR`);
- exact colour <-> label conversion (`colours_to_labels`, `labels_to_colours`, `decode_mask_tf`);
- the WorldCover map mosaic on a Sentinel-2 tile's pixel grid (`LabelMosaic`) and tile pairing
  by bounds over folders searched recursively (`find_tiles`);
- the segmentation layout `<root>/{train,val,test}/{images,masks}/*.png` (`list_split`, `list_training_set`,
  `check_masks`, `load_pair`, `train_batches`, `eval_batches`, `plot_examples`, `write_demo_patches`);
- the class-percentage tables the captioners read (`class_percentages`, `write_class_percentages`);
- the EfficientNet encoder both models share (`build_encoder`, `encoder_pyramid`);
- seeded demo inputs: S2 and WorldCover tiles (`write_demo_tiles`), patches (`write_demo_patches`).
"""

import json
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from common import atomic, fused_bn, plots
from common.errors import InputError, require, require_dir, require_file
from common.raster import open_geotiff, read_window

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

SPLITS = ("train", "val", "test")
TILE_ID = re.compile(r"[NS]\d{2}[EW]\d{3}")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

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


# ---- WorldCover maps on a Sentinel-2 tile's pixel grid ----


def aligned_offset(image, label_map) -> tuple[int, int] | None:
    """(row, col) offset of the image grid inside the map grid when nearest resampling is a pure shift.

    With the same CRS and pixel size, pixel centre c + 0.5 of the image falls in map pixel
    c + round(offset) for every c, so a plain windowed read IS the nearest-neighbour resampling.
    Returns None when the grids differ (another CRS, pixel size or rotation): then we warp.
    """
    a, b = image.transform, label_map.transform
    if image.crs != label_map.crs or a.b or a.d or b.b or b.d:
        return None
    drift = max(abs(a.a / b.a - 1), abs(a.e / b.e - 1)) * max(image.width, image.height)
    col, row = (a.c - b.c) / b.a, (a.f - b.f) / b.e
    if drift > 1e-6 or max(abs(col - round(col)), abs(row - round(row))) > 0.49:
        return None
    return round(row), round(col)


class LabelMosaic:
    """WorldCover codes on the S2 tile's exact pixel grid, mosaicked from every overlapping map tile.

    The reference cropped one map tile by pixel index and stretched it, so patches at a map tile
    boundary got wrong labels. Here each patch reads its footprint from all map tiles it overlaps:
    by a shifted windowed read when the grids align (the release: both EPSG:4326, same pixel size),
    otherwise through a WarpedVRT onto the S2 grid with nearest resampling and an (in effect) exact
    transformer: GDAL's default approximation (0.125 px) moves labels near class edges.
    """

    def __init__(self, image, map_paths):
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        self.image = image
        self.sources = []  # (path, dataset, offset or None, vrt or None, footprint in S2 pixels)
        for path in map_paths:
            label_map = open_geotiff(path, expected_bands=1)
            require(
                label_map.dtypes[0] == "uint8",
                path,
                f"has dtype {label_map.dtypes[0]}",
                "uint8 WorldCover codes",
            )
            footprint = self._footprint(label_map)
            if footprint is None:
                label_map.close()
                continue
            offset = aligned_offset(image, label_map)
            vrt = None
            if offset is None:
                vrt = WarpedVRT(
                    label_map,
                    crs=image.crs,
                    transform=image.transform,
                    width=image.width,
                    height=image.height,
                    resampling=Resampling.nearest,
                    nodata=0,
                    src_nodata=label_map.nodata,
                    tolerance=1e-9,
                )
            self.sources.append((path, label_map, offset, vrt, footprint))

    def _footprint(self, label_map):
        """The map tile's extent as (row0, col0, row1, col1) in S2 pixels, or None if disjoint."""
        from rasterio.warp import transform_bounds
        from rasterio.windows import from_bounds

        image = self.image
        bounds = transform_bounds(label_map.crs, image.crs, *label_map.bounds, densify_pts=21)
        window = from_bounds(*bounds, transform=image.transform)
        row0, col0 = int(np.floor(window.row_off)) - 1, int(np.floor(window.col_off)) - 1
        row1 = int(np.ceil(window.row_off + window.height)) + 1
        col1 = int(np.ceil(window.col_off + window.width)) + 1
        if row1 <= 0 or col1 <= 0 or row0 >= image.height or col0 >= image.width:
            return None
        return row0, col0, row1, col1

    def _pieces(self, top, left, size_r, size_c):
        """(place or None, block) for every map tile meeting the window; None = covers it whole."""
        from rasterio.windows import Window

        window = Window(left, top, size_c, size_r)
        for path, label_map, offset, vrt, (row0, col0, row1, col1) in self.sources:
            if row1 <= top or col1 <= left or row0 >= top + size_r or col0 >= left + size_c:
                continue
            if vrt is not None:
                yield None, read_window(vrt, window, indexes=1, path=path)
                continue
            map_top, map_left = top + offset[0], left + offset[1]
            r0, c0 = max(map_top, 0), max(map_left, 0)
            r1, c1 = min(map_top + size_r, label_map.height), min(map_left + size_c, label_map.width)
            if r0 >= r1 or c0 >= c1:
                continue
            block = read_window(label_map, Window(c0, r0, c1 - c0, r1 - r0), indexes=1, path=path)
            yield (None if block.shape == (size_r, size_c) else (r0 - map_top, c0 - map_left)), block

    def read(self, window) -> np.ndarray:
        """The `(rows, cols)` uint8 WorldCover codes of `window`; 0 where no map tile covers it."""
        top, left = int(window.row_off), int(window.col_off)
        size_r, size_c = int(window.height), int(window.width)
        pieces = list(self._pieces(top, left, size_r, size_c))
        if len(pieces) == 1 and pieces[0][0] is None:
            return pieces[0][1]
        labels = np.zeros((size_r, size_c), dtype=np.uint8)
        for place, block in pieces:
            if place is None:
                labels = np.where(labels == 0, block, labels)
            else:
                region = labels[place[0] : place[0] + block.shape[0], place[1] : place[1] + block.shape[1]]
                region[region == 0] = block[region == 0]
        return labels

    def unknown_code_error(self, labels, window, patch_name) -> InputError:
        """InputError naming the first unknown code, the map file and pixel holding it, and its position."""
        from rasterio.warp import transform as transform_points

        row, col = (int(v) for v in np.argwhere(CODE_TO_CLASS[labels] == UNKNOWN_CLASS)[0])
        code = int(labels[row, col])
        x, y = self.image.xy(int(window.row_off) + row, int(window.col_off) + col)
        where, path = f"x {x:.6f}, y {y:.6f} ({self.image.crs})", self.image.name
        for source_path, label_map, _, _, _ in self.sources:
            xs, ys = transform_points(self.image.crs, label_map.crs, [x], [y])
            map_row, map_col = label_map.index(xs[0], ys[0])
            if 0 <= map_row < label_map.height and 0 <= map_col < label_map.width:
                path, where = source_path, f"map pixel (row {map_row}, col {map_col}), {where}"
                break
        valid = ", ".join(str(c) for c in WORLDCOVER_CODES)
        return InputError(
            path,
            f"unknown WorldCover code {code} at {where}, in patch {patch_name}",
            f"one of the WorldCover 2021 codes {valid}",
        )

    def close(self) -> None:
        for _, label_map, _, vrt, _ in self.sources:
            if vrt is not None:
                vrt.close()
            label_map.close()


# ---- pairing Sentinel-2 tiles with WorldCover map tiles ----


def failure(tile, path, problem, expected) -> dict:
    """A tile's failure as data (it crosses process boundaries and lands in report.json)."""
    return {"tile": tile, "file": str(path), "problem": problem, "expected": expected}


def _check_geotiff(path, bands, dtype, expected):
    with open_geotiff(path, expected_bands=bands) as dataset:
        require(dataset.dtypes[0] == dtype, path, f"has dtype {dataset.dtypes[0]}", expected)
        require(dataset.crs is not None, path, "has no CRS", "a georeferenced GeoTIFF")
        return dataset.crs, tuple(dataset.transform)[:6], dataset.width, dataset.height, tuple(dataset.bounds)


def _tile_files(folder, pattern) -> tuple[dict, list]:
    """{tile id: path} of the files matching `pattern` anywhere under `folder` (one sub-folder per
    product, as the Terrascope client writes), and the paths without a tile id in their name.

    Hidden folders (a download's `.partial/`) are skipped. A tile id found twice is refused: two
    copies of a tile would put the same patches twice into the dataset.
    """
    found, unnamed = {}, []
    for path in sorted(Path(folder).rglob(pattern)):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        match = TILE_ID.search(path.name)
        if match is None:
            unnamed.append(path)
        elif match.group() in found:
            raise InputError(
                path,
                f"has the tile id {match.group()} of {found[match.group()]} too",
                f"one {pattern} per tile id under {folder} (remove the duplicate)",
            )
        else:
            found[match.group()] = path
    return found, unnamed


def _find_maps(map_dir, failures) -> dict:
    paths, unnamed = _tile_files(map_dir, "*_Map.tif")
    for path in unnamed:
        failures.append(failure(None, path, "has no tile id in its name", "a name like ..._N36E027_Map.tif"))
    maps = {}
    for tile, path in paths.items():
        try:
            crs, _, _, _, bounds = _check_geotiff(path, 1, "uint8", "uint8 codes")
            maps[tile] = {"path": str(path), "crs": crs, "bounds": bounds}
        except InputError as error:
            failures.append(failure(tile, error.path, error.problem, error.expected))
    return maps


def find_tiles(s2_dir, map_dir) -> tuple[dict, dict, list]:
    """Find S2 composites and maps (recursively), check every file, pair each scene with every map
    tile its extent overlaps; returns (tiles, maps, failures).

    `tiles[id]` holds `s2_path`, and for a scene that passed its checks `crs`, `transform`, `width`,
    `height` and `map_paths` (the overlapping maps, whatever their tile ids).
    """
    require_dir(s2_dir, "a folder of *_S2RGBNIR.tif files")
    require_dir(map_dir, "a folder of *_Map.tif files")
    failures, tiles = [], {}
    maps = _find_maps(map_dir, failures)
    s2_paths, unnamed = _tile_files(s2_dir, "*_S2RGBNIR.tif")
    require(
        s2_paths or unnamed, s2_dir, "holds no *_S2RGBNIR.tif file", "WorldCover 2021 S2 RGBNIR composites"
    )
    for path in unnamed:
        expected = "a name like ..._N36E027_S2RGBNIR.tif"
        failures.append(failure(None, path, "has no tile id in its name", expected))
    for tile, path in s2_paths.items():
        tiles[tile] = {"s2_path": str(path)}
        try:
            crs, transform, width, height, _ = _check_geotiff(path, 4, "uint16", "uint16 DNs")
        except InputError as error:
            failures.append(failure(tile, error.path, error.problem, error.expected))
            continue
        tiles[tile].update(crs=crs.to_string(), transform=transform, width=width, height=height)
    for tile, paths in _overlaps({t: i for t, i in tiles.items() if "crs" in i}, maps).items():
        tiles[tile]["map_paths"] = paths
        if not paths:
            expected = f"a *_Map.tif under {map_dir} whose extent overlaps the scene's"
            problem = f"has no WorldCover map in {map_dir} that overlaps tile {tile}"
            failures.append(failure(tile, tiles[tile]["s2_path"], problem, expected))
    return tiles, maps, failures


def _scene_bounds(tile_info) -> tuple[float, float, float, float]:
    import rasterio

    transform = rasterio.Affine(*tile_info["transform"])
    left, top = transform @ (0, 0)
    right, bottom = transform @ (tile_info["width"], tile_info["height"])
    return min(left, right), min(top, bottom), max(left, right), max(top, bottom)


def _overlaps(tiles, maps) -> dict:
    """{tile: [map paths]} by bounds: each scene's extent is projected once per map CRS (densified
    edges), then compared with all maps of that CRS at once, so thousands of tiles pair in seconds."""
    from rasterio.warp import transform_bounds

    by_crs = {}
    for label_map in maps.values():
        by_crs.setdefault(label_map["crs"].to_string(), []).append(label_map)
    found = {tile: [] for tile in tiles}
    for crs, group in by_crs.items():
        bounds = np.array([label_map["bounds"] for label_map in group], dtype=np.float64)
        for tile, info in tiles.items():
            x0, y0, x1, y1 = transform_bounds(info["crs"], crs, *_scene_bounds(info), densify_pts=21)
            hit = (x0 < bounds[:, 2]) & (x1 > bounds[:, 0]) & (y0 < bounds[:, 3]) & (y1 > bounds[:, 1])
            found[tile] += [group[index]["path"] for index in np.flatnonzero(hit)]
    return {tile: sorted(paths) for tile, paths in found.items()}


# ---- the segmentation layout: {train,val,test}/{images,masks}/*.png ----


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG header, without decoding the image."""
    with open(path, "rb") as file:
        header = file.read(24)
    require(
        len(header) == 24 and header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR",
        path,
        "is not a PNG file",
        "a PNG image",
    )
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


def list_training_set(root, name, image_size) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of one training set; "generated" pairs train/generated with train/masks."""
    root = Path(root)
    if name != "generated":
        return list_split(root, name, image_size)
    folder = require_dir(root / "train" / "generated", "the images of generative_trainer_unet_spade_gan.py")
    pairs = []
    for _, mask in list_split(root, "train", image_size):
        image = folder / mask.name
        require(image.is_file(), image, "is missing", f"one generated image per mask of {mask.parent}")
        size = png_size(image)
        expected = f"{image_size}x{image_size}, the size of its mask"
        require(size == (image_size, image_size), image, f"is {size[0]}x{size[1]}", expected)
        pairs.append((image, mask))
    return pairs


def scan_mask(mask_path) -> tuple[np.ndarray, tuple | None]:
    """Decode one mask: class pixel counts (index 7 = unknown colour) and the first unknown pixel."""
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 3 or mask.shape[2] not in (3, 4):
        problem = "cannot be decoded" if mask is None else "is not an RGB image"
        raise InputError(mask_path, problem, "an RGB mask coloured with the ARAS400k palette")
    rgb = cv2.cvtColor(mask[..., :3], cv2.COLOR_BGR2RGB)
    labels = colours_to_labels(rgb)
    counts = np.bincount(np.minimum(labels, NUM_CLASSES).ravel(), minlength=NUM_CLASSES + 1)
    first_unknown = None
    if counts[NUM_CLASSES]:
        row, col = (int(v) for v in np.argwhere(labels == IGNORE_INDEX)[0])
        first_unknown = (row, col, tuple(int(v) for v in rgb[row, col]))
    return counts, first_unknown


PERCENTAGE_COLUMNS = ["filename", *CLASS_NAMES]


def percentages_csv_path(data_root, split) -> Path:
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
        scans = list(pool.map(scan_mask, mask_paths))
    rows = []
    for path, (counts, first_unknown) in zip(mask_paths, scans, strict=True):
        if first_unknown is not None:
            row, col, colour = first_unknown
            raise InputError(
                path,
                f"has a pixel of colour {colour} at row {row}, col {col}",
                "only ARAS400k palette colours",
            )
        known = counts[:NUM_CLASSES]
        total = max(int(known.sum()), 1)
        shares = {name: round(100.0 * int(n) / total, 2) for name, n in zip(CLASS_NAMES, known, strict=True)}
        rows.append({"filename": path.name, **shares})
    return rows


def write_class_percentages(mask_dir, out_path, threads: int = 1) -> Path:
    """Write the class-percentage CSV (`PERCENTAGE_COLUMNS`) of every PNG mask in a folder, atomically."""
    mask_dir = require_dir(mask_dir, "a folder of PNG masks")
    masks = sorted(mask_dir.glob("*.png"))
    require(masks, mask_dir, "holds no .png masks", "at least one ARAS400k mask")
    atomic.write_csv(out_path, class_percentages(masks, threads), PERCENTAGE_COLUMNS)
    return Path(out_path)


def check_masks(pairs, unknown_colour: str, threads: int) -> np.ndarray:
    """Decode every mask once before training (so a bad colour never stops a run mid-way).

    Returns class pixel counts with unknown-colour pixels last. Under `unknown_colour="error"` the
    first mask with a colour outside the palette is an InputError naming the colour and its place.
    OpenCV releases the GIL while decoding, so threads are enough here.
    """
    totals = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
    masks = [mask for _, mask in pairs]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for mask_path, (counts, first_unknown) in zip(masks, pool.map(scan_mask, masks), strict=True):
            if first_unknown and unknown_colour == "error":
                row, col, colour = first_unknown
                raise InputError(
                    mask_path,
                    f"has {counts[NUM_CLASSES]} pixels of colour {colour} (first at row {row}, col {col}) "
                    "that is not an ARAS400k class colour",
                    "only the 7 palette colours, or --unknown_colour ignore",
                )
            totals += counts
    return totals


def load_pair(image_path, mask_path, image_size):
    """Read one PNG pair inside tf.data: float32 RGB in [0, 255] and uint8 class indices."""
    import tensorflow as tf

    image = tf.io.decode_png(tf.io.read_file(image_path), channels=3)
    mask = decode_mask_tf(tf.io.decode_png(tf.io.read_file(mask_path), channels=3))
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


def plot_examples(pairs, predictions, path) -> None:
    """One row per test patch: image | truth mask | predicted mask, with the palette as legend."""
    from matplotlib.patches import Patch

    plt = plots.pyplot()
    figure, axes = plt.subplots(len(predictions), 3, figsize=(9, 3 * len(predictions)), squeeze=False)
    for row, ((image_path, mask_path), predicted) in enumerate(zip(pairs, predictions, strict=True)):
        image = cv2.cvtColor(cv2.imread(str(image_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        truth = cv2.cvtColor(cv2.imread(str(mask_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        panels = [
            (image, image_path.name),
            (truth, "truth"),
            (labels_to_colours(predicted), "prediction"),
        ]
        for col, (panel, title) in enumerate(panels):
            axes[row, col].imshow(panel)
            axes[row, col].set_title(title, fontsize=8)
            axes[row, col].axis("off")
    legend = [Patch(color=PALETTE[i] / 255, label=name) for i, name in enumerate(CLASS_NAMES)]
    figure.legend(handles=legend, loc="lower center", ncol=4)
    plots.save(figure, path)


# ---- the EfficientNet encoder of segmentation_train.py and segformer_vis.py ----


ENCODER_STRIDES = (2, 4, 8, 16, 32)


def encoder_pyramid(model, image_size):
    """smp's 5 EfficientNet encoder stages: the stem (stride 2), then the last block at strides 4-32.

    segmentation_models_pytorch takes the stem's activation as its stride-2 stage (64 channels for
    b7) and the output of the last block before each further downsampling (48, 80, 224, 640).
    """
    block_outputs = {}
    for layer in model.layers:
        match = re.match(r"^(block\d+[a-z])_", layer.name)
        if match:
            # Layers come in graph order, so the last one seen of a block is its output.
            block_outputs[match.group(1)] = layer.output
    by_stride = {image_size // output.shape[1]: output for output in block_outputs.values()}
    by_stride[2] = model.get_layer("stem_activation").output
    return [by_stride[stride] for stride in ENCODER_STRIDES]


def _official_variance_fix(normalization) -> bool:
    """Square the std that the official Keras EfficientNet files store as the input "variance".

    keras.applications' EfficientNet files hold the ImageNet std (0.229, 0.224, 0.225) in the
    Normalization layer's variance slot and, with weights="imagenet", add a Rescaling layer to
    undo it; a model built with weights=None has no such layer, so loading the file as is would
    divide inputs by sqrt(std) (about 0.47) instead of std. Returns True when it squared them.
    """
    variance = np.asarray(normalization.adapt_variance)
    if not np.allclose(variance, IMAGENET_STD, atol=1e-4):
        return False
    normalization.adapt_variance.assign(IMAGENET_STD**2)
    normalization.finalize_state()
    return True


def build_encoder(encoder_name, image_size, weights=""):
    """The paper's encoder: Keras EfficientNet without its top, ImageNet-normalised inputs.

    `weights` is a local notop .h5 file (nothing is downloaded); empty leaves the encoder random.
    """
    import keras

    builder = getattr(keras.applications, f"EfficientNetB{encoder_name[-1]}")
    encoder = builder(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    # The encoder scales inputs by 1/255 then applies its Normalization layer; give that layer the
    # ImageNet mean/std (the smp encoder's preprocessing). A weights file brings its own statistics.
    normalization = next(layer for layer in encoder.layers if isinstance(layer, keras.layers.Normalization))
    normalization.adapt_mean.assign(IMAGENET_MEAN)
    normalization.adapt_variance.assign(IMAGENET_STD**2)
    normalization.finalize_state()
    if weights:
        require_file(weights, f"a Keras {encoder_name} notop .h5 weights file")
        try:
            encoder.load_weights(weights)
        except (ValueError, OSError) as error:
            raise InputError(
                weights,
                f"cannot be loaded into {encoder_name} ({str(error).splitlines()[0][:100]})",
                f"Keras {encoder_name} weights saved with include_top=False",
            ) from None
        if _official_variance_fix(normalization):
            print(f"note: {weights} stores the ImageNet std as variance (official layout): squared it")
    fused_bn.fuse(encoder)  # TensorFlow's fused batch-norm kernel, same variables (common.fused_bn)
    return encoder


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
    labels = np.full((image_size, image_size), rng.integers(NUM_CLASSES), dtype=np.uint8)
    for _ in range(rng.integers(2, 5)):
        centre = rng.uniform(0, image_size, 2)
        radii = rng.uniform(image_size / 8, image_size / 3, 2)
        if rng.random() < 0.5:
            inside = (np.abs(rows - centre[0]) < radii[0]) & (np.abs(cols - centre[1]) < radii[1])
        else:
            inside = ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 < 1
        labels[inside] = rng.integers(NUM_CLASSES)
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
            mask = cv2.cvtColor(labels_to_colours(labels), cv2.COLOR_RGB2BGR)
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
    codes = rng.permutation(np.resize(np.array(WORLDCOVER_CODES[1:]), 44))  # each code 4 times
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

    paint(-10, -10, 276, 276, WATER_CODE)  # lake over patch (0, 0) with a small island
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
