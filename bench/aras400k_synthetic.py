"""ARAS400k's synthetic-data claim as a bench: SegFormer on real, generated and real + generated patches.

The paper trains SegFormer on real patches, on images a generator drew from the training masks, and
on both, and reads the test macro F1. Here, for each setting (all real training patches, and a
low-data one with only `--low_data` real patches but every mask), a SPADE GAN
(generative_trainer_unet_spade_gan.py) is trained on that setting's real patches and draws one image
per mask; segmentation_train.py then trains on real / generated / real + generated for each of
`--seeds` seeds, and the paired table (common/reports.paired_rows) compares real + generated with
real and generated with real: per-seed difference of test macro F1, its mean with a 95 % t interval,
wins, and the Wilcoxon signed-rank p where n allows. A difference is "sure" only where the interval
excludes 0.

The data are the demo generator's seeded patches (common/aras400k/demo_data.py) at `--patches`
training patches, or a dataset root in the segmentation layout (`--data_root`).

    python -m bench.aras400k_synthetic                        # small scale, about 15 minutes on a CPU
    python -m bench.aras400k_synthetic --seeds 2 --patches 48 --seg_epochs 4   # reduced
    # the paper's scale on a GPU (ARAS400k from dataset_creator.py, 256 px, full widths, B7 encoder):
    python -m bench.aras400k_synthetic --data_root ARAS400k --image_size 256 --width_divisor 1 \
        --gan_epochs 20 --gan_batch_size 50 --encoder efficientnetb7 --decoder_width 256 \
        --seg_epochs 20 --batch_size 24 --low_data 1000 --seeds 5

Outputs under `--results_dir` (default results/bench_aras400k_synthetic): the settings' datasets, the
GAN and segmentation runs, and paired.md / per_seed.json; the last lines printed are the table.
"""

import json
import shutil
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import generative_trainer_unet_spade_gan as gan
import segmentation_train as seg
from common import atomic, cli, reports
from common.aras400k import demo_data, patches
from common.errors import cli_entry, require

TRAINING_SETS = {"real": "train", "generated": "gen", "real+generated": "train gen"}
PAIRS = [("real+generated", "real"), ("generated", "real")]


def get_args_parser():
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data_root", default="", help="A dataset root in the segmentation layout (default: demo patches).")
    add("--patches", type=int, default=96, help="Demo data: training patches (val and test a third each).")
    add("--image_size", type=int, default=64, help="Patch side; a multiple of 32.")
    add("--low_data", type=int, default=12, help="Real training patches of the low-data setting (0: none).")
    add("--seeds", type=int, default=3, help="Segmentation seeds per training set (the paired n).")
    add("--gan_epochs", type=int, default=20, help="SPADE GAN epochs per setting.")
    add("--gan_batch_size", type=int, default=16, help="SPADE GAN batch size.")
    add("--width_divisor", type=int, default=16, help="SPADE GAN widths divided by this (1 = the paper's).")
    add("--encoder", default="efficientnetb0", choices=seg.ENCODERS, help="SegFormer encoder.")
    add("--decoder_width", type=int, default=64, help="SegFormer decoder channels (the paper's 256).")
    add("--seg_epochs", type=int, default=8, help="Segmentation epochs per run.")
    add("--batch_size", type=int, default=8, help="Segmentation batch size.")
    add("--results_dir", default="results/bench_aras400k_synthetic", help="Where everything is written.")
    return parser


def setting_root(source, target, real_count):
    """A dataset root with `real_count` real training pairs (all: 0), every training mask under
    allmasks/masks, and val/test as in `source`. Re-used when present."""
    if (target / "setting.json").exists():
        return target
    first_image = next((Path(source) / "train" / "images").glob("*.png"))
    train = patches.list_split(source, "train", patches.png_size(first_image)[0])
    kept = train[:real_count] if real_count else train
    for split in ("val", "test"):
        shutil.copytree(source / split, target / split, dirs_exist_ok=True)
    for folder in ("train/images", "train/masks", "allmasks/masks", "gen/masks"):
        (target / folder).mkdir(parents=True, exist_ok=True)
    for image, mask in kept:
        shutil.copyfile(image, target / "train" / "images" / image.name)
        shutil.copyfile(mask, target / "train" / "masks" / mask.name)
    for _, mask in train:
        shutil.copyfile(mask, target / "allmasks" / "masks" / mask.name)
        shutil.copyfile(mask, target / "gen" / "masks" / mask.name)
    atomic.write_json(
        target / "setting.json", {"source": str(source), "real": len(kept), "masks": len(train)}
    )
    return target


def train_gan_and_generate(args, root, name):
    """The SPADE GAN on the setting's real pairs, then one image per mask of allmasks/ into gen/images."""
    if (root / "gen" / "images").is_dir() and len(list((root / "gen" / "images").glob("*.png"))) == len(
        list((root / "gen" / "masks").glob("*.png"))
    ):
        return
    argv = (
        f"--data_root {root} --image_size {args.image_size} --width_divisor {args.width_divisor} "
        f"--epochs {args.gan_epochs} --batch_size {args.gan_batch_size} --log_every 100000 --generate "
        f"--generate_split allmasks --generated_dir {root / 'gen' / 'images'} "
        f"--results_dir {Path(args.results_dir) / 'runs'} --run_name gan_{name} --overwrite"
    )
    gan.main(gan.get_args_parser().parse_args(argv.split()))


def train_segmentation(args, root, name, training_set, seed):
    """One segmentation run; returns its test metrics (a finished run is read back, not retrained)."""
    run_name = f"seg_{name}_{training_set.replace('+', '_')}_seed{seed}"
    metrics_path = Path(args.results_dir) / "runs" / "segmentation_train" / run_name / "metrics.json"
    if metrics_path.exists():
        return json.loads(metrics_path.read_text())["test"]
    argv = (
        f"--data_root {root} --image_size {args.image_size} --encoder {args.encoder} "
        f"--decoder_width {args.decoder_width} --epochs {args.seg_epochs} --batch_size {args.batch_size} "
        f"--bn_momentum 0.9 --seed {seed} --num_examples 1 --results_dir {Path(args.results_dir) / 'runs'} "
        f"--run_name {run_name} --overwrite --train_splits {TRAINING_SETS[training_set]}"
    )
    return seg.main(seg.get_args_parser().parse_args(argv.split()))["test"]


def paired_table(values):
    """The markdown paired table of every setting: test macro F1 in %, per seed."""
    rows = []
    for setting, methods in values.items():
        named = {f"{setting}: {method}": {"macro_f1": scores} for method, scores in methods.items()}
        pairs = [(f"{setting}: {first}", f"{setting}: {second}") for first, second in PAIRS]
        rows += reports.paired_rows(named, pairs, ["macro_f1"], digits=2)
    return reports.markdown_table(reports.PAIRED_HEADER, rows)


@cli_entry
def main(args):
    seg.require_image_size(args.image_size)
    require(args.seeds >= 1, "--seeds", f"is {args.seeds}", "at least 1")
    results = Path(args.results_dir)
    if args.data_root:
        source = Path(args.data_root)
    else:
        source = demo_data.write_demo_patches(results / "data", args.image_size, args.patches, seed=0)
    settings = {"all real": 0}
    if args.low_data:
        settings[f"{args.low_data} real"] = args.low_data
    values = {}
    for name, real_count in settings.items():
        folder = name.replace(" ", "_")
        root = setting_root(source, results / "settings" / folder, real_count)
        train_gan_and_generate(args, root, folder)
        values[name] = {
            training_set: [
                100 * train_segmentation(args, root, folder, training_set, seed)["macro_f1"]
                for seed in range(args.seeds)
            ]
            for training_set in TRAINING_SETS
        }
    atomic.write_json(results / "per_seed.json", values)
    table = paired_table(values)
    atomic.write_text(results / "paired.md", table + "\n")
    print("test macro F1 (%) per seed:")
    for name, methods in values.items():
        for method, scores in methods.items():
            print(f"  {name}: {method}: " + " ".join(f"{score:.2f}" for score in scores))
    print(table)
    return values


if __name__ == "__main__":
    main(get_args_parser().parse_args())
