"""The flags of train_multilabel_model.py, which test_multilabel_model.py and meta_parameters_tuning.py share.

A module of its own that loads no framework, so each of the three scripts answers `--help` before
TensorFlow loads.
"""

from common import cli, precision, progress, tensorboard

BASELINES = ("full", "an", "an_ls", "wan", "epr", "role", "em", "em_apl", "ll_r", "ll_ct", "ll_cp")
METHODS = (*BASELINES, "adagc")
SPML_MODES = ("random", "dominant", "manual")
DATASETS = ("aid", "benv2", "features")
SELECTION_LABELS = ("full", "observed")
GC_MODES = ("target", "scale")
GC_TARGETS = ("soft", "hard", "sharpen")
BACKBONES = ("resnet50", "small_cnn", "mlp", "linear")

# Defaults are the paper's values (docs/adagc.md explains the reconstructed ones).
# Rows: flag, default, help[, choices].
FLAGS = {
    "data": (
        ("--dataset", "aid", "Dataset layout to read (features: a .npz of vectors).", DATASETS),
        ("--features", "", "--dataset features: .npz with features, labels, split[, observed, class_names]."),
        (
            "--data_dir",
            "data/AID_multilabel",
            "Dataset folder (docs/adagc.md, Data; --demo: the generated one).",
        ),
        (
            "--single_positive",
            "random",
            "Observed positive: random, dominant (by area) or manual.",
            SPML_MODES,
        ),
        ("--lmdb_path", "", "BigEarthNet v2 LMDB (empty: <data_dir>/lmdb)."),
        ("--metadata", "", "BigEarthNet v2 metadata.parquet (empty: <data_dir>/metadata.parquet)."),
        ("--class_fractions", "", "Area fractions for dominant (empty: the LMDB's reference maps)."),
        ("--bands", "B04,B03,B02,B08", "Sentinel-2 bands read from the LMDB; 20/60 m bands are resampled."),
        ("--drop_snow_cloud", True, "Drop BigEarthNet patches flagged with seasonal snow or cloud/shadow."),
        ("--val_fraction", 0.1, "AID: seeded share of images_tr that selects the best epoch."),
        (
            "--selection_labels",
            "full",
            "Validation labels of the best epoch (full: SPML protocol).",
            SELECTION_LABELS,
        ),
    ),
    "model and optimisation": (
        (
            "--backbone",
            "resnet50",
            "resnet50 (the paper's), small_cnn (CPU demos), mlp or linear (feature vectors).",
            BACKBONES,
        ),
        ("--weights", "", "Local Keras weights file for the backbone (empty: random initialisation)."),
        ("--image_size", 0, "Input size; 0 = the dataset's paper size: 224 AID, 120 BigEarthNet."),
        ("--augment", True, "Random flips and 90-degree rotations."),
        ("--optimizer", "adam", "Optimizer.", ("adam", "adamw")),
        (
            "--optimizer_convention",
            "torch",
            "Adam/AdamW update: torch (epsilon after the bias correction, as the reference) or keras.",
            cli.OPTIMIZER_CONVENTIONS,
        ),
        ("--adam_epsilon", 1e-8, "Adam/AdamW epsilon (torch's default 1e-8; Keras's is 1e-7)."),
        ("--learning_rate", 1e-4, "Learning rate."),
        ("--weight_decay", 1e-4, "Weight decay (adamw only)."),
        ("--batch_size", 64, "Global batch size."),
        ("--epochs", 30, "Training epochs."),
    ),
    "method": (
        ("--method", "adagc", "Loss / training scheme.", METHODS),
        ("--label_smoothing", 0.1, "AN-LS smoothing (Cole et al.)."),
        (
            "--expected_num_positives",
            0.0,
            "EPR / ROLE prior: the data's mean positives per image (required).",
        ),
        ("--role_lr_multiplier", 10.0, "ROLE: learning-rate multiplier of the label estimator."),
        ("--em_alpha", 0.1, "EM: weight of the entropy term."),
        ("--apl_beta", 0.4, "EM+APL: weight of the pseudo-label term."),
        ("--neg_proportion", 0.9, "EM+APL: share of each class's unobserved labels made soft negatives."),
        ("--warmup_epoch", 5, "EM+APL: first epoch after which soft negatives are assigned."),
        (
            "--delta_rel",
            0.2,
            "LL-R/Ct/Cp: percent of unobserved labels added to the rejection set per epoch.",
        ),
    ),
    "AdaGC (reconstructed)": (
        ("--teacher_a_decay", 0.999, "Step 2: EMA decay of teacher A, updated every iteration."),
        ("--teacher_b_decay", 0.99, "Step 2: EMA decay of teacher B, updated every epoch."),
        (
            "--teacher_init",
            "start",
            "Step 2: teachers start as the initial student (start) or as the student at the rollback "
            "target, then follow it with the constant decays (at_trigger).",
            ("start", "at_trigger"),
        ),
        (
            "--teacher_ramp",
            "mean_teacher",
            "Step 2: decay min(decay, (1+t)/(10+t)) (mean_teacher) or the decay as set (constant).",
            ("mean_teacher", "constant"),
        ),
        (
            "--trigger",
            "fit",
            "Step 3: AIO2's rule (slopes over windows 3-5 and a buffer: survives a pause) or one curve fit.",
            ("aio2", "fit"),
        ),
        ("--trigger_ratio", 0.9, "Step 3: trigger once the fitted slope fell by this share of its peak."),
        ("--trigger_min_epochs", 3, "Step 3: epochs of agreement needed before the curve is fitted."),
        ("--trigger_dip", 0.01, "Step 3: a fall of the agreement this far below its maximum is a pause."),
        ("--trigger_patience", 2, "Step 3: later epochs that must confirm a detected end of early learning."),
        (
            "--rollback_window",
            10,
            "Step 3: per-epoch warm-up checkpoints kept for the rollback (AIO2 detects epochs late).",
        ),
        ("--gc_start_epoch", 0, "Start Gradient Calibration after this epoch (0 = adaptive trigger)."),
        (
            "--gc_target",
            "soft",
            "Step 4: pseudo label as it is (soft), thresholded at 0.5 (hard), or sharpened (T = 0.5).",
            GC_TARGETS,
        ),
        ("--gc_mode", "target", "Step 4: pseudo label as target, or AN gradient x (1 - pseudo).", GC_MODES),
        ("--mixup_alpha", 0.2, "Step 5: Beta(alpha, alpha) mixup during Gradient Calibration (0 = off)."),
    ),
}


def get_args_parser():
    parser = cli.Parser(description="AdaGC and the SPML baselines.", config_flag=True)
    cli.add_demo_argument(parser, "(an AID-like set; about a minute on a CPU).")
    parser.add_argument("--test_only", action="store_true", help="Re-evaluate the run's best model.")
    for title, rows in FLAGS.items():
        group = parser.add_argument_group(title)
        for flag, default, text, *choices in rows:
            kind = cli.str2bool if isinstance(default, bool) else type(default)
            choices = choices[0] if choices else None
            group.add_argument(flag, type=kind, default=default, choices=choices, help=text)
    cli.add_strategy_argument(parser)
    parser.add_argument("--demo_images", type=int, default=480, help="Images generated by --demo.")
    cli.add_run_arguments(parser)
    precision.add_argument(parser)
    tensorboard.add_argument(parser)
    progress.add_argument(parser)
    parser.demo_defaults(backbone="small_cnn", image_size=48, epochs=10, batch_size=16, learning_rate=3e-3)
    parser.demo_defaults(teacher_a_decay=0.99, rollback_window=2, expected_num_positives=3.75)
    return parser
