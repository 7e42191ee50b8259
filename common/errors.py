"""User-facing errors: `InputError`, the `require*` checks and `cli_entry` (one line, exit 2).

A user mistake (missing file, wrong shape, NaN, unknown class) raises `InputError`; the `cli_entry`
decorator on each script's `main` turns it into one line on stderr,
`error: <file>: <what is wrong>; expected <what>`, and exit code 2, with no traceback. Bugs in our
own code still raise normally.
"""

import functools
import math
import sys
from pathlib import Path

import numpy as np


class InputError(Exception):
    """A problem with the user's input, reported as one line: file, what is wrong, what was expected."""

    def __init__(self, path, problem: str, expected: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.expected = expected
        message = f"{self.path}: {problem}"
        if expected:
            message += f"; expected {expected}"
        super().__init__(message)

    def __reduce__(self):
        # Keeps the three fields when the error crosses a process boundary (worker pools).
        return (InputError, (self.path, self.problem, self.expected))


def require(condition, path, problem: str, expected: str | None = None) -> None:
    """Raise `InputError(path, problem, expected)` unless `condition` holds."""
    if not condition:
        raise InputError(path, problem, expected)


def require_in_range(args, flag: str, low, high=None, low_open: bool = False) -> None:
    """`args.<flag>` is a finite number in [low, high] ((low, high] with `low_open`; no upper bound when
    `high` is None), else InputError naming `--<flag>`, its value and the range."""
    value = getattr(args, flag)
    above = value > low if low_open else value >= low
    inside = math.isfinite(value) and above and (high is None or value <= high)
    bracket = "(" if low_open else "["
    expected = (
        f"a value in {bracket}{low}, {high}]"
        if high is not None
        else f"a value {'>' if low_open else '>='} {low}"
    )
    require(inside, f"--{flag}", f"is {value}", expected)


def require_file(path, expected: str = "an existing file") -> Path:
    """Return `path` as a Path if it is an existing file, else raise InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a regular file", expected)
    return path


def require_dir(path, expected: str = "an existing folder") -> Path:
    """Return `path` as a Path if it is an existing folder, else raise InputError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "folder not found" if not path.exists() else "not a folder", expected)
    return path


def require_finite(array, path, what: str = "values") -> None:
    """Raise InputError naming the first non-finite entry of `array`."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        first_bad = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        index = first_bad[0] if len(first_bad) == 1 else first_bad
        raise InputError(path, f"{what} contain NaN or Inf (first at index {index})", "finite numbers")


def cli_entry(main_function):
    """Decorate a script's `main(args)`: InputError -> one line on stderr and exit 2, no traceback."""

    @functools.wraps(main_function)
    def wrapper(*args, **kwargs):
        try:
            return main_function(*args, **kwargs)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print(
                "error: interrupted; finished outputs are kept, re-run (with --resume where the "
                "script has it) to continue",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(130)

    return wrapper
