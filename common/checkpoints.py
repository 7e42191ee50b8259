"""Resumable training state: named arrays in one `.npz`, keyed by variable path, with `state.json` last.

`save` writes `<folder>/<name>.npz` first and then `state.json` (the caller's counters plus the
checkpoint's name), so an interruption at any moment leaves `state.json` naming a complete file;
the oldest checkpoints beyond `keep` are removed afterwards. Arrays are keyed by a group and each
variable's Keras path (`model/dense/kernel`, `optimizer/adam/iteration`), so a checkpoint from
another model is refused with the names that do not match rather than loaded by position.
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from common.atomic import save_npz, write_json
from common.errors import InputError, require

STATE_FILE = "state.json"


def variable_key(group: str, variable, strip: Sequence[str] = ()) -> str:
    """`group/<variable path>`; Keras 3 variables carry a path such as `model_name/dense/kernel`.

    Leading parts listed in `strip` (the model's own automatic name, the optimizer's name) are
    dropped, so that a second build of the same model gets the same keys.
    """
    path = getattr(variable, "path", None) or variable.name
    for prefix in strip:
        if path.startswith(prefix):
            path = path[len(prefix) :]
    return f"{group}/{path}"


def variable_arrays(group: str, variables: Sequence, strip: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The current values of `variables` as `{group/path: array}` (model.variables, optimizer.variables)."""
    arrays = {}
    for variable in variables:
        key = variable_key(group, variable, strip)
        if key in arrays:
            raise ValueError(f"two variables share the checkpoint key {key!r}")
        arrays[key] = np.asarray(variable)
    return arrays


def assign_arrays(
    arrays: Mapping[str, np.ndarray], group: str, variables: Sequence, source, strip: Sequence[str] = ()
) -> None:
    """Assign the stored `{group/path: array}` values to `variables`; a mismatch is an InputError."""
    wanted = {variable_key(group, variable, strip): variable for variable in variables}
    stored = {key for key in arrays if key.startswith(group + "/")}
    missing, extra = sorted(set(wanted) - stored), sorted(stored - set(wanted))
    if missing or extra:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "") if missing else "",
                f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else "") if extra else "",
            )
            if part
        )
        raise InputError(
            source, f"does not match this run's {group} ({detail})", "a checkpoint of the same settings"
        )
    for key, variable in wanted.items():
        value = arrays[key]
        require(
            tuple(value.shape) == tuple(variable.shape),
            source,
            f"{key} has shape {tuple(value.shape)}",
            f"{tuple(variable.shape)}, as in this run's model",
        )
        variable.assign(value)


def save(folder, name: str, arrays: Mapping[str, np.ndarray], state: Mapping, keep: int = 1) -> Path:
    """Write `<folder>/<name>.npz`, then `state.json` naming it, then drop all but the newest `keep`.

    `state` is any JSON-able mapping (epoch counters, history, best score); it is returned by `load`
    together with the arrays.
    """
    folder = Path(folder)
    path = folder / f"{name}.npz"
    save_npz(path, arrays)
    previous = read_state(folder) or {}
    kept = (
        [entry for entry in previous.get("checkpoints", []) if entry != name][-(keep - 1) :]
        if keep > 1
        else []
    )
    write_json(folder / STATE_FILE, {**state, "checkpoint": name, "checkpoints": [*kept, name]})
    for entry in previous.get("checkpoints", []):
        if entry not in kept and entry != name and (folder / f"{entry}.npz").exists():
            (folder / f"{entry}.npz").unlink()
    return path


def read_state(folder) -> dict | None:
    """The saved `state.json` of `folder`, or None when no checkpoint was written there."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise InputError(path, "is not valid JSON", "the state file a checkpoint wrote") from None


def load_arrays(folder, name: str) -> dict[str, np.ndarray]:
    """The arrays of the checkpoint `name` in `folder` (e.g. an older one kept for a rollback)."""
    path = Path(folder) / f"{name}.npz"
    if not path.is_file():
        raise InputError(path, "checkpoint file is missing", "the folder of an earlier run, intact")
    with np.load(path, allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files}


def load(folder) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(state, arrays) of the newest checkpoint in `folder`, or None when there is none."""
    state = read_state(folder)
    if state is None:
        return None
    return state, load_arrays(folder, state["checkpoint"])


def _model_prefixes(model) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Model variables: "<model name>/layer/kernel";
    # optimizer slots: "<optimizer name>/<model name>_layer_kernel_momentum".
    optimizer = getattr(model, "optimizer", None)
    optimizer_prefixes = (f"{optimizer.name}/", f"{model.name}_") if optimizer is not None else ()
    return (f"{model.name}/",), optimizer_prefixes


def model_arrays(model, group: str = "model", optimizer: bool = True) -> dict[str, np.ndarray]:
    """A compiled Keras model's variables (dropout seed states included) and its optimizer's slots."""
    model_prefix, optimizer_prefixes = _model_prefixes(model)
    arrays = variable_arrays(group, model.variables, model_prefix)
    if optimizer and getattr(model, "optimizer", None) is not None:
        arrays.update(variable_arrays(f"{group}_optimizer", model.optimizer.variables, optimizer_prefixes))
    return arrays


def restore_model(
    model, arrays: Mapping[str, np.ndarray], source, group: str = "model", optimizer=True
) -> None:
    """Inverse of `model_arrays` for a model built (and compiled, with its optimizer built) the same way."""
    model_prefix, optimizer_prefixes = _model_prefixes(model)
    assign_arrays(arrays, group, model.variables, source, model_prefix)
    if optimizer and getattr(model, "optimizer", None) is not None:
        assign_arrays(arrays, f"{group}_optimizer", model.optimizer.variables, source, optimizer_prefixes)
