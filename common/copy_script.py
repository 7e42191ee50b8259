"""Copy scripts into another project with exactly the shared modules they import, under a safe name.

    python -m common.copy_script train_owl_gps.py ../my_project
    python -m common.copy_script igarss_exp1.py igarss_exp2.py ../my_project --package tgmatl_common

A script imports `common.*` modules (generic ones and its paper's `common/<paper>/`) and, for the
sweeps, the test and tuning scripts, its paper's training script. The copy follows every import
statement (also those inside functions) from the scripts through the modules they reach and copies
exactly those files, plus `requirements.txt` and `configs/` for the scripts that read YAML configs
from there. Host projects often have a `common` package of their own, so in the copy `common` is
renamed (`rsrepro_common` by default) and every import of it is rewritten; nothing else in the
files changes. An existing file in the destination that differs from the one being copied is never
replaced: the copy stops with one line naming it, unless `--overwrite` is given.
"""

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "common"
# Scripts that read the YAML configs of configs/ (their docstrings show `-c configs/<name>.yaml`).
CONFIG_READERS = {"train_multilabel_model.py", "test_multilabel_model.py", "meta_parameters_tuning.py"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("scripts", nargs="+", help="top-level scripts to copy, e.g. train_owl_gps.py")
    parser.add_argument("dest", help="the host project's folder (created if missing)")
    parser.add_argument(
        "--package",
        default="rsrepro_common",
        help="name of the shared package in the copy (must not be a package the host already has)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace differing files in dest")
    return parser


def module_file(dotted: str) -> Path | None:
    """The file of a repository module (`common.runs`, `common.spml.readers`, `igarss_exp1`), or None."""
    base = REPO.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the repository modules that `path` imports anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from common import runs` names a submodule; `from common.errors import require` a function.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            # Importing common.spml.readers also runs common/__init__.py and common/spml/__init__.py.
            for end in range(1, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if module_file(prefix) is not None:
                    found.add(prefix)
    return found


def needed_files(scripts) -> list[Path]:
    """Every repository file the scripts need, found by following imports; sorted, relative to REPO."""
    pending = [REPO / script for script in scripts]
    seen: set[Path] = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imported_modules(path):
            pending.append(module_file(module))
    files = {path.relative_to(REPO) for path in seen}
    files.add(Path("requirements.txt"))
    if any(Path(script).name in CONFIG_READERS for script in scripts):
        files.update(path.relative_to(REPO) for path in sorted((REPO / "configs").glob("*.yaml")))
    return sorted(files)


def rename_package(source: str, package: str) -> str:
    """`source` with every import of `common` (statements and `-m common.x` lines) naming `package`."""
    source = re.sub(r"^(\s*)from common(?=[.\s])", rf"\1from {package}", source, flags=re.MULTILINE)
    source = re.sub(r"^(\s*)import common(?=[.\s])", rf"\1import {package}", source, flags=re.MULTILINE)

    def qualified(match):  # `common.x` in code, docstrings and `-m` lines, where x is a shared module
        name = match.group(1)
        return f"{package}.{name}" if module_file(f"{PACKAGE}.{name}") is not None else match.group(0)

    return re.sub(r"(?<![\w.])common\.(\w+)", qualified, source)


def target_path(relative: Path, package: str) -> Path:
    parts = relative.parts
    return Path(package, *parts[1:]) if parts[0] == PACKAGE else relative


def copy_scripts(scripts, dest, package="rsrepro_common", overwrite=False) -> list[Path]:
    """Copy the scripts and what they need into `dest`; returns the written paths (relative to dest)."""
    if not package.isidentifier() or package == PACKAGE:
        raise ValueError(f"--package: {package!r} is not a usable package name; expected e.g. rsrepro_common")
    for script in scripts:
        if Path(script).parent != Path(".") or not (REPO / script).is_file() or not script.endswith(".py"):
            raise ValueError(f"{script}: not a top-level script of this repository; expected e.g. train_x.py")
    dest = Path(dest)
    planned = []
    for relative in needed_files(scripts):
        data = (REPO / relative).read_bytes()
        if relative.suffix == ".py":
            data = rename_package(data.decode(), package).encode()
        target = dest / target_path(relative, package)
        if target.exists() and target.read_bytes() != data and not overwrite:
            raise ValueError(f"{target}: exists with other content; expected a new file (or --overwrite)")
        planned.append((target, data))
    for target, data in planned:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_bytes(data)
        temporary.replace(target)
    return [target.relative_to(dest) for target, _ in planned]


def main(args) -> int:
    try:
        written = copy_scripts(args.scripts, args.dest, args.package, args.overwrite)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for relative in written:
        print(relative)
    print(f"copied {len(written)} files into {args.dest}; run them there: python {args.scripts[0]} --help")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
