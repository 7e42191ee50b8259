"""Speed and memory of dataset_creator.py on one full-size tile, against the floor of this machine.

Generates a 10980 x 10980 x 4 uint16 S2 RGBNIR tile (about 1 GB raw) and its WorldCover map in a
temporary folder (tiled GeoTIFFs, written block by block so generation itself stays small in
memory), then times, in fresh processes, alternately:
  floor: read every 256 px window of both rasters and encode the two PNGs (image scaled by its own
         maximum in one OpenCV call, mask coloured by one table look-up), with no other work and
         nothing written;
  floor+files: the floor plus writing the two PNGs as new files (context: creating ~3500 files is a
         cost any tool writing this layout pays, and on some file systems it is not small);
  ours:  `python dataset_creator.py --s2_dir ... --map_dir ... --out ... --workers 1`, the whole
         run (validation, labels, filters, PNG files, journal, manifest, report).
Each side runs --repeats times; the fastest run of each is compared. Peak memory is the child's
maximum resident set size. The land cover holds no water or no-data, so every patch is kept and
both sides encode the same number of PNGs. The folder is deleted afterwards.

    python -m bench.dataset_creator_speed                   # full size, DEFLATE-compressed tiles
    python -m bench.dataset_creator_speed --compress none   # uncompressed tiles
    python -m bench.dataset_creator_speed --size 2048       # quick check

Then `ours/floor: <ratio>` on CPU seconds (the machine may be shared; on an idle one the wall-clock
ratio, printed beside it, is the same for these single-threaded runs), and last `bench.measure`'s
table of every run (wall and CPU time, load, steal) and its ratio line, floor / ours (> 1: ours is
faster; below 1 it says what share of the floor's speed ours reaches).

    python -m bench.dataset_creator_speed --size 512 --repeats 1   # seconds, for the tests
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import measure
from common.aras400k import demo_data

ROOT = Path(__file__).resolve().parent.parent  # the children run at the repository root


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10980, help="Tile side in pixels (S2 tile: 10980).")
    parser.add_argument(
        "--compress",
        choices=("deflate", "lzw", "none"),
        default="deflate",
        help="Compression of the generated GeoTIFFs (cloud-optimised GeoTIFFs are usually compressed).",
    )
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each side; the fastest counts.")
    parser.add_argument("--tmp_dir", default=None, help="Where to generate the tile (default: system temp).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor", nargs=2, metavar=("S2", "MAP"), help=argparse.SUPPRESS)
    parser.add_argument("--floor_files", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--generate", metavar="FOLDER", help=argparse.SUPPRESS)
    return parser


def generate_tile(folder, size, compress, seed):
    """A land-cover field of ~300 px Voronoi-like cells and S2 DNs that follow it, with texture."""
    import cv2
    import rasterio

    rng = np.random.default_rng(seed)
    land_codes = np.array([10, 20, 30, 40, 50, 60, 90, 95, 100], dtype=np.uint8)  # no water, no no-data
    coarse = rng.choice(land_codes, size=(size // 300 + 2, size // 300 + 2)).astype(np.uint8)
    means = np.zeros((256, 4), np.float32)
    for code in land_codes:
        means[code] = demo_data.DEMO_BAND_MEANS[code]
    # Smooth brightness over ~64 px, interpolated strip by strip (the full field would be ~0.5 GB).
    coarse_brightness = rng.normal(1.0, 0.15, (size // 64 + 3, size // 64 + 3)).astype(np.float32)
    res = 1.0 / 12000  # the release's grid: EPSG:4326, 1/12000 degree, image and map aligned
    transform = rasterio.Affine(res, 0, 27.0, 0, -res, 39.0)
    options = {"tiled": True, "blockxsize": 512, "blockysize": 512}
    if compress != "none":
        options.update(compress=compress, predictor=2, num_threads="ALL_CPUS")
    s2_path = folder / "S2RGB_2021" / "ESA_WorldCover_10m_2021_v200_N36E027_S2RGBNIR.tif"
    map_path = folder / "worldcover_2021" / "ESA_WorldCover_10m_2021_v200_N36E027_Map.tif"
    s2_path.parent.mkdir(parents=True)
    map_path.parent.mkdir(parents=True)
    common = {"driver": "GTiff", "width": size, "height": size, "crs": "EPSG:4326", "transform": transform}
    with (
        rasterio.open(s2_path, "w", count=4, dtype="uint16", **common, **options) as s2,
        rasterio.open(map_path, "w", count=1, dtype="uint8", **common, **options) as label_map,
    ):
        for top in range(0, size, 512):
            rows = min(512, size - top)
            r = np.arange(top, top + rows)[:, None]
            c = np.arange(size)[None, :]
            # Cells with wavy edges: the coarse grid index, shifted by a smooth offset.
            cell_r = np.clip((r + 40 * np.sin(c / 97.0)) // 300, 0, coarse.shape[0] - 1).astype(int)
            cell_c = np.clip((c + 40 * np.sin(r / 83.0)) // 300, 0, coarse.shape[1] - 1).astype(int)
            codes = coarse[cell_r, cell_c]
            band = coarse_brightness[top // 64 : (top + rows) // 64 + 2]
            brightness = cv2.resize(
                band, (band.shape[1] * 64, band.shape[0] * 64), interpolation=cv2.INTER_LINEAR
            )[top % 64 : top % 64 + rows, :size]
            pixels = means[codes].transpose(2, 0, 1) * brightness
            pixels += rng.normal(0, 40, pixels.shape).astype(np.float32)
            s2.write(np.clip(pixels, 1, 10000).astype(np.uint16), window=((top, top + rows), (0, size)))
            label_map.write(codes[None], window=((top, top + rows), (0, size)))
    return s2_path, map_path


def run_floor(s2_path, map_path, files_folder=None):
    """Read every window of both rasters and encode the two PNGs; nothing else.

    With `files_folder`, also write the two PNGs as new files (plain writes): the part of the cost
    that any tool producing this layout pays, reported beside the floor for context.
    """
    import cv2
    import rasterio

    from common.aras400k import classes
    from common.raster import patch_windows

    count = 0
    with rasterio.Env(GDAL_CACHEMAX=256), rasterio.open(s2_path) as s2, rasterio.open(map_path) as label_map:
        for _, _, window in patch_windows(s2.height, s2.width, 256):
            pixels = s2.read(window=window)
            labels = label_map.read(1, window=window)
            bgr = cv2.merge([pixels[2], pixels[1], pixels[0]])
            image = cv2.convertScaleAbs(bgr, alpha=255.0 / max(int(pixels[:3].max()), 1))
            image_png = cv2.imencode(".png", image)[1]
            mask_png = cv2.imencode(
                ".png", cv2.LUT(cv2.merge([labels, labels, labels]), classes.CODE_TO_BGR)
            )[1]
            if files_folder:
                for kind, data in (("image", image_png), ("mask", mask_png)):
                    with open(f"{files_folder}/{count}_{kind}.png", "wb") as file:
                        file.write(data)
            count += 1
    print(f"floor patches: {count}")


def timed_child(command):
    """Wall seconds, (user, system) CPU seconds, peak RSS (MB) and output of one child process."""
    started = time.perf_counter()
    environment = dict(os.environ, PYTHONPATH=str(ROOT))  # the floor imports the ARAS400k colour table
    process = subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{output[-2000:]}")
    return seconds, (usage.ru_utime, usage.ru_stime), usage.ru_maxrss / 1024, output


def main(args):
    if args.floor:
        run_floor(*args.floor, files_folder=args.floor_files)
        return
    if args.generate:
        generate_tile(Path(args.generate), args.size, args.compress, args.seed)
        return
    folder = Path(tempfile.mkdtemp(prefix="dataset_creator_bench_", dir=args.tmp_dir))
    try:
        started = time.perf_counter()
        # Generated in a child: a child's peak RSS starts from its parent's at fork, so the parent
        # must stay small for the peak memory of the timed children to be their own.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.dataset_creator_speed",
                "--generate",
                str(folder),
                "--size",
                str(args.size),
                "--compress",
                args.compress,
                "--seed",
                str(args.seed),
            ],
            check=True,
            cwd=ROOT,
        )
        s2_path = folder / "S2RGB_2021" / "ESA_WorldCover_10m_2021_v200_N36E027_S2RGBNIR.tif"
        map_path = folder / "worldcover_2021" / "ESA_WorldCover_10m_2021_v200_N36E027_Map.tif"
        sizes = [p.stat().st_size / 2**20 for p in (s2_path, map_path)]
        print(
            f"tile {args.size} x {args.size} x 4 uint16 ({args.size**2 * 8 / 2**30:.2f} GiB raw), "
            f"{args.compress}: S2 file {sizes[0]:.0f} MB, map {sizes[1]:.0f} MB, generated in "
            f"{time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f} on "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
        patches = (args.size // 256) ** 2
        floor_command = [
            sys.executable,
            "-m",
            "bench.dataset_creator_speed",
            "--floor",
            str(s2_path),
            str(map_path),
        ]
        sides = ("floor", "floor+files", "ours")
        fastest, least_cpu, peak = (
            dict.fromkeys(sides, float("inf")),
            dict.fromkeys(sides, float("inf")),
            dict.fromkeys(sides, 0.0),
        )
        rows = {side: measure.Row("tile to patches", side, 1, patches, "patches") for side in sides}
        for repeat in range(args.repeats):
            out = folder / f"out{repeat}"
            commands = {
                "floor": floor_command,
                "floor+files": [*floor_command, "--floor_files", str(out)],
                "ours": [
                    sys.executable,
                    "dataset_creator.py",
                    "--s2_dir",
                    str(s2_path.parent),
                    "--map_dir",
                    str(map_path.parent),
                    "--out",
                    str(out),
                    "--workers",
                    "1",
                    "--split",
                    "none",
                ],
            }
            for side in sides:
                out.mkdir(exist_ok=side != "ours")
                seconds, (user, system), peak_mb, output = timed_child(commands[side])
                if side == "ours":
                    print("  " + output.strip().splitlines()[-1])
                shutil.rmtree(out)
                print(
                    f"{side} run {repeat + 1}: {seconds:.1f} s wall, {user + system:.1f} s CPU "
                    f"(user {user:.1f}, system {system:.1f}), {patches / seconds:.1f} patches/s, "
                    f"peak RSS {peak_mb:.0f} MB, "
                    f"load average {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
                rows[side].samples.append(measure.Sample(seconds, user + system, *measure.load_and_steal()))
                fastest[side] = min(fastest[side], seconds)
                least_cpu[side] = min(least_cpu[side], user + system)
                peak[side] = max(peak[side], peak_mb)
        for side in sides:
            print(
                f"{side}: fastest {fastest[side]:.1f} s wall ({patches / fastest[side]:.1f} patches/s), "
                f"least {least_cpu[side]:.1f} s CPU "
                f"({patches / least_cpu[side]:.1f} patches per CPU second), "
                f"peak RSS {peak[side]:.0f} MB"
            )
        print(f"ours/(floor+files): {least_cpu['ours'] / least_cpu['floor+files']:.3f} (CPU seconds)")
        # CPU seconds are the headline: on a shared machine the wall clock also counts other jobs.
        print(
            f"ours/floor: {least_cpu['ours'] / least_cpu['floor']:.3f} (CPU seconds; wall-clock ratio "
            f"{fastest['ours'] / fastest['floor']:.3f})"
        )
        measure.report(list(rows.values()))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
