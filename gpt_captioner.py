"""ARAS400k captions from the land-cover percentages through the OpenAI Batch API.

Paper: M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language Models",
arXiv 2603.09625 (ARAS400k). One chat request per caption: the system message of the reference
("You generate natural, fluent, human-like satellite image captions (1-2 sentences).Do not list
percentages, statistics, segmentation, or datasets.") and the user message "Tree 41%, Water 12%"
(classes above 0, percentages truncated to integers), temperature 1. The Batch API steps, with the
`openai` client:

1. write the requests as JSONL, `custom_id` = `<filename>#<caption number>`, at most
   --max_requests_per_file (50,000, the API's limit) per file: `<out>.part000.jsonl`, ...;
2. `files.create(purpose="batch")` and `batches.create(endpoint="/v1/chat/completions",
   completion_window="24h")` per file, each batch id saved at once in `<out>.batches.json`;
3. poll `batches.retrieve` every --poll_seconds until each batch ends (or --max_wait passes: a
   re-run then collects the batches in flight instead of submitting again);
4. read `files.content(output_file_id)` (and the error file), join the captions back by `custom_id`
   and append them to the caption CSV. Requests that failed are named and stay missing, so the next
   run sends them again.

Commands (the key comes from the environment, never from the command line):

    export OPENAI_API_KEY=...
    python gpt_captioner.py --percentages ARAS400k/class_percentages/train.csv --out ARAS400k_train_cgc.csv
    python gpt_captioner.py --percentages ARAS400k/class_percentages/train.csv --dry_run   # JSONL only
    python gpt_captioner.py --demo

The demo is a dry run on the 8 seeded demo patches (no network): it writes the request file and
prints `dry run: 8 requests in 1 file(s): results/gpt_captioner/demo/captions.csv.part000.jsonl`.
`--base_url` (or OPENAI_BASE_URL) points the client at another server speaking the same API.
"""

import contextlib
import json
import os
import time
from pathlib import Path

from common import atomic, cli, runs
from common.aras400k import captions
from common.errors import InputError, cli_entry, require

ENDPOINT = "/v1/chat/completions"
TERMINAL_STATUSES = ("completed", "failed", "expired", "cancelled")
# The arguments a re-run must share with the caption CSV it continues (with the prompt id).
RESUME_SETTINGS = ("model", "temperature")
# The reference's system message, word for word (its missing space after "sentences)." included).
GPT_SYSTEM_MESSAGE = (
    "You generate natural, fluent, human-like satellite image captions (1-2 sentences)."
    "Do not list percentages, statistics, segmentation, or datasets."
)


def get_args_parser():
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    captions.add_captioner_arguments(
        parser,
        model="gpt-4o-mini",
        images="",
        percentages="ARAS400k/class_percentages/train.csv",
        out="ARAS400k_train_cgc.csv",
        demo_help="Dry run on the seeded demo patches: writes the request JSONL, contacts nothing.",
    )
    add = parser.add_argument
    add(
        "--temperature",
        type=float,
        default=1.0,
        help="Sampling temperature of every request (the reference's).",
    )
    add(
        "--max_requests_per_file",
        type=int,
        default=50000,
        help="Requests per batch input file (API limit 50,000).",
    )
    add("--poll_seconds", type=float, default=10.0, help="Seconds between status checks.")
    add(
        "--max_wait",
        type=float,
        default=3600.0,
        help="Seconds to wait for batches before leaving them to a re-run.",
    )
    add("--base_url", default="", help="API base URL (default: OPENAI_BASE_URL or the OpenAI API).")
    add("--dry_run", action="store_true", help="Write the request JSONL files and stop.")
    return parser


# ---- requests ----


def gpt_user_message(shares) -> str:
    """The GPT user message: `Class v%` with v truncated to an integer, classes above 0 only."""
    return ", ".join(f"{name} {int(value)}%" for name, value in shares.items() if value > 0)


def chat_request(custom_id: str, shares, model: str, temperature: float) -> dict:
    """One Batch API line: a chat completion with the reference's system and user messages."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {
            "model": model,
            "messages": [
                {"role": "system", "content": GPT_SYSTEM_MESSAGE},
                {"role": "user", "content": gpt_user_message(shares)},
            ],
            "temperature": temperature,
        },
    }


def custom_id_of(name: str, index: int) -> str:
    return f"{name}#{index}"


def job_of(custom_id: str) -> tuple[str, int]:
    name, _, index = custom_id.rpartition("#")
    return name, int(index)


def write_request_files(jobs, percentages, args, first_part: int) -> list[tuple[Path, list[str]]]:
    """Write the JSONL request files of `jobs`; returns each file with its custom ids."""
    files = []
    step = args.max_requests_per_file
    for offset in range(0, len(jobs), step):
        chunk = jobs[offset : offset + step]
        ids = [custom_id_of(name, index) for name, index in chunk]
        lines = [
            json.dumps(chat_request(cid, percentages[name], args.model, args.temperature))
            for cid, (name, _) in zip(ids, chunk, strict=True)
        ]
        path = Path(f"{args.out}.part{first_part + len(files):03d}.jsonl")
        atomic.write_text(path, "\n".join(lines) + "\n")
        files.append((path, ids))
    return files


# ---- the batches: state, submission, polling, results ----


def state_path(out) -> Path:
    return Path(f"{out}.batches.json")


def load_state(out) -> dict:
    path = state_path(out)
    if not path.exists():
        return {"batches": []}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        state = None
    require(
        isinstance(state, dict) and isinstance(state.get("batches"), list),
        path,
        "is not a readable batch record",
        "the batch record an earlier run wrote, or --overwrite",
    )
    return state


def submit(client, path: Path, ids, state, out) -> dict:
    """Upload one request file and start its batch; the record is saved before anything else."""
    with open(path, "rb") as file:
        uploaded = client.files.create(file=file, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h")
    record = {
        "file": str(path),
        "input_file_id": uploaded.id,
        "batch_id": batch.id,
        "requests": len(ids),
        "status": batch.status,
        "collected": False,
    }
    state["batches"].append(record)
    atomic.write_json(state_path(out), state)
    print(f"submitted {path.name}: {len(ids)} requests, batch {batch.id} ({batch.status})")
    return record


def wait_for(client, records, poll_seconds: float, max_wait: float) -> dict:
    """Poll until every batch has ended or `max_wait` seconds passed; returns the last status of each."""
    start = time.monotonic()
    latest = {}
    while True:
        for record in records:
            if record["batch_id"] not in latest or latest[record["batch_id"]].status not in TERMINAL_STATUSES:
                batch = client.batches.retrieve(record["batch_id"])
                latest[record["batch_id"]] = batch
                counts = batch.request_counts
                done = f" ({counts.completed}/{counts.total} done, {counts.failed} failed)" if counts else ""
                print(f"batch {batch.id}: {batch.status}{done}", flush=True)
        running = [b for b in latest.values() if b.status not in TERMINAL_STATUSES]
        if not running or time.monotonic() - start > max_wait:
            return latest
        time.sleep(poll_seconds)


def parse_results(text: str) -> tuple[dict, dict]:
    """Captions and errors by custom id from a batch output (or error) file."""
    captions_by_id, errors = {}, {}
    for line in text.splitlines():
        if not line.strip():
            continue
        result = json.loads(line)
        response = result.get("response") or {}
        body = response.get("body") or {}
        if result.get("error") or response.get("status_code") != 200:
            errors[result["custom_id"]] = (
                result.get("error") or body.get("error") or response.get("status_code")
            )
            continue
        try:
            captions_by_id[result["custom_id"]] = body["choices"][0]["message"]["content"].strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            errors[result["custom_id"]] = "response without a message"
    return captions_by_id, errors


def collect(client, record, batch, log, model: str) -> list[str]:
    """Append a finished batch's captions to the CSV (skipping any already there); return failed files."""
    texts, errors = {}, {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            found, failed = parse_results(client.files.content(file_id).text)
            texts.update(found)
            errors.update(failed)
    if batch.status != "completed" and batch.errors:
        print(f"batch {batch.id} {batch.status}: {batch.errors}")
    rows = []
    for custom_id, text in sorted(texts.items(), key=lambda item: job_of(item[0])):
        name, index = job_of(custom_id)
        # A crash between the CSV append and the state update must not add the captions twice.
        if log.counts[name] <= index:
            rows.append({"filename": name, "caption": text, "model": model, "prompt_id": "gpt_percentages"})
    log.append(rows)
    for custom_id, error in sorted(errors.items()):
        print(f"request {custom_id} failed: {error}")
    print(f"batch {batch.id} {batch.status}: {len(rows)} captions written, {len(errors)} failed")
    unanswered = set(request_ids(record)) - set(texts) - set(errors)
    if unanswered:
        print(f"batch {batch.id}: {len(unanswered)} request(s) came back in neither file")
    return sorted({job_of(custom_id)[0] for custom_id in set(errors) | unanswered})


def request_ids(record) -> list[str]:
    """The custom ids of a submitted batch, from its request file."""
    return [json.loads(line)["custom_id"] for line in Path(record["file"]).read_text().splitlines() if line]


def make_client(base_url: str):
    """The `openai` client; the key comes from OPENAI_API_KEY."""
    from openai import OpenAI

    require(
        os.environ.get("OPENAI_API_KEY"),
        "OPENAI_API_KEY",
        "is not set",
        "the API key in the environment (or --dry_run to write the requests only)",
    )
    return OpenAI(base_url=base_url or None)


@contextlib.contextmanager
def remote_errors(base_url: str):
    """The API's refusals, rate limits and silences as one line saying what to check (exit 2); the
    captions appended and the batches recorded so far stay for the next run."""
    import openai

    server = base_url or os.environ.get("OPENAI_BASE_URL") or "the OpenAI API"
    kept = "finished captions and submitted batches are kept for the next run"
    try:
        yield
    except openai.AuthenticationError as error:
        raise InputError(
            "OPENAI_API_KEY",
            f"was refused by {server} ({error.status_code}: {remote_message(error)})",
            f"a valid key for that server (and --base_url for another one); {kept}",
        ) from None
    except openai.PermissionDeniedError as error:
        raise InputError(
            server,
            f"denied the request (403: {remote_message(error)})",
            f"a key allowed to use the Batch API and --model; {kept}",
        ) from None
    except openai.RateLimitError as error:
        raise InputError(
            server,
            f"is rate-limiting this key (429: {remote_message(error)})",
            f"to run the same command again later (or a higher quota); {kept}",
        ) from None
    except openai.APIConnectionError as error:
        cause = error.__cause__ or error
        raise InputError(
            server,
            f"does not answer ({type(cause).__name__}: {remote_message(cause)})",
            f"a reachable server: check the network and --base_url / OPENAI_BASE_URL; {kept}",
        ) from None
    except openai.APIStatusError as error:
        raise InputError(
            server,
            f"answered {error.status_code} ({remote_message(error)})",
            f"a server speaking the OpenAI Batch API (check --base_url); {kept}",
        ) from None


def remote_message(error) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:160]


def run_round(client, jobs, percentages, args, state, log) -> tuple[list[str], int, bool]:
    """Submit `jobs` plus what is in flight, wait, collect: returns failed files, captions written and
    whether batches are still running."""
    in_flight = [record for record in state["batches"] if not record["collected"]]
    files = write_request_files(jobs, percentages, args, first_part=len(state["batches"]))
    in_flight += [submit(client, path, ids, state, args.out) for path, ids in files]
    latest = wait_for(client, in_flight, args.poll_seconds, args.max_wait)
    failed, written, running = [], 0, False
    for record in in_flight:
        batch = latest[record["batch_id"]]
        record["status"] = batch.status
        if batch.status not in TERMINAL_STATUSES:
            print(f"batch {batch.id} is still {batch.status}: run the same command again to collect it")
            running = True
            continue
        before = log.counts.total()
        failed += collect(client, record, batch, log, args.model)
        written += log.counts.total() - before
        record["collected"] = True
        atomic.write_json(state_path(args.out), state)
    return failed, written, running


def pending_jobs(log, names, state) -> list[tuple[str, int]]:
    """Captions still missing that no batch in flight will bring."""
    sent = {cid for record in state["batches"] if not record["collected"] for cid in request_ids(record)}
    return [job for job in log.missing(names) if custom_id_of(*job) not in sent]


@cli_entry
def main(args):
    if args.demo:
        captions.demo_paths(args, "gpt_captioner")
        args.dry_run = True
    runs.print_args(args)
    captions.check_numbers(args)
    require(
        0 < args.max_requests_per_file <= 50000, "--max_requests_per_file", "is out of range", "1 to 50000"
    )
    require(0 <= args.temperature <= 2, "--temperature", f"is {args.temperature}", "0 to 2 (the API's range)")
    for flag, value in (("--poll_seconds", args.poll_seconds), ("--max_wait", args.max_wait)):
        require(0 <= value <= 7 * 86400, flag, f"is {value}", "0 to 604800 seconds")

    # ---- requests still to make ----
    percentages = captions.read_percentages(args.percentages)
    names = captions.files_to_caption(args.images, percentages, True, args.percentages)
    settings = {**captions.resume_settings(args, RESUME_SETTINGS), "prompt": "gpt_percentages"}
    log = captions.CaptionLog(args.out, settings, args.num_captions, args.overwrite)
    if args.overwrite:
        state_path(args.out).unlink(missing_ok=True)
    state = load_state(args.out)
    jobs = pending_jobs(log, names, state)
    if args.dry_run:
        files = write_request_files(jobs, percentages, args, first_part=len(state["batches"]))
        listed = ", ".join(str(path) for path, _ in files)
        print(f"dry run: {len(jobs)} requests in {len(files)} file(s): {listed}")
        return

    # ---- submit, wait, collect; failed requests are sent again up to --retries times ----
    client = make_client(args.base_url)
    started, written = time.perf_counter(), 0
    images = len({name for name, _ in log.missing(names)})
    with remote_errors(args.base_url):
        for attempt in range(args.retries + 1):
            print(f"{len(jobs)} requests to send" + (f" (retry {attempt}/{args.retries})" if attempt else ""))
            failed, new, running = run_round(client, jobs, percentages, args, state, log)
            written += new
            jobs = pending_jobs(log, names, state)
            if running or not failed:
                break
            print(f"{len(set(failed))} file(s) without captions: {', '.join(sorted(set(failed))[:10])}")
    captions.finish(log, written, failed, time.perf_counter() - started, images)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
