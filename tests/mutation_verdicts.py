"""A pytest plugin that gives each listed mutmut mutant its verdict before and after the data-flow tests.

mutmut (see docs/mutation.md) generates the mutants under `mutants/` and records in
`mutants/mutmut-stats.json` which tests call which function. This plugin, loaded in a pytest run inside
`mutants/` that collects the method test files, replaces the test loop: for each mutant of the functions
named in `$MM_CHECK_FUNCTIONS` (mutmut's mangled names, space-separated, e.g. `igarss_exp1.x_matl_loss`;
the mutants are the keys of mutmut's `<script>.py.meta` files), it runs the collected tests that call the
mutated function (fastest first), first those of the earlier test files ("before"), and only if none fails
the data-flow tests and the brute-force triplet cases at scale 0.02 ("after"). The verdict
(`killed_before`, `killed_after`, `survived`, `no tests`), the first failing test and the seconds taken
are written to `$MM_CHECK_OUT` (JSON, rewritten atomically after each mutant; a re-run skips the mutants
it holds). One process runs every mutant, so the test modules are imported once.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from _pytest.runner import runtestprotocol

MUTANT_SECONDS = 300


def _timeout(signum, frame):
    raise TimeoutError(f"a test ran longer than {MUTANT_SECONDS} s under this mutant")


def _is_after(test_id):
    return "_dataflow" in test_id or "[0.02-" in test_id


def first_failure(items, test_ids):
    """The first of `test_ids` that fails (or errors), else None."""
    for test_id in test_ids:
        signal.alarm(MUTANT_SECONDS)
        try:
            reports = runtestprotocol(items[test_id], log=False, nextitem=None)
        finally:
            signal.alarm(0)
        if any(report.failed for report in reports):
            return test_id
    return None


def verdict_of(mutant, items, tests_by_function, durations):
    """(verdict, first failing test) of one mutant."""
    function = mutant.rsplit("__mutmut_", 1)[0]
    tests = sorted(tests_by_function.get(function, []), key=lambda test: (durations.get(test, 9), test))
    tests = [test for test in tests if test in items]
    after = [test for test in tests if _is_after(test)]
    before = [test for test in tests if not _is_after(test)]
    os.environ["MUTANT_UNDER_TEST"] = mutant
    try:
        failing = first_failure(items, before)
        if failing:
            return "killed_before", failing
        failing = first_failure(items, after)
        return ("killed_after" if failing else "survived" if tests else "no tests"), failing
    finally:
        os.environ["MUTANT_UNDER_TEST"] = ""


def mutants_of(functions):
    """Every mutant mutmut generated for the mangled function names, in mutmut's order."""
    mutants = []
    for script in sorted({function.split(".")[0] for function in functions}):
        keys = json.loads(Path(f"{script}.py.meta").read_text())["exit_code_by_key"]
        mutants += [key for key in keys if key.rsplit("__mutmut_", 1)[0] in functions]
    return mutants


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    mutants = mutants_of(set(os.environ["MM_CHECK_FUNCTIONS"].split()))
    stats = json.loads(Path("mutmut-stats.json").read_text())
    out = Path(os.environ["MM_CHECK_OUT"])
    results = json.loads(out.read_text()) if out.exists() else {}
    items = {item.nodeid: item for item in session.items}
    signal.signal(signal.SIGALRM, _timeout)
    for mutant in mutants:
        if mutant in results:
            continue
        start = time.time()
        verdict, failing = verdict_of(
            mutant, items, stats["tests_by_mangled_function_name"], stats["duration_by_test"]
        )
        results[mutant] = [verdict, failing, round(time.time() - start, 2)]
        temporary = out.with_name(out.name + ".tmp")
        temporary.write_text(json.dumps(results, indent=0))
        os.replace(temporary, out)
    return True
