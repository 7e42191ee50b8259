"""Re-evaluate a trained AdaGC / SPML run on the full-label test set (the AdaGC repository's test script).

Paper: C. Liu, G. Perantoni, L. Bruzzone, X. X. Zhu, "Adaptive Gradient Calibration for Single-Positive
Multi-Label Learning in Remote Sensing Image Scene Classification", arXiv 2510.08269. Takes the config that
trained the run; the run folder is `<results_dir>/train_multilabel_model/<run name>` (the config's stem,
or --run_name). The data are read with the settings saved in the run's config.json, the best
validation epoch's `best_model.keras` is scored (mAP, micro AP, macro / micro F1, per class), and the
result is compared with the run's own metrics.json. The code is shared with
`train_multilabel_model.py --test_only` (common/spml/evaluation.py).

    python test_multilabel_model.py -c configs/adagc_aid_random.yaml
    python test_multilabel_model.py --demo     # after train_multilabel_model.py --demo (seconds)

Writes test_only_metrics.json and test_only_per_class.csv into the run folder and ends with the trainer's
summary line; after the trainer's demo (one CPU run; the figures depend on the CPU, the match is bit for
bit on the same machine):
    run folder: results/train_multilabel_model/demo_adagc
    test metrics match results/train_multilabel_model/demo_adagc/metrics.json
    test mAP 0.6869 | micro AP 0.5505 | macro F1 0.2305 | micro F1 0.4126 | method adagc | trigger epoch 5
"""

from pathlib import Path

from common import cli
from common.spml import flags


def get_args_parser():
    """The trainer's parser, so that every training config is accepted as it is."""
    parser = flags.get_args_parser()
    parser.description = "Re-evaluate a trained SPML run (its best_model.keras) on the full-label test set."
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import train_multilabel_model as trainer
from common import runs
from common.errors import cli_entry
from common.spml import evaluation


@cli_entry
def main(args):
    args = trainer.resolve_derived(args)
    runs.seed_everything(args.seed, args.deterministic)
    run_dir = Path(args.results_dir) / trainer.SCRIPT_STEM / args.run_name
    print(f"run folder: {run_dir}")
    return evaluation.evaluate_run(args, run_dir, trainer.load_data, trainer.make_loader)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
