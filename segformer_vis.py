"""ARAS400k feature distributions: pooled encoder features of image folders, t-SNE, UMAP, silhouette.

Paper: U. M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language
Models" (ARAS400k; arXiv 2603.09625). The paper compares the feature distributions of real and
synthetic images (reference `segformer_vis.py`): the encoder's last stage is average-pooled per
image, the features are standardised, embedded in 2-D with t-SNE and UMAP, and the separability of
the folders is scored with silhouette scores (overall and for each pair of folders). Defaults are
the reference's: 50,000 images per folder, seed 42, t-SNE perplexity 30 (PCA init), UMAP
n_neighbors 15 / min_dist 0.1.

Commands:
    python segformer_vis.py --image_dirs ARAS400k/train/images ARAS400k/synth/images \
        ARAS400k/train/generated --labels Real Synthetic Generated \
        --model results/segmentation_train/efficientnetb7_dice_256px_train_seed0/best_model.keras
    python segformer_vis.py --demo     # two synthetic folders, untrained efficientnetb0, t-SNE only

Runtime: the demo takes about half a minute on a laptop CPU (UMAP's first run adds about half a
minute of numba compilation). Outputs in `results/segformer_vis/<run_name>/`: config.json, tsne.png,
umap.png, embedding.csv and silhouette.json; the last line printed is its summary; the demo prints
    silhouette: standardised features 0.0197 | t-SNE 0.0052 over 32 images
"""

from pathlib import Path

from common import cli


def get_args_parser():
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--image_dirs", nargs="+", default=[], metavar="DIR", help="Two or more folders of images to compare."
    )
    add(
        "--model",
        default="",
        help="A trained best_model.keras (segmentation_train.py) whose encoder is used.",
    )
    encoders = [f"efficientnetb{i}" for i in range(8)]
    add(
        "--encoder",
        default="efficientnetb7",
        choices=encoders,
        help="Without --model: the encoder to analyse.",
    )
    add("--weights", default="", help="Without --model: local Keras EfficientNet notop .h5 weights.")
    add("--image_size", type=int, default=256, help="Without --model: input side in pixels.")
    add(
        "--labels",
        nargs="+",
        default=[],
        help="One distinct name per --image_dirs folder (default: derived from the paths).",
    )
    add("--samples", type=int, default=50000, help="At most this many images per folder (the reference's).")
    add("--embeddings", nargs="+", default=["tsne", "umap"], choices=["tsne", "umap"], help="2-D embeddings.")
    add("--batch_size", type=int, default=24, help="Images per forward pass.")
    cli.add_demo_argument(parser, "(two folders of synthetic patches, about half a minute on a CPU).")
    cli.add_run_arguments(parser, resume=False)
    # The reference seeds t-SNE and UMAP with 42 (its folder subsample is unseeded).
    parser.set_defaults(seed=42)
    parser.demo_defaults(
        encoder="efficientnetb0", image_size=64, samples=16, embeddings=["tsne"], batch_size=8
    )
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import cv2
import keras
import numpy as np

from common import atomic, plots, runs
from common.aras400k import demo_data, efficientnet
from common.errors import InputError, cli_entry, require, require_dir, require_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
SPACE_NAMES = {"features": "standardised features", "tsne": "t-SNE", "umap": "UMAP"}


def read_rgb(path, image_size):
    """An image as float32 RGB in [0, 255], resized to `image_size` when it differs."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    require(image is not None, path, "cannot be decoded as an image", "a PNG, JPEG or TIFF RGB image")
    if image.shape[:2] != (image_size, image_size):
        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32)


def pooled_feature_extractor(args):
    """The encoder's last stage, average-pooled (the reference's feature); returns (model, input size)."""
    if args.model:
        path = require_file(args.model, "a best_model.keras file")
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as error:
            # A corrupt archive raises many kinds of errors (zipfile, h5py, json, Keras's own); Keras
            # reports a damaged .keras file that exists as "File not found", so that text is not shown.
            text = str(error).splitlines()[0][:100] if str(error) else ""
            reason = (
                "damaged or incomplete file"
                if "not found" in text.lower()
                else f"{type(error).__name__}: {text}"
            )
            raise InputError(
                path,
                f"cannot be read as a Keras model ({reason})",
                "a best_model.keras file written by segmentation_train.py",
            ) from None
        image_size = model.input_shape[1]
        require(
            isinstance(image_size, int) and any(layer.name == "stem_activation" for layer in model.layers),
            path,
            "holds no EfficientNet encoder",
            "a best_model.keras file written by segmentation_train.py",
        )
    else:
        source = f" with weights {args.weights}" if args.weights else " (random initialisation)"
        print(f"note: no --model given: analysing an untrained {args.encoder} encoder{source}")
        image_size = args.image_size
        model = efficientnet.build_encoder(args.encoder, image_size, args.weights)
    last_stage = efficientnet.encoder_pyramid(model, image_size)[-1]
    return keras.Model(model.input, keras.layers.GlobalAveragePooling2D()(last_stage)), image_size


def silhouette_scores(spaces, folder_of, labels, seed):
    """Silhouette score of the folder labels in each space, overall and for every pair of folders."""
    from sklearn.metrics import silhouette_score

    def silhouette(points, members):
        return float(silhouette_score(points[members], folder_of[members], random_state=seed))

    everyone = np.ones(len(folder_of), dtype=bool)
    scores = {
        "overall": {space: silhouette(points, everyone) for space, points in spaces.items()},
        "pairwise": {},
        "images_per_folder": {label: int((folder_of == i).sum()) for i, label in enumerate(labels)},
    }
    for first in range(len(labels)):
        for second in range(first + 1, len(labels)):
            members = np.isin(folder_of, [first, second])
            scores["pairwise"][f"{labels[first]} vs {labels[second]}"] = {
                space: silhouette(points, members) for space, points in spaces.items()
            }
    return scores


def embed(features, names, seed):
    """The 2-D t-SNE and/or UMAP embeddings of the standardised features."""
    from sklearn.manifold import TSNE

    count, embeddings = len(features), {}
    if "tsne" in names:
        perplexity = float(min(30.0, max(2.0, (count - 1) / 3)))
        embeddings["tsne"] = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=seed
        ).fit_transform(features)
    if "umap" in names:
        import umap

        reducer = umap.UMAP(n_neighbors=min(15, count - 1), min_dist=0.1, random_state=seed)
        embeddings["umap"] = reducer.fit_transform(features)
    return embeddings


def choose_samples(folders, labels, samples, seed):
    """Up to `samples` sorted image files per folder, drawn with one generator seeded by `seed`."""
    rng = np.random.default_rng(seed)
    chosen_files = []
    for folder, label in zip(folders, labels, strict=True):
        files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        require(files, folder, "holds no images", "PNG, JPEG or TIFF images")
        chosen = sorted(rng.choice(len(files), size=min(samples, len(files)), replace=False))
        chosen_files += [(files[index], label) for index in chosen]
        print(f"{label}: {len(chosen)} of {len(files)} images from {folder}")
    return chosen_files


def folder_labels(folders, given):
    """One distinct label per folder: `given`, else the shortest path tails that tell them apart.

    real/train/images and synth/train/images become real/train and synth/train (not train twice),
    so the silhouette scores never fail on merged labels after all the feature work.
    """
    if given:
        require(
            len(given) == len(folders), "--labels", f"has {len(given)} names", f"{len(folders)}, one a folder"
        )
        require(len(set(given)) == len(given), "--labels", f"repeats a name: {given}", "distinct names")
        return list(given)
    parts = [[part for part in Path(folder).resolve().parts if part != "images"] for folder in folders]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise InputError("--image_dirs", f"names the same folder twice: {folders}", "distinct folders")


def make_demo_folders(args):
    """Two folders of demo patches: "real" as generated, "synthetic" with a warmer, brighter cast."""
    root = cli.demo_data_dir(args, "segformer_vis")
    for name, seed in (("real", args.seed), ("synthetic", args.seed + 1)):
        demo_data.write_demo_patches(root / name, args.image_size, args.samples, seed)
    for path in sorted((root / "synthetic" / "train" / "images").glob("*.png")):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR).astype(np.int16)
        image[..., 2] += 40  # OpenCV's channel 2 is red.
        cv2.imwrite(str(path), np.clip(image + 10, 0, 255).astype(np.uint8))
    return [str(root / name / "train" / "images") for name in ("real", "synthetic")]


def plot_embeddings(run_dir, embeddings, folder_of, labels, scores):
    plt = plots.pyplot()
    for name, points in embeddings.items():
        figure, axis = plt.subplots(figsize=(6, 5))
        for index, label in enumerate(labels):
            axis.scatter(*points[folder_of == index].T, s=6, alpha=0.7, label=label)
        axis.set_title(
            f"{name.upper()} of pooled encoder features (silhouette {scores['overall'][name]:.3f})"
        )
        axis.legend()
        plots.save(figure, run_dir / f"{name}.png")


def write_embedding_csv(path, samples, embeddings):
    rows = [{"file": str(file), "folder": label} for file, label in samples]
    for name, points in embeddings.items():
        for row, point in zip(rows, points, strict=True):
            row.update({f"{name}_x": float(point[0]), f"{name}_y": float(point[1])})
    atomic.write_csv(path, rows, list(rows[0]))


def check_arguments(args):
    """The numeric flags, checked before anything (the demo's folders included) is written."""
    for flag, value in (("--samples", args.samples), ("--batch_size", args.batch_size)):
        require(value >= 1, flag, f"is {value}", "a positive number")
    require(
        args.image_size % 32 == 0 and 32 <= args.image_size <= 8192,
        "--image_size",
        f"is {args.image_size}",
        "a multiple of 32 from 32 to 8192",
    )
    require(0 <= args.seed < 2**32, "--seed", f"is {args.seed}", "0 to 2**32 - 1")


@cli_entry
def main(args):
    from sklearn.preprocessing import StandardScaler

    check_arguments(args)
    if args.demo and not args.image_dirs:
        args.image_dirs = make_demo_folders(args)
    require(len(args.image_dirs) >= 2, "--image_dirs", f"got {len(args.image_dirs)} folder(s)", "two or more")
    folders = [require_dir(folder, "a folder of images") for folder in args.image_dirs]
    if args.demo and not args.labels:
        args.labels = [Path(folder).parents[1].name for folder in args.image_dirs]
    labels = folder_labels(folders, args.labels)
    runs.seed_everything(args.seed, args.deterministic)
    runs.print_args(args)

    # ---- data ----
    samples = choose_samples(folders, labels, args.samples, args.seed)
    extractor, image_size = pooled_feature_extractor(args)
    run_name = args.run_name or ("demo" if args.demo else "_vs_".join(labels).replace("/", "-")[:80])
    runs_folder = Path(args.results_dir) / "segformer_vis" / run_name
    require(
        args.overwrite or not (runs_folder / "silhouette.json").exists(),
        runs_folder,
        "a finished run with this name exists",
        "--overwrite to replace it, or another --run_name",
    )

    # ---- features (every image read before the run folder is made: a bad one leaves nothing) ----
    features = []
    for start in range(0, len(samples), args.batch_size):
        batch = np.stack([read_rgb(path, image_size) for path, _ in samples[start : start + args.batch_size]])
        features.append(np.asarray(extractor.predict_on_batch(batch), dtype=np.float64))
    features = StandardScaler().fit_transform(np.concatenate(features))
    folder_of = np.array([labels.index(label) for _, label in samples])
    run_dir = runs.prepare_run_dir(
        args.results_dir, "segformer_vis", run_name, args.overwrite, finished_marker="silhouette.json"
    )
    runs.write_config(run_dir, args, image_size=image_size, samples=len(samples))

    # ---- embed and score ----
    embeddings = embed(features, args.embeddings, args.seed)
    scores = silhouette_scores({"features": features, **embeddings}, folder_of, labels, args.seed)
    plot_embeddings(run_dir, embeddings, folder_of, labels, scores)
    write_embedding_csv(run_dir / "embedding.csv", samples, embeddings)
    overall = " | ".join(f"{SPACE_NAMES[space]} {score:.4f}" for space, score in scores["overall"].items())
    scores["summary"] = f"silhouette: {overall} over {len(samples)} images"
    atomic.write_json(run_dir / "silhouette.json", scores)
    print(f"wrote {run_dir}")
    print(scores["summary"])
    return scores


if __name__ == "__main__":
    main(get_args_parser().parse_args())
