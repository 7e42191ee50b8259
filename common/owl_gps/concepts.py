"""Concepts and labels per patch: CSV tables, the tutorial's concepts.pkl (read without code), 0/1 labels.

A concepts table has one row per patch, keyed by `id` (the --data_dir layout) or by the patch grid
`row, col` (a tiled GeoTIFF), and a 0/1 column per concept. The tutorial's concepts are `land_cover`
(0 forest, 1 urban, 2 water, 3 agricultural) and `dist_industrial` in [0, 1] (0 = close); the
concepts the acquisition score weighs are derived from them when absent: `urban` = land_cover == 1,
`near_industrial` = dist_industrial < threshold (0.3). Concept flags may be written 0/1 or
true/false. The tutorial's concepts.pkl is read by an unpickler that refuses every class, so no
code in it can run. Every problem with a user's file is an InputError naming the file.
"""

import pickle
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from common.errors import InputError, require, require_file

if TYPE_CHECKING:
    import pandas as pd

_FLAG_WORDS = {"true": 1, "false": 0}


def read_binary_labels(values, path, what: str = "label") -> np.ndarray:
    """`values` as int64 0/1; any other value is an InputError naming its index.

    Args:
        values: the labels as read (a labels.npy array or a CSV column); 0.0 and 1.0 count as 0 and 1.
        path: the file they come from, named in the error.
        what: the word the error uses for one value.

    Returns:
        The labels `(N,)` int64.
    """
    values = np.asarray(values)
    bad = np.flatnonzero(~np.isin(values, (0, 1)))
    if len(bad):
        raise InputError(
            path, f"{what} {values[bad[0]].item()!r} at index {bad[0]} is not 0/1", "binary labels 0 or 1"
        )
    return values.astype(np.int64)


def read_keyed_csv(path, columns: Sequence[str]) -> "pd.DataFrame":
    """A CSV as a DataFrame with stripped column names; the listed columns must be present.

    Args:
        path: the CSV file; a missing or unparsable file is an InputError.
        columns: the column names it must have.

    Returns:
        The table, one row per CSV line.
    """
    import pandas as pd

    path = require_file(path, "a CSV file")
    try:
        table = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as error:
        first_line = str(error).splitlines()[0][:100]
        raise InputError(path, f"cannot be parsed as CSV ({first_line})", "a CSV") from None
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in columns if column not in table]
    require(not missing, path, f"missing column(s) {', '.join(missing)}", f"columns {', '.join(columns)}")
    return table


def integer_column(series: "pd.Series", path, column: str) -> np.ndarray:
    """A table column as int64; a non-integer cell is an InputError naming `path` and `column`."""
    import pandas as pd

    numeric = pd.to_numeric(series, errors="coerce")
    bad = np.flatnonzero(~(numeric.notna() & (numeric == numeric.round())).to_numpy())
    if len(bad):
        raise InputError(path, f"column {column} has {series.iloc[bad[0]]!r}", "integer ids")
    return numeric.to_numpy().astype(np.int64)


def read_concepts_table(
    path,
    key_columns: Sequence[str],
    concept_names: Sequence[str],
    threshold: float,
    table: "pd.DataFrame | None" = None,
) -> "pd.DataFrame":
    """A concepts CSV with 0/1 concept columns, one row per key; urban / near_industrial may be derived.

    `urban` = land_cover == 1 and `near_industrial` = dist_industrial < threshold when the columns
    are absent but their sources are present.

    Args:
        path: the concepts CSV (or the file `table` was read from, named in errors).
        key_columns: the columns that identify a patch: `("id",)` or `("row", "col")`.
        concept_names: the concept columns the acquisition score weighs, e.g. `urban, near_industrial`.
        threshold: the distance below which a patch is `near_industrial`.
        table: the already-read table of `path` (the tutorial's concepts.pkl), or None to read the CSV.

    Returns:
        The table with each named concept as an int 0/1 column; missing columns, values other than
        0/1 (or true/false) and duplicate keys are InputErrors.
    """
    import pandas as pd

    table = read_keyed_csv(path, ()) if table is None else table
    if "urban" not in table and "land_cover" in table:
        table["urban"] = (table["land_cover"] == 1).astype(int)
    if "near_industrial" not in table and "dist_industrial" in table:
        table["near_industrial"] = (table["dist_industrial"] < threshold).astype(int)
    wanted = (*key_columns, *concept_names)
    missing = [column for column in wanted if column not in table]
    require(
        not missing,
        path,
        f"missing column(s) {', '.join(missing)}",
        f"columns {', '.join(wanted)} (urban/near_industrial may be derived from land_cover/dist_industrial)",
    )
    for column in concept_names:
        values = table[column].map(lambda value: _FLAG_WORDS.get(str(value).strip().lower(), value))
        numeric = pd.to_numeric(values, errors="coerce")
        bad = np.flatnonzero(~numeric.isin((0, 1)).to_numpy())
        if len(bad):
            raise InputError(
                path,
                f"column {column} has {table[column].iloc[bad[0]]!r} on data row {bad[0] + 1}",
                "0/1 concept flags",
            )
        table[column] = numeric.astype(int)
    duplicated = table.duplicated(list(key_columns))
    if duplicated.any():
        key = tuple(table.loc[duplicated.idxmax(), list(key_columns)])
        raise InputError(path, f"duplicate key {key}", "one row per patch")
    return table


def concept_matrix(table: "pd.DataFrame", concept_names: Sequence[str]) -> np.ndarray:
    """The `(N, C)` boolean matrix of the named concept columns."""
    return np.stack([table[name].to_numpy().astype(bool) for name in concept_names], axis=1)


def align_by_location(table: "pd.DataFrame", locations: np.ndarray, path, what: str) -> "pd.DataFrame":
    """Reorder a (row, col)-keyed table to the kept patches; every kept patch must have a row.

    Args:
        table: a table with integer `row` and `col` columns (patch grid cells).
        locations: the kept patches' grid cells `(N, 2)`, in patch order.
        path: the table's file, named in errors.
        what: the word the error uses for one row (`concepts`, `label`).

    Returns:
        The rows of `table` for `locations`, in that order (rows of dropped patches are left out).
    """
    rows = integer_column(table["row"], path, "row")
    cols = integer_column(table["col"], path, "col")
    keyed = table.set_index([rows, cols])
    wanted = list(map(tuple, locations))
    missing = [key for key in wanted if key not in keyed.index]
    if missing:
        raise InputError(
            path,
            f"no {what} row for patch row={missing[0][0]}, col={missing[0][1]} "
            f"({len(missing)} patches missing)",
            "one row per kept patch, keyed by row, col",
        )
    return keyed.loc[wanted].reset_index(drop=True)


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only built-in containers, numbers and strings: any class reference is refused.

    Lists, tuples, dicts, ints, floats, bools, strings and None have pickle opcodes of their own;
    everything else (numpy arrays, objects, functions) needs `find_class`, which is where code could run.
    """

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_concepts_pickle(path) -> "pd.DataFrame":
    """The tutorial's concepts.pkl as a table with an `id` column, read by `_PlainDataUnpickler`.

    Accepted structures: a list of per-patch dicts (`[{"land_cover": 1, "dist_industrial": 0.2}, ...]`,
    patch i is list item i), a dict of equally long per-concept lists (`{"land_cover": [...], ...}`), or
    a dict from patch id to its concept dict. Any class in the file is refused with one line.
    """
    import pandas as pd

    expected = "a pickle of lists/dicts of plain numbers and strings (write numpy values with .tolist())"
    try:
        with open(path, "rb") as file:
            content = _PlainDataUnpickler(file).load()
    except pickle.UnpicklingError as error:
        raise InputError(
            path, f"holds a Python object of class {error}, refused (no code is run)", expected
        ) from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError) as error:
        raise InputError(
            path, f"is not a readable pickle ({type(error).__name__}: {error})", expected
        ) from None
    if isinstance(content, dict) and content and all(isinstance(v, dict) for v in content.values()):
        table = pd.DataFrame.from_dict(content, orient="index").rename_axis("id").reset_index()
    elif isinstance(content, dict) and all(isinstance(v, (list, tuple)) for v in content.values()):
        lengths = {len(values) for values in content.values()}
        require(
            len(lengths) == 1, path, f"has concept lists of lengths {sorted(lengths)}", "one value per patch"
        )
        table = pd.DataFrame(content)
    elif isinstance(content, (list, tuple)) and all(isinstance(row, dict) for row in content):
        table = pd.DataFrame(list(content))
    else:
        shape = "a list of per-patch dicts, a dict of per-concept lists, or a dict of id -> concept dict"
        raise InputError(path, f"holds a {type(content).__name__} of another layout", shape)
    if "id" not in table:
        table.insert(0, "id", np.arange(len(table)))
    table.columns = [str(column).strip() for column in table.columns]
    return table
