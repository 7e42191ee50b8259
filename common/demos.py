"""Run every script's `--demo` in order: one line per demo as it ends, then a table of summary lines.

    python -m common.demos                 # all 23 demos
    python -m common.demos --only igarss_exp1 train_owl_gps

Each demo runs as its own process from the repository root, as `python <script> --demo` would, and
writes under `results/` as usual; scripts that keep finished runs from being replaced get
`--overwrite` too, so the chain can be run again over its own earlier outputs. A demo's summary
line is the last line it printed on standard output (each script ends with one line that matches
its metrics.json). The exit code is 0 when every demo exited 0, else 1; a failing demo's last stderr
lines are shown and the chain goes on.
`annotation_tool.py --demo` is a local web page that serves until stopped, so it is not in the chain.
"""

import argparse
import importlib
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The order matters where one demo reads another's output: the exp1 sweep and exp2 read exp1's
# projection heads, and the test and tuning scripts read the multilabel demo's run.
DEMOS = (
    "igarss_exp1.py",
    "igarss_exp1_sweep.py",
    "igarss_exp2.py",
    "igarss_exp2_sweep.py",
    "extract_embeddings.py",
    "train_owl_gps.py",
    "train_multilabel_model.py",
    "test_multilabel_model.py",
    "meta_parameters_tuning.py",
    "make_benv2_lmdb.py",
    "dataset_downloader.py",
    "dataset_creator.py",
    "generative_trainer_unet_spade_gan.py",
    "segmentation_train.py",
    "segformer_vis.py",
    "vision_language_captioner.py",
    "vision_captioner.py",
    "text_captioner.py",
    "gpt_captioner.py",
    "ollama_captioner.py",
    "caption_stats.py",
    "train_lucas_classifier.py",
    "extract_terramind_embeddings.py",
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="script stems to run (default: every demo)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one demo may take")
    return parser


def summary_line(stdout: str) -> str:
    """The last non-empty line a demo printed on standard output."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def takes_overwrite(script: str) -> bool:
    """Whether the script's parser has --overwrite (imports the script; nothing runs at import)."""
    module = importlib.import_module(script.removesuffix(".py"))
    return any("--overwrite" in action.option_strings for action in module.get_args_parser()._actions)


def run_demo(script: str, timeout: float) -> tuple[int, float, str, str]:
    """Run `python <script> --demo` from the repository root: (exit code, seconds, summary, stderr)."""
    start = time.perf_counter()
    command = [sys.executable, script, "--demo", *(["--overwrite"] if takes_overwrite(script) else [])]
    try:
        completed = subprocess.run(
            command,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        code, stdout, stderr = completed.returncode, completed.stdout, completed.stderr
    except subprocess.TimeoutExpired:
        code, stdout, stderr = 124, "", f"timed out after {timeout:.0f} s"
    return code, time.perf_counter() - start, summary_line(stdout), stderr


def main(args) -> int:
    unknown = [stem for stem in args.only if f"{stem.removesuffix('.py')}.py" not in DEMOS]
    if unknown:
        expected = ", ".join(DEMOS)
        print(f"error: --only: unknown demo {unknown[0]!r}; expected one of {expected}", file=sys.stderr)
        return 2
    chosen = {f"{stem.removesuffix('.py')}.py" for stem in args.only}
    scripts = [script for script in DEMOS if not chosen or script in chosen]
    rows = []
    for number, script in enumerate(scripts, start=1):
        code, seconds, summary, stderr = run_demo(script, args.timeout)
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"[{number}/{len(scripts)}] {script} {status} in {seconds:.0f} s", flush=True)
        if code != 0:
            for line in stderr.strip().splitlines()[-5:]:
                print(f"    {line}", flush=True)
        rows.append((script, code, seconds, summary))
    print()
    print("| demo | exit | seconds | summary line |")
    print("|---|---|---|---|")
    for script, code, seconds, summary in rows:
        print(f"| {script} | {code} | {seconds:.0f} | {summary.replace('|', '/')} |")
    failed = sum(code != 0 for _, code, _, _ in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} demos passed in {sum(row[2] for row in rows):.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
