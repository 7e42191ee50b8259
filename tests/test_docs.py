"""README.md and docs/*.md: fenced commands, sound tables, each script once, real flags, one quote a demo."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

from common import demos

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = sorted(path.name for path in REPO.glob("*.py"))
# A line of prose that starts like one of these is a command that belongs in a fence.
COMMAND_START = re.compile(
    r"^\s*(\$ |python3? |pip3? |export |srun |sbatch |tensorboard |apt-get |CUDA_VISIBLE_DEVICES=|cd |bash )"
)
SEPARATOR = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+\s*$")


def split_page(path):
    """(prose lines, fenced blocks) of a markdown page; a block is (info string, first line number, lines)."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            if block is None:
                block = (line.strip()[3:].strip(), number, [])
            else:
                blocks.append(block)
                block = None
        elif block is not None:
            block[2].append(line)
        else:
            prose.append((number, line))
    assert block is None, f"{path.name}: the fence opened at line {block[1]} is never closed"
    return prose, blocks


def tables(prose):
    """Runs of consecutive prose lines that start with '|': [(first line number, lines)]."""
    found, current = [], []
    for number, line in [*prose, (None, "")]:
        if line.lstrip().startswith("|"):
            current.append((number, line.strip()))
        elif current:
            found.append(current)
            current = []
    return found


def commands(block_lines):
    """Shell commands of a bash block: continuation lines joined, split at &&, ;, | and ||."""
    text = "\n".join(line for line in block_lines if not line.lstrip().startswith("#"))
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        for part in re.split(r"&&|\|\||;|\|", line.split(" #")[0]):
            if part.strip():
                yield part.strip()


def is_repository_module(name):
    return (REPO / f"{name.replace('.', '/')}.py").is_file()


def invoked(command):
    """(module, arguments) for `python x.py ...` and `python -m a.b ...` of this repository, else None."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    while words and re.match(r"^[A-Z_]+=", words[0]):  # leading environment assignments
        words = words[1:]
    if len(words) < 2 or words[0] not in ("python", "python3"):
        return None
    if words[1] == "-m" and len(words) > 2 and is_repository_module(words[2]):
        return words[2], words[3:]
    if words[1].endswith(".py") and "/" not in words[1] and is_repository_module(words[1][:-3]):
        return words[1][:-3], words[2:]
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_commands_are_fenced_and_headings_sound(page):
    prose, _ = split_page(page)
    loose = [f"{page.name}:{number}: {line}" for number, line in prose if COMMAND_START.match(line)]
    assert not loose, "command lines outside a fence:\n" + "\n".join(loose)
    titles = [number for number, line in prose if re.match(r"^# ", line)]
    assert titles == [1], f"{page.name}: one level-1 heading, on the first line; found at lines {titles}"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_tables_have_separators_and_no_duplicate_rows(page):
    prose, _ = split_page(page)
    for rows in tables(prose):
        first = rows[0][0]
        assert len(rows) >= 2 and SEPARATOR.match(rows[1][1]), f"{page.name}:{first}: table without separator"
        body = [line for _, line in rows[2:]]
        duplicates = {line for line in body if body.count(line) > 1}
        assert not duplicates, f"{page.name}:{first}: duplicate rows {sorted(duplicates)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name}: link to missing {target}"


def test_front_table_lists_every_script_once():
    prose, _ = split_page(REPO / "README.md")
    front = tables(prose)[0]
    text = "\n".join(line for _, line in front)
    counts = {script: len(re.findall(rf"`{re.escape(script)}`", text)) for script in SCRIPTS}
    wrong = {script: count for script, count in counts.items() if count != 1}
    assert not wrong, f"README's first table must name every script exactly once: {wrong}"
    for page in re.findall(r"\]\((docs/[^)]+\.md)\)", text):
        assert (REPO / page).is_file(), page


def _option_strings(module_name):
    module = importlib.import_module(module_name)
    parser = module.get_args_parser()
    return {option for action in parser._actions for option in action.option_strings}


def fenced_invocations():
    for page in PAGES:
        _, blocks = split_page(page)
        for info, number, lines in blocks:
            if info in ("bash", "sh", "shell", ""):
                for command in commands(lines):
                    call = invoked(command)
                    if call is not None:
                        yield page.name, number, call


def test_every_fenced_flag_exists():
    options_of, unknown = {}, []
    for page, number, (module_name, arguments) in fenced_invocations():
        if module_name not in options_of:
            module = importlib.import_module(module_name)
            assert hasattr(module, "get_args_parser"), (
                f"{page}:{number}: {module_name} has no get_args_parser"
            )
            options_of[module_name] = _option_strings(module_name)
        for word in arguments:
            flag = word.split("=")[0]
            if flag.startswith("--") and flag not in options_of[module_name]:
                unknown.append(f"{page}:{number}: {module_name} has no {flag}")
    assert not unknown, "\n".join(unknown)
    assert options_of, "no fenced python commands found"


def demo_quotes():
    """{script: [(page, line)]} for each 'This should print:' block after a fenced demo command."""
    quotes = {}
    for page in PAGES:
        lines = page.read_text().splitlines()
        _, blocks = split_page(page)
        for index, (info, number, _) in enumerate(blocks):
            above = [line.strip() for line in lines[: number - 1] if line.strip()]
            if not above or not above[-1].lower().startswith("this should print"):
                continue
            assert info == "text", f"{page.name}:{number}: 'This should print:' is followed by a text fence"
            previous = [command for _, _, code in blocks[:index] for command in commands(code)]
            scripts = [invoked(command) for command in previous if invoked(command)]
            assert scripts, f"{page.name}:{number}: no command before the quoted output"
            quotes.setdefault(scripts[-1][0], []).append((page.name, number))
    return quotes


def test_each_demo_output_is_quoted_in_one_place():
    quotes = demo_quotes()
    repeated = {script: places for script, places in quotes.items() if len(places) > 1}
    assert not repeated, f"demo output quoted more than once: {repeated}"
    readme = [place for places in quotes.values() for place in places if place[0] == "README.md"]
    assert not readme, f"README quotes demo output (it belongs in docs/): {readme}"
    missing = [script for script in demos.DEMOS if script[:-3] not in quotes]
    assert not missing, f"demos without a 'This should print:' quote in docs/: {missing}"


def test_the_checks_catch_what_they_guard(tmp_path):
    """Each rule fails on a page that breaks it (so a check that cannot fail is not mistaken for a pass)."""
    page = tmp_path / "page.md"
    page.write_text("# t\n\npython igarss_exp1.py --demo\n\n| a |\n| b |\n\n```bash\npython x.py\n```\n")
    prose, blocks = split_page(page)
    assert any(COMMAND_START.match(line) for _, line in prose)
    assert not SEPARATOR.match(tables(prose)[0][1][1])
    assert [invoked(command) for command in commands(blocks[0][2])] == [None]  # x.py is no script here
    assert invoked("python igarss_exp1.py --demo") == ("igarss_exp1", ["--demo"])
    assert invoked("TF_CPP_MIN_LOG_LEVEL=0 python -m common.demos --only a") == (
        "common.demos",
        ["--only", "a"],
    )
    assert "--no_such_flag" not in _option_strings("common.demos")
