"""Command lines: a parser that knows which flags were typed, a YAML overlay, demo defaults, shared flags.

Precedence for every flag: typed on the command line > the `--config` YAML file > the `--demo`
value > the paper's default. The paper's default stays the `default=` of each flag, so `--help`
shows it; a demo value is listed after it ("--demo: 8").
"""

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

from common.errors import InputError, require, require_file


def str2bool(value) -> bool:
    """Read true/false (also 1/0, yes/no, on/off) for flags that the paper repositories spell that way."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class _Unset:
    def __repr__(self):
        return "<unset>"


_UNSET = _Unset()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with demo defaults, an optional YAML overlay and a record of typed flags.

    `parse_args` returns an `Arguments` namespace; `typed_flags(args)` lists the flags the user
    typed. Demo values are declared with `demo_defaults(epochs=8, ...)` and applied only when
    `--demo` is set and the flag was neither typed nor set by the YAML file.
    """

    def __init__(self, *args, config_flag: bool = True, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._demo_values: dict = {}
        self._config_flag = config_flag
        if config_flag:
            self.add_argument(
                "-c",
                "--config",
                default="",
                help="YAML file of flag names and values (e.g. written by --print_config); typed flags win.",
            )
            self.add_argument(
                "--print_config",
                action="store_true",
                help="Print the effective settings (defaults, --demo values, -c file, typed flags) as YAML "
                "that -c accepts back, and exit.",
            )

    def demo_defaults(self, **values) -> None:
        """Values that `--demo` uses instead of the paper's defaults (a typed flag still wins)."""
        actions = {action.dest: action for action in self._actions}
        for dest, value in values.items():
            if dest not in actions:
                raise KeyError(f"demo default for unknown flag {dest!r}")
            action = actions[dest]
            if action.help and action.help is not argparse.SUPPRESS:
                action.help = f"{action.help} (--demo: {value})"
            self._demo_values[dest] = value

    def renamed(self, old_flag: str, new_flag: str) -> None:
        """Accept `old_flag` as a hidden alias of the already added `new_flag` for one release.

        The old spelling sets the new flag's value and prints one note on stderr naming the new one.
        """
        action = next(a for a in self._actions if new_flag in a.option_strings)
        options = {"dest": action.dest, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
        if isinstance(action, argparse._StoreTrueAction):
            options["action"] = "store_true"
        else:
            options.update(type=action.type, nargs=action.nargs, choices=action.choices)
        self.add_argument(old_flag, **options)
        self._renamed = {**getattr(self, "_renamed", {}), old_flag: new_flag}

    def _note_renamed(self, argv) -> None:
        words = sys.argv[1:] if argv is None else [str(word) for word in argv]
        for old_flag, new_flag in getattr(self, "_renamed", {}).items():
            if any(word == old_flag or word.startswith(f"{old_flag}=") for word in words):
                print(
                    f"note: {old_flag} is now {new_flag}; the old name goes in a later release",
                    file=sys.stderr,
                )

    def _typed_dests(self, argv) -> set:
        probe = argparse.Namespace(**{a.dest: _UNSET for a in self._actions if a.dest != "help"})
        parsed, _ = super().parse_known_args(argv, probe)
        return {dest for dest, value in vars(parsed).items() if value is not _UNSET}

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace if namespace is not None else Arguments())
        self._note_renamed(args)
        typed = self._typed_dests(args)
        overlaid = set()
        if self._config_flag and getattr(parsed, "config", ""):
            try:
                overlaid = apply_yaml(parsed, self, parsed.config, typed)
            except InputError as error:
                # Parsing runs before main's cli_entry: report a bad config file the same way.
                print(f"error: {error}", file=sys.stderr, flush=True)
                sys.exit(2)
        if getattr(parsed, "demo", False):
            for dest, value in self._demo_values.items():
                if dest not in typed and dest not in overlaid:
                    setattr(parsed, dest, value)
        if isinstance(parsed, Arguments):
            parsed.typed = frozenset(typed)
        if getattr(parsed, "print_config", False):
            print(effective_config_yaml(parsed, self), end="")
            sys.exit(0)
        return parsed


HELP_FLAGS = ("-h", "--help")


def answer_help_early(build_parser, module_name: str) -> None:
    """Print `--help` from `build_parser()` and exit, when the calling module runs as the script.

    Scripts call it right after their parser and before importing TensorFlow or torch, which take
    seconds to load: `python script.py --help` then answers at once. Imported as a module (by a test
    or another script) it does nothing.
    """
    if module_name == "__main__" and any(word in HELP_FLAGS for word in sys.argv[1:]):
        build_parser().parse_args()


class Arguments(argparse.Namespace):
    """A Namespace that also remembers which flags were typed (kept out of `vars(args)`)."""

    __slots__ = ("typed",)


_META_KEYS = ("config", "print_config", "help")


def _plain(value):
    # YAML that -c reads back: tuples as lists, paths as strings.
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def effective_config_yaml(args, parser: argparse.ArgumentParser) -> str:
    """The settings in `args` as YAML (flag names as keys) that `-c` accepts back unchanged."""
    import yaml

    keys = [a.dest for a in parser._actions if a.dest not in _META_KEYS and a.dest != argparse.SUPPRESS]
    return yaml.safe_dump({key: _plain(getattr(args, key)) for key in keys}, sort_keys=False)


def typed_flags(args) -> frozenset:
    """The destinations of the flags typed on the command line for a Namespace from `Parser`."""
    return getattr(args, "typed", frozenset())


def _convert(action, key, value, path):
    if isinstance(value, list):
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            return [_convert_one(action, key, item, path) for item in value]
        value = ",".join(str(item) for item in value)
    return _convert_one(action, key, value, path)


def _convert_one(action, key, value, path):
    if value is not None and action.type is not None:
        try:
            value = action.type(value) if action.type is str2bool else action.type(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            name = getattr(action.type, "__name__", "valid")
            raise InputError(path, f"key {key}: cannot read {value!r}", f"a {name} value") from None
    if action.choices is not None and value not in action.choices:
        raise InputError(
            path, f"unknown value {value!r} for {key}", f"one of {', '.join(map(str, action.choices))}"
        )
    return value


def apply_yaml(args, parser: argparse.ArgumentParser, config_path, typed=frozenset()) -> set:
    """Set every flag in the YAML file that was not typed; unknown keys and bad values are errors.

    Returns the destinations the file set.
    """
    import yaml

    path = require_file(config_path, "a YAML config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0]
        raise InputError(
            path, f"not valid YAML ({first_line})", "a mapping of flag names to values"
        ) from None
    except UnicodeDecodeError:
        raise InputError(path, "is not UTF-8 text", "a YAML mapping of flag names to values") from None
    data = data or {}
    require(isinstance(data, Mapping), path, "top level is not a mapping", "flag names mapped to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in _META_KEYS}
    unknown = sorted(set(map(str, data)) - set(actions))
    require(
        not unknown, path, f"unknown key(s): {', '.join(unknown)}", "only the flag names listed by --help"
    )
    for key, value in data.items():
        converted = _convert(actions[key], key, value, path)
        if key not in typed:
            setattr(args, key, converted)
    return set(data)


# ---- shared flag groups ----


def add_run_arguments(parser: argparse.ArgumentParser, run_name: bool = True, resume: bool = True) -> None:
    """The flags of every script with a run folder: results tree, run name, seed, overwrite, resume."""
    group = parser.add_argument_group("run")
    group.add_argument("--results_dir", default="results", help="Root of the output tree.")
    if run_name:
        group.add_argument(
            "--run_name",
            default="",
            help="Name of the run folder under results/<script>/; derived from the settings when empty.",
        )
    group.add_argument("--seed", type=int, default=0, help="Seeds Python, NumPy and TensorFlow.")
    group.add_argument(
        "--deterministic",
        action="store_true",
        help="Turn on TensorFlow op determinism (bit-exact re-runs, slower).",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a finished run of the same name instead of stopping.",
    )
    if resume:
        group.add_argument(
            "--resume",
            action="store_true",
            help="Continue an interrupted (or extend a finished) run from its checkpoint (same settings).",
        )


OPTIMIZER_CONVENTIONS = ("torch", "keras")


def add_optimizer_convention_argument(parser: argparse.ArgumentParser, default: str = "torch") -> None:
    """--optimizer_convention {torch,keras}: whose Adam/AdamW update rule `common.optimizers` builds."""
    if default not in OPTIMIZER_CONVENTIONS:
        raise ValueError(
            f"unknown optimizer convention {default!r}: expected one of {', '.join(OPTIMIZER_CONVENTIONS)}"
        )
    parser.add_argument(
        "--optimizer_convention",
        default=default,
        choices=OPTIMIZER_CONVENTIONS,
        help="Adam/AdamW update rule: torch adds epsilon after the bias correction (as torch.optim and the "
        "reference code), keras before it (as keras.optimizers.Adam/AdamW). Epsilon's value (torch's "
        "default 1e-8, Keras's 1e-7) is a separate setting.",
    )


def add_demo_argument(parser: argparse.ArgumentParser, what: str = "") -> None:
    """--demo: write a small seeded dataset in the real input format and run the real code on it."""
    parser.add_argument(
        "--demo",
        action="store_true",
        help="Run on a small synthetic dataset written under <results_dir>/demo_data/ "
        + (what or "(minutes on a CPU)."),
    )


def add_strategy_argument(parser: argparse.ArgumentParser) -> None:
    """--strategy: the tf.distribute strategy (default, mirrored for several GPUs, multiworker)."""
    parser.add_argument(
        "--strategy",
        default="default",
        choices=("default", "mirrored", "multiworker"),
        help="tf.distribute strategy: mirrored = all local GPUs, multiworker = TF_CONFIG cluster.",
    )


def add_workers_argument(parser: argparse.ArgumentParser, default: int = 1, what: str = "") -> None:
    """--workers: the number of worker processes."""
    parser.add_argument(
        "--workers", type=int, default=default, help="Worker processes" + (f" ({what})." if what else ".")
    )


def add_shard_arguments(parser: argparse.ArgumentParser, what: str = "items") -> None:
    """--shard K/N and --merge: one job split over N processes, then their parts joined (common.parallel)."""
    parser.add_argument(
        "--shard",
        default="",
        metavar="K/N",
        help=f"K/N: run only shard K of N (every N-th batch of {what}, from the K-th) into "
        "<output>.shards/K_of_N, resumable like a whole run; empty: everything in one process.",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="Check that every --shard K/N part is finished and join them into the output one process "
        "writes (the same flags otherwise, without --shard).",
    )


def demo_data_dir(args, script_stem: str) -> Path:
    """Where `--demo` writes its synthetic input: <results_dir>/demo_data/<script>."""
    return Path(args.results_dir) / "demo_data" / script_stem
