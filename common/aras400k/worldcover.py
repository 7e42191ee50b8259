"""ARAS400k source data: the ESA WorldCover 2021 release's S2 RGBNIR composites and land-cover maps.

The reader of the public release that `dataset_creator.py` cuts into patches (docs/aras400k.md,
"dataset_creator.py"): `find_tiles` finds the `*_S2RGBNIR.tif` scenes and `*_Map.tif` maps under two
folders searched recursively (one sub-folder per product, as `dataset_downloader.py` writes them),
checks every file and pairs each scene with every map tile whose extent overlaps it, whatever their
tile ids; `LabelMosaic` reads the WorldCover codes of any window of a scene on the scene's exact pixel
grid (nearest neighbour), mosaicked from all overlapping map tiles, so a patch that straddles two
map tiles is labelled correctly (the reference cropped one map tile by pixel index and stretched it).
"""

import re
from pathlib import Path

import numpy as np

from common.aras400k import classes
from common.errors import InputError, require, require_dir
from common.raster import open_geotiff, read_window

# The tile id in the release's file names, e.g. ESA_WorldCover_10m_2021_v200_N36E027_Map.tif.
TILE_ID = re.compile(r"[NS]\d{2}[EW]\d{3}")

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

        row, col = (int(v) for v in np.argwhere(classes.CODE_TO_CLASS[labels] == classes.UNKNOWN_CLASS)[0])
        code = int(labels[row, col])
        x, y = self.image.xy(int(window.row_off) + row, int(window.col_off) + col)
        where, path = f"x {x:.6f}, y {y:.6f} ({self.image.crs})", self.image.name
        for source_path, label_map, _, _, _ in self.sources:
            xs, ys = transform_points(self.image.crs, label_map.crs, [x], [y])
            map_row, map_col = label_map.index(xs[0], ys[0])
            if 0 <= map_row < label_map.height and 0 <= map_col < label_map.width:
                path, where = source_path, f"map pixel (row {map_row}, col {map_col}), {where}"
                break
        valid = ", ".join(str(c) for c in classes.WORLDCOVER_CODES)
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
