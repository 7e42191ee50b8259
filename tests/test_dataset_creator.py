"""Tests of dataset_creator.py on tiny GeoTIFFs generated in the release's formats."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from conftest import one_line_error, run_script
from rasterio.warp import transform as transform_points

import dataset_creator
from common.aras400k import classes, patches, percentages
from common.raster import write_geotiff

RES = 1.0 / 1200  # a coarse EPSG:4326 grid shared by hand-made images and maps


def run(argv):
    """main() in-process; returns the report, or the exit code of a clean error."""
    args = dataset_creator.get_args_parser().parse_args([str(a) for a in argv])
    try:
        return dataset_creator.main(args)
    except SystemExit as exit_info:
        return exit_info.code


def make_pair(folder, tile, pixels, codes, lon0=27.0, lat0=39.0, nodata=None, map_codes_origin=None):
    """Write an S2 RGBNIR tile and its WorldCover map (same EPSG:4326 grid unless told) by release names."""
    transform = rasterio.Affine(RES, 0, lon0, 0, -RES, lat0)
    write_geotiff(
        folder / "S2RGB_2021" / f"ESA_WorldCover_10m_2021_v200_{tile}_S2RGBNIR.tif",
        pixels,
        transform=transform,
        crs="EPSG:4326",
        nodata=nodata,
    )
    if codes is not None:
        map_lon0, map_lat0 = map_codes_origin or (lon0, lat0)
        write_geotiff(
            folder / "worldcover_2021" / f"ESA_WorldCover_10m_2021_v200_{tile}_Map.tif",
            codes.astype(np.uint8),
            transform=rasterio.Affine(RES, 0, map_lon0, 0, -RES, map_lat0),
            crs="EPSG:4326",
            nodata=0,
        )
    return folder / "S2RGB_2021", folder / "worldcover_2021"


def land(rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(200, 3000, (4, rows, cols)).astype(np.uint16)
    codes = np.full((rows, cols), 10, np.uint8)
    codes[:, cols // 2 :] = 40
    return pixels, codes


def decode_mask(path):
    """Mask PNG -> class indices by exact colour; -1 where a colour is not in the palette."""
    rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    labels = np.full(rgb.shape[:2], -1)
    for index, colour in enumerate(classes.PALETTE):
        labels[(rgb == colour).all(axis=-1)] = index
    return labels


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    results = tmp_path_factory.mktemp("demo")
    report = run(["--demo", "--demo_size", 512, "--results_dir", results])
    return results, results / "dataset_creator" / "demo", report


def test_help():
    result = run_script("dataset_creator.py", "--help")
    assert result.returncode == 0
    assert "--s2_dir" in result.stdout and "--max_water_fraction" in result.stdout


def test_demo_subprocess_writes_documented_files(tmp_path):
    result = run_script("dataset_creator.py", "--demo", "--demo_size", 512, "--results_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "dataset_creator" / "demo"
    for name in ("manifest.csv", "report.json", "config.json"):
        assert (out / name).is_file()
    report = json.loads((out / "report.json").read_text())
    totals = report["totals"]
    assert totals["patches"] == 8 and totals["kept"] == 4
    assert (
        result.stdout.strip()
        .splitlines()[-1]
        .startswith(
            f"summary: tiles 2 (failed 0), patches 8, kept 4 (train {totals['kept_by_split']['train']}, "
        )
    )
    for split in ("train", "val"):  # two tiles: one for train, one for val
        images = sorted(p.name for p in (out / split / "images").glob("*.png"))
        masks = sorted(p.name for p in (out / split / "masks").glob("*.png"))
        assert images and images == masks
    demo_data = tmp_path / "demo_data" / "dataset_creator"
    assert len(list((demo_data / "S2RGB_2021").glob("*_S2RGBNIR.tif"))) == 2
    assert len(list((demo_data / "worldcover_2021").glob("*_Map.tif"))) == 2


def test_remap_table_and_palette_exact():
    expected = {10: 0, 95: 0, 20: 1, 30: 2, 90: 2, 100: 2, 40: 3, 50: 4, 60: 5, 70: 5, 80: 6}
    for code in range(256):
        if code in expected:
            assert classes.CODE_TO_CLASS[code] == expected[code], code
        elif code == 0:
            assert classes.CODE_TO_CLASS[0] == classes.NODATA_CLASS
        else:
            assert classes.CODE_TO_CLASS[code] == classes.UNKNOWN_CLASS, code
    palette = [
        (0, 100, 0),
        (255, 182, 193),
        (154, 205, 50),
        (255, 215, 0),
        (139, 69, 19),
        (211, 211, 211),
        (0, 0, 255),
    ]
    assert classes.PALETTE.tolist() == [list(c) for c in palette]
    for code, index in expected.items():  # the BGR table OpenCV writes is the palette reversed
        assert classes.CODE_TO_BGR[code, 0].tolist() == list(palette[index][::-1])


def test_scaling_formulas():
    image = np.array(
        [[[0, 1000], [2999, 3000]], [[1500, 10], [7, 600]], [[3, 4], [5, 6]], [[9000, 1], [2, 3]]],
        dtype=np.uint16,
    )
    rgb = dataset_creator.scale_to_uint8(image, "patch_max", "rgb")
    # Reference: patch / patch.max() * 255 truncated; exact integers here. Channels come out B, G, R.
    expected = (image[:3].astype(np.int64) * 255 // 3000).astype(np.uint8)
    assert rgb.shape == (2, 2, 3) and rgb.tolist() == np.moveaxis(expected[::-1], 0, -1).tolist()
    rgbnir = dataset_creator.scale_to_uint8(image, "patch_max", "rgbnir")
    # The RGB maximum (3000) scales R, G, B as with --bands rgb; NIR is scaled by its own (9000).
    assert rgbnir.shape == (2, 2, 4) and np.array_equal(rgbnir[..., :3], rgb)
    assert rgbnir[..., 3].tolist() == (image[3].astype(np.int64) * 255 // 9000).tolist()
    tables = dataset_creator.scaling_tables("fixed", max_reflectance=0.3)
    fixed = dataset_creator.scale_to_uint8(image, "fixed", "rgb", tables)
    assert fixed[..., 2].tolist() == [[0, 85], [254, 255]]  # red: DN/10000 clipped at 0.3 -> x255
    tables = dataset_creator.scaling_tables(
        "percentile", low_high=(np.array([1000.0, 0, 0, 0]), np.array([3000.0, 1, 1, 1]))
    )
    percentile = dataset_creator.scale_to_uint8(image, "percentile", "rgb", tables)
    assert percentile[..., 2].tolist() == [[0, 0], [254, 255]]


def mosaic_classes(s2_path, window, map_paths):
    """Brute force: each pixel centre of the window, projected into every map, looked up by index."""
    with rasterio.open(s2_path) as image:
        rows, cols = np.mgrid[0 : int(window.height), 0 : int(window.width)]
        xs, ys = image.transform @ (cols.ravel() + window.col_off + 0.5, rows.ravel() + window.row_off + 0.5)
        crs = image.crs
    codes, sources = np.zeros(xs.size, np.uint8), 0
    for path in map_paths:
        with rasterio.open(path) as label_map:
            mx, my = (np.asarray(v) for v in transform_points(crs, label_map.crs, xs, ys))
            map_rows, map_cols = rasterio.transform.rowcol(label_map.transform, mx, my, op=np.floor)
            map_rows, map_cols = np.asarray(map_rows).astype(int), np.asarray(map_cols).astype(int)
            inside = (
                (map_rows >= 0)
                & (map_rows < label_map.height)
                & (map_cols >= 0)
                & (map_cols < label_map.width)
            )
            sources += bool(inside.any())
            codes[inside] = label_map.read(1)[map_rows[inside], map_cols[inside]]
    return classes.CODE_TO_CLASS[codes].reshape(rows.shape), sources


def test_masks_equal_the_mosaic_also_across_map_tiles_and_crs(demo):
    results, out, _ = demo
    data = results / "demo_data" / "dataset_creator"
    maps = sorted((data / "worldcover_2021").glob("*_Map.tif"))
    straddling = set()
    with open(out / "manifest.csv") as file:
        manifest = list(csv.DictReader(file))
    assert {row["tile"] for row in manifest} == {"N36E027", "N36E030"}  # the aligned and the UTM tile
    for row in manifest:
        s2_path = next((data / "S2RGB_2021").glob(f"*_{row['tile']}_S2RGBNIR.tif"))
        window = rasterio.windows.Window(int(row["col"]) * 256, int(row["row"]) * 256, 256, 256)
        expected, sources = mosaic_classes(s2_path, window, maps)
        decoded = decode_mask(out / row["split"] / "masks" / row["patch"])
        assert (decoded >= 0).all(), "mask holds a colour outside the palette"
        assert np.array_equal(decoded, expected), row["patch"]
        fractions = [float(row[f"frac_{name}"]) for name in classes.CLASS_KEYS]
        assert np.allclose(fractions, np.bincount(expected.ravel(), minlength=7) / expected.size, atol=1e-6)
        if sources == 2:
            straddling.add(row["tile"])
    assert straddling == {"N36E027", "N36E030"}  # both tiles have kept patches straddling 30 E


def test_filters_counted_by_reason(demo):
    _, out, report = demo
    tiles = report["tiles"]
    assert tiles["N36E027"]["dropped"] == {"label_nodata": 1, "image_nodata": 1, "water": 1}
    assert tiles["N36E030"]["dropped"] == {"label_nodata": 0, "image_nodata": 1, "water": 0}
    assert report["totals"]["dropped"] == {"label_nodata": 1, "image_nodata": 2, "water": 1}
    assert json.loads((out / "report.json").read_text())["totals"] == report["totals"]
    kept = {p.stem for p in out.glob("*/images/*.png")}
    assert kept == {"N36E027_001_001", "N36E030_000_000", "N36E030_000_001", "N36E030_001_000"}
    after = report["code_pixels_after_filtering"]
    before = report["code_pixels_before_filtering"]
    assert "0" in before and "0" not in after and before["80"] > after.get("80", 0)
    assert sum(report["class_pixels_after_filtering"].values()) == 4 * 256 * 256
    for code, name in classes.REMAP_NAMES.items():
        assert report["remapped_pixels_after_filtering"][name] == after.get(str(code), 0)


def test_declared_nodata_value_and_water_threshold(tmp_path):
    pixels, codes = land(512, 256)
    pixels[:, 300, 10] = 7  # one pixel equal to the declared nodata value in every band: patch (1, 0)
    codes[:240, :] = 80  # patch (0, 0): 240/256 = 93.75 % water
    s2_dir, map_dir = make_pair(tmp_path, "N36E027", pixels, codes, nodata=7)
    report = run(["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "a", "--split", "none"])
    assert report["totals"]["dropped"] == {"label_nodata": 0, "image_nodata": 1, "water": 1}
    report = run(
        [
            "--s2_dir",
            s2_dir,
            "--map_dir",
            map_dir,
            "--out",
            tmp_path / "b",
            "--split",
            "none",
            "--max_water_fraction",
            "0.95",
        ]
    )
    assert report["totals"]["dropped"]["water"] == 0 and report["totals"]["kept"] == 1


def test_patch_names_grid_and_bounds(tmp_path):
    pixels, codes = land(600, 530)
    s2_dir, map_dir = make_pair(tmp_path, "S03W061", pixels, codes, lon0=-61.0, lat0=-2.0)
    run(["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "a", "--split", "none"])
    names = sorted(p.name for p in (tmp_path / "a" / "images").glob("*.png"))
    assert names == [f"S03W061_{r:03d}_{c:03d}.png" for r in range(2) for c in range(2)]  # edges dropped
    run(
        [
            "--s2_dir",
            s2_dir,
            "--map_dir",
            map_dir,
            "--out",
            tmp_path / "b",
            "--split",
            "none",
            "--stride",
            "128",
        ]
    )
    with open(tmp_path / "b" / "manifest.csv") as file:
        manifest = list(csv.DictReader(file))
    assert len(manifest) == 9 and manifest[-1]["patch"] == "S03W061_002_002.png"
    row = next(r for r in manifest if r["patch"] == "S03W061_001_002.png")
    # Patch (1, 2) with stride 128 starts at pixel row 128, col 256.
    assert float(row["left"]) == pytest.approx(-61.0 + 256 * RES)
    assert float(row["top"]) == pytest.approx(-2.0 - 128 * RES)
    assert float(row["right"]) == pytest.approx(-61.0 + 512 * RES) and row["crs"] == "EPSG:4326"
    image = cv2.imread(str(tmp_path / "b" / "images" / "S03W061_001_002.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8


def test_band_modes_formats_and_percentile_scaling(tmp_path):
    pixels, codes = land(256, 512)
    s2_dir, map_dir = make_pair(tmp_path, "N36E027", pixels, codes)
    common = ["--s2_dir", s2_dir, "--map_dir", map_dir, "--split", "none", "--bands", "rgbnir"]
    run([*common, "--out", tmp_path / "png"])
    bgra = cv2.imread(str(tmp_path / "png" / "images" / "N36E027_000_001.png"), cv2.IMREAD_UNCHANGED)
    patch = pixels[:, :, 256:].astype(np.int64)
    expected_nir = (patch[3] * 255 // patch[3].max()).astype(np.uint8)
    assert bgra.shape == (256, 256, 4) and np.array_equal(bgra[..., 3], expected_nir)
    report = run(
        [
            *common,
            "--out",
            tmp_path / "tif",
            "--image_format",
            "tif",
            "--scaling",
            "percentile",
            "--percentile_windows",
            "4",
        ]
    )
    low, high = report["tiles"]["N36E027"]["percentiles"]
    assert len(low) == 4 and all(lo < hi for lo, hi in zip(low, high, strict=True))
    with rasterio.open(tmp_path / "tif" / "images" / "N36E027_000_001.tif") as patch_file:
        assert patch_file.count == 4 and patch_file.dtypes[0] == "uint8"
        assert patch_file.transform == rasterio.Affine(RES, 0, 27.0 + 256 * RES, 0, -RES, 39.0)
        assert patch_file.crs.to_string() == "EPSG:4326"
    assert (tmp_path / "tif" / "masks" / "N36E027_000_001.png").is_file()


def test_split_is_by_tile_and_seeded_and_the_demo_splits_by_patch(demo):
    tiles = [f"N{i:02d}E000" for i in range(10)]
    first = dataset_creator.split_names(tiles, [0.8, 0.1, 0.1], seed=0)
    assert first == dataset_creator.split_names(list(reversed(tiles)), [0.8, 0.1, 0.1], seed=0)
    assert sorted(first.values()).count("train") == 8 and sorted(first.values()).count("test") == 1
    others = [dataset_creator.split_names(tiles, [0.8, 0.1, 0.1], seed=s) for s in range(1, 6)]
    assert any(other != first for other in others)
    _, out, report = demo  # two tiles: the demo splits patches, and says so
    assert report["split"]["level"] == "patch" and report["split"]["tiles"] is None
    assert "patch-level split" in report["split"]["note"]
    assert all(report["totals"]["kept_by_split"][split] >= 1 for split in patches.SPLITS)
    with open(out / "manifest.csv") as file:
        for row in csv.DictReader(file):
            assert (out / row["split"] / "images" / row["patch"]).is_file()
    assert not list((out / "images").glob("*.png"))  # nothing left in the flat folder


def test_rerun_skips_finished_patches_and_interrupted_run_completes(tmp_path):
    pixels, codes = land(512, 768)
    s2_dir, map_dir = make_pair(tmp_path, "N36E027", pixels, codes)
    argv = ["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "out", "--split", "none"]
    first = run(argv)
    out = tmp_path / "out"
    images = sorted((out / "images").glob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in images}
    manifest = (out / "manifest.csv").read_text()
    assert run(argv)["totals"] == first["totals"]
    assert {p: p.stat().st_mtime_ns for p in images} == stamps  # nothing rewritten
    # An interrupted run: the journal ends mid-line, a later patch's files and the report are missing.
    journal = out / ".progress" / "N36E027.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])
    for name in ("report.json", "manifest.csv", "images/N36E027_001_002.png"):
        (out / name).unlink()
    (out / "images" / ".N36E027_001_002.png.4242.tmp").write_bytes(b"\x89PNG cut short")
    assert run(argv)["totals"] == first["totals"]
    assert (out / "manifest.csv").read_text() == manifest
    assert len(list((out / "images").glob("*.png"))) == 6 and not list(out.rglob("*.tmp*"))
    skipped = out / "images" / "N36E027_000_000.png"
    assert stamps[skipped] == skipped.stat().st_mtime_ns
    # Other settings are never mixed into the same folder.
    assert run([*argv, "--scaling", "fixed"]) == 2


def test_workers_match_serial_run(tmp_path):
    for index, tile in enumerate(("N36E027", "N36E030", "N33E027")):
        pixels, codes = land(256, 512, seed=index)
        s2_dir, map_dir = make_pair(
            tmp_path, tile, pixels, codes, lon0=27.0 + 3 * (index % 2), lat0=39.0 - 3 * (index // 2)
        )
    serial = run(["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "serial"])
    parallel = run(
        ["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "parallel", "--workers", "2"]
    )
    assert parallel["totals"] == serial["totals"] and serial["totals"]["kept"] == 6
    assert {s: len(t) for s, t in serial["split"]["tiles"].items()} == {"train": 1, "val": 1, "test": 1}
    for path in (tmp_path / "serial").glob("*/*/*.png"):
        twin = tmp_path / "parallel" / path.relative_to(tmp_path / "serial")
        assert path.read_bytes() == twin.read_bytes()


# ---- bad input: one line, exit 2, nothing half-written ----


def assert_clean_error(capsys, code, *fragments):
    assert code == 2
    return one_line_error(capsys.readouterr().err, *fragments)


def assert_nothing_written(out):
    assert not (out / "report.json").exists() and not (out / "manifest.csv").exists()
    assert not list(out.rglob("*.png")) and not list(out.rglob("*.tmp*"))


def test_unpaired_tile(tmp_path, capsys):
    pixels, codes = land(256, 256)
    s2_dir, map_dir = make_pair(tmp_path, "N36E027", pixels, codes)
    make_pair(tmp_path, "N36E030", pixels, None, lon0=30.0)
    code = run(["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "out"])
    assert_clean_error(capsys, code, "N36E030_S2RGBNIR.tif", "no WorldCover map", "overlaps tile N36E030")
    assert_nothing_written(tmp_path / "out")


def test_unknown_code_names_value_and_position(tmp_path, capsys):
    pixels, codes = land(512, 512)
    codes[300, 17] = 37  # inside patch (1, 0), after patches (0, 0) and (0, 1) are written
    s2_dir, map_dir = make_pair(tmp_path, "N36E027", pixels, codes)
    code = run(["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "out", "--split", "none"])
    assert_clean_error(
        capsys,
        code,
        "N36E027_Map.tif",
        "unknown WorldCover code 37",
        "map pixel (row 300, col 17)",
        "N36E027_001_000",
    )
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("kind", ["corrupt", "png", "bands"])
def test_corrupt_non_geotiff_and_band_count(tmp_path, capsys, kind):
    pixels, codes = land(256, 256)
    s2_dir, map_dir = make_pair(tmp_path, "N36E027", pixels, codes)
    s2_path = next(s2_dir.glob("*.tif"))
    if kind == "corrupt":
        s2_path.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
        fragment = "cannot be read as a raster"
    elif kind == "png":
        cv2.imwrite(str(s2_path.with_suffix(".png")), np.zeros((8, 8, 3), np.uint8))
        s2_path.with_suffix(".png").replace(s2_path)
        fragment = "not a GeoTIFF"
    else:
        write_geotiff(
            s2_path, pixels[:3], transform=rasterio.Affine(RES, 0, 27, 0, -RES, 39), crs="EPSG:4326"
        )
        fragment = "has 3 bands; expected 4 bands"
    code = run(["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "out", "--split", "none"])
    assert_clean_error(capsys, code, s2_path.name, fragment)
    assert_nothing_written(tmp_path / "out")


def test_keep_going_processes_other_tiles_and_reports_failures(tmp_path):
    pixels, codes = land(256, 512)
    make_pair(tmp_path, "N36E027", pixels, codes)
    bad_codes = codes.copy()
    bad_codes[5, 5] = 37
    s2_dir, map_dir = make_pair(tmp_path, "N33E027", pixels, bad_codes, lat0=36.0)
    make_pair(tmp_path, "N30E027", pixels, None, lat0=33.0)  # unpaired
    argv = ["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "out", "--split", "none"]
    result = run_script("dataset_creator.py", *argv)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    report = run([*argv, "--keep_going"])
    assert report["totals"]["kept"] == 2 and report["totals"]["tiles_failed"] == 2
    assert sorted(f["tile"] for f in report["failures"]) == ["N30E027", "N33E027"]
    assert any("unknown WorldCover code 37" in f["problem"] for f in report["failures"])
    assert sorted(p.name for p in (tmp_path / "out" / "images").glob("*.png")) == [
        "N36E027_000_000.png",
        "N36E027_000_001.png",
    ]


# ---- product sub-folders, pairing by bounds, small inputs, shards, class percentages ----


def four_tiles(folder):
    """Four 256 x 512 tiles on a 2 x 2 grid of 3-degree cells, each with its map."""
    for index, tile in enumerate(("N36E027", "N36E030", "N33E027", "N33E030")):
        pixels, codes = land(256, 512, seed=index)
        codes[:, 100 + 40 * index : 140 + 40 * index] = (20, 30, 60, 80)[index]
        s2_dir, map_dir = make_pair(
            folder, tile, pixels, codes, lon0=27.0 + 3 * (index % 2), lat0=39.0 - 3 * (index // 2)
        )
    return s2_dir, map_dir


def test_product_sub_folders_are_searched_and_duplicate_tile_ids_refused(tmp_path, capsys):
    s2_dir, map_dir = four_tiles(tmp_path / "flat")
    flat = run(["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "a", "--split", "none"])
    for folder in (s2_dir, map_dir):  # the Terrascope client's layout: <folder>/<product>/<file>
        for path in list(folder.glob("*.tif")):
            (folder / path.stem).mkdir()
            path.rename(folder / path.stem / path.name)
        (folder / path.stem / ".partial").mkdir()  # a download in progress is not an input
        (folder / path.stem / ".partial" / path.name).write_bytes(b"half a file")
    nested = run(["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "b", "--split", "none"])
    assert nested["totals"] == flat["totals"] and nested["totals"]["kept"] == 8
    copy = s2_dir / "again" / "ESA_WorldCover_10m_2021_v200_N33E030_S2RGBNIR.tif"
    copy.parent.mkdir()
    copy.write_bytes(next(s2_dir.rglob("*N33E030_S2RGBNIR.tif")).read_bytes())
    code = run(["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "c", "--split", "none"])
    line = assert_clean_error(capsys, code, "has the tile id N33E030 of", "one *_S2RGBNIR.tif per tile id")
    assert str(copy) in line or str(next(s2_dir.glob("*N33E030*/*.tif"))) in line


def test_scene_pairs_with_every_map_it_overlaps_whatever_their_ids(tmp_path):
    pixels, _ = land(256, 512)
    s2_dir, _ = make_pair(tmp_path, "N36E027", pixels, None, lon0=29.9)  # straddles 30 E
    for tile, lon0, code in (("N33E024", 27.0, 40), ("N33E033", 30.0, 50)):  # ids unlike the scene's
        write_geotiff(
            tmp_path / "worldcover_2021" / f"ESA_WorldCover_10m_2021_v200_{tile}_Map.tif",
            np.full((256, 3600), code, np.uint8),
            transform=rasterio.Affine(RES, 0, lon0, 0, -RES, 39.0),
            crs="EPSG:4326",
        )
    out = tmp_path / "out"
    report = run(
        ["--s2_dir", s2_dir, "--map_dir", tmp_path / "worldcover_2021", "--out", out, "--split", "none"]
    )
    assert [Path(p).name[-16:] for p in report["tiles"]["N36E027"]["map_files"]] == [
        "_N33E024_Map.tif",
        "_N33E033_Map.tif",
    ]
    left, right = (
        decode_mask(out / "masks" / "N36E027_000_000.png"),
        decode_mask(out / "masks" / "N36E027_000_001.png"),
    )
    assert set(np.unique(left)) == {3, 4}  # 120 px of cropland (code 40) west of 30 E, built-up east
    assert set(np.unique(right)) == {4}


def test_fewer_tiles_than_splits_needs_the_labelled_patch_level_split(tmp_path, capsys):
    pixels, codes = land(768, 768)
    s2_dir, map_dir = make_pair(tmp_path, "N36E027", pixels, codes)
    argv = ["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "out"]
    assert_clean_error(capsys, run(argv), "1 tile(s) cannot fill 3 splits by tile", "--split_level patch")
    report = run([*argv, "--split_level", "patch"])
    assert report["totals"]["kept_by_split"] == {"train": 7, "val": 1, "test": 1}
    assert report["split"]["level"] == "patch" and "optimistic" in report["split"]["note"]
    assert run([*argv, "--split_level", "patch"])["totals"] == report["totals"]  # continuing: same split
    assert len(list((tmp_path / "out").glob("*/images/*.png"))) == 9
    assert run([*argv, "--split_level", "patch", "--scaling", "fixed"]) == 2  # never mixed into it


def tree(root, skip=("config.json", "shards")):
    """{relative path: bytes} of every file under root except config.json and the shards' folders;
    report.json without its run time."""
    files = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_file() and name.split("/")[0] not in skip:
            files[name] = path.read_bytes()
    report = json.loads(files.pop("report.json"))
    report.pop("seconds")
    return files, report


@pytest.mark.parametrize("level", ["tile", "patch"])
def test_three_shards_and_merge_equal_one_run_file_by_file(tmp_path, level):
    s2_dir, map_dir = four_tiles(tmp_path)
    argv = ["--s2_dir", s2_dir, "--map_dir", map_dir, "--split_level", level, "--scaling", "percentile"]
    run([*argv, "--out", tmp_path / "one"])
    for index in (1, 2, 3):
        shard = run([*argv, "--out", tmp_path / "sharded", "--shard", f"{index}/3"])
        assert shard["totals"]["tiles"] == (2 if index == 1 else 1)  # round-robin over 4 tiles
    assert (tmp_path / "sharded" / "shards" / "2_of_3" / "report.json").is_file()
    merged = run(["--out", tmp_path / "sharded", "--merge"])
    assert merged["totals"]["kept"] == 8
    one_files, one_report = tree(tmp_path / "one")
    merged_files, merged_report = tree(tmp_path / "sharded")
    assert merged_report == one_report
    assert sorted(merged_files) == sorted(one_files) and merged_files == one_files
    assert any(name.startswith("class_percentages/") for name in one_files)


def test_merge_refuses_missing_shards(tmp_path, capsys):
    s2_dir, map_dir = four_tiles(tmp_path)
    run(["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", tmp_path / "out", "--shard", "1/2"])
    code = run(["--out", tmp_path / "out", "--merge"])
    assert_clean_error(capsys, code, "2_of_2", "is missing or unfinished", "all 2 shards")


def test_class_percentages_per_split_and_for_any_mask_folder(demo, tmp_path):
    _, out, _ = demo
    with open(out / "manifest.csv") as file:
        fractions = {row["patch"]: row for row in csv.DictReader(file)}
    for split in patches.SPLITS:
        with open(percentages.csv_path(out, split)) as file:
            rows = list(csv.DictReader(file))
        assert rows and list(rows[0]) == percentages.COLUMNS
        decoded = tmp_path / f"{split}.csv"  # the same table as decoding the masks gives
        percentages.write_class_percentages(out / split / "masks", decoded)
        assert decoded.read_text() == percentages.csv_path(out, split).read_text()
        for row in rows:
            manifest = fractions[row["filename"]]
            for name, key in zip(classes.CLASS_NAMES, classes.CLASS_KEYS, strict=True):
                assert float(row[name]) == pytest.approx(100 * float(manifest[f"frac_{key}"]), abs=0.006)
    masks = tmp_path / "synth" / "train" / "masks"  # e.g. generated masks: any folder of palette PNGs
    masks.mkdir(parents=True)
    labels = np.zeros((4, 5), np.uint8)
    labels[:, 4] = 6  # 16 tree, 4 water pixels
    cv2.imwrite(str(masks / "g0.png"), cv2.cvtColor(classes.labels_to_colours(labels), cv2.COLOR_RGB2BGR))
    assert run(["--percentages", masks]) == tmp_path / "synth" / "class_percentages" / "train.csv"
    with open(tmp_path / "synth" / "class_percentages" / "train.csv") as file:
        (row,) = list(csv.DictReader(file))
    assert row["filename"] == "g0.png" and float(row["Tree"]) == 80.0 and float(row["Water"]) == 20.0


def test_class_percentages_of_hand_made_masks(tmp_path):
    labels = np.zeros((4, 4), dtype=np.uint8)  # Tree everywhere ...
    labels[:1] = 6  # ... but a quarter Water
    labels[1, :2] = 3  # and 2 of 16 pixels Cropland
    cv2.imwrite(str(tmp_path / "a.png"), classes.labels_to_colours(labels)[..., ::-1])
    out = percentages.write_class_percentages(tmp_path, tmp_path / "pct" / "train.csv")
    with open(out) as file:
        reader = csv.DictReader(file)
        (row,) = list(reader)
    assert reader.fieldnames == percentages.COLUMNS
    assert row["filename"] == "a.png"
    shares = tuple(float(row[name]) for name in ("Tree", "Water", "Cropland", "Grassland"))
    assert shares == (62.5, 25.0, 12.5, 0.0)
