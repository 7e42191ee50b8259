"""The flag groups that two igarss scripts share: the exp1 projection heads and the exp2 task heads.

A module of its own that loads no framework, so each script answers `--help` before TensorFlow loads.
"""

from common import progress as progress_bars
from common import tensorboard
from common.tgmatl import awir

MODEL_SELECTIONS = ("reference", "matl_val", "last")


def add_projection_head_arguments(parser, demo_help):
    """Flags of igarss_exp1.py and igarss_exp1_sweep.py (the reference repository's names)."""
    awir.add_protocol_arguments(parser, demo_help)
    parser.add_argument("--margin", type=float, default=0.1, help="Triplet margin m (paper: 0.1).")
    parser.add_argument(
        "--box_weight",
        type=float,
        default=0.5,
        help="MATL weight w of the box-cluster triplet term: (1-w) L_class + w L_box.",
    )
    parser.add_argument(
        "--top_percent",
        type=float,
        default=0.3,
        help="TG-MATL: share of each class kept by score.",
    )
    parser.add_argument(
        "--random_percent",
        type=float,
        default=0.1,
        help="TG-MATL: extra share of each class.",
    )
    parser.add_argument(
        "--extra_selection",
        default="ranked",
        choices=("ranked", "random"),
        help="TG-MATL extra samples: next-ranked (reference) or a seeded uniform draw among the rest.",
    )
    parser.add_argument(
        "--model_selection",
        default="reference",
        choices=MODEL_SELECTIONS,
        help="Weights kept: best validation value of the head's own training loss (reference), of the "
        "unmasked MATL loss for TG-MATL heads (matl_val; others as reference), or the last epoch's.",
    )
    return parser


def add_task_head_arguments(parser, demo_help):
    """Flags shared by igarss_exp2.py and igarss_exp2_sweep.py; --demo trains 100 epochs at 3e-3."""
    awir.add_protocol_arguments(parser, demo_help)
    parser.add_argument(
        "--folds",
        type=int,
        nargs="+",
        default=list(range(1, awir.NUM_FOLDS + 1)),
        help="Folds to train (default all 8; a subset is for quick checks).",
    )
    tensorboard.add_argument(parser)
    progress_bars.add_argument(parser)
    # Demo: fewer epochs with a 30x learning rate, so the heads converge in about a minute.
    parser.demo_defaults(epochs=100, learning_rate=3e-3)
    return parser
