"""Progress bars with rate and ETA (tqdm) on standard error, shown on a terminal or with --progress.

Standard output and log files stay clean: a bar never goes to standard output, and when standard
error is not a terminal (a log file, a batch job) the bar is off unless `--progress` asks for it.
"""

import argparse
import sys

from tqdm import tqdm


def add_argument(parser: argparse.ArgumentParser) -> None:
    """--progress: show the bars on standard error even when it is not a terminal."""
    parser.add_argument(
        "--progress",
        action="store_true",
        help="Progress bars with rate and ETA on stderr even when it is not a terminal (on one, always).",
    )


def shown(enabled: bool = False) -> bool:
    """Whether a bar shows: asked for (`--progress`), or standard error is a terminal."""
    return bool(enabled) or sys.stderr.isatty()


def bar(iterable=None, total=None, desc: str = "", enabled: bool = False, **options) -> tqdm:
    """`tqdm(iterable, total, desc)` on standard error, disabled unless `shown(enabled)`.

    A disabled bar still iterates and accepts `update`, `set_postfix` and `close`, so callers use it
    the same way either way. `options` go to tqdm (`initial`, `unit`, `leave`, ...).
    """
    options.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=not shown(enabled), **options)
