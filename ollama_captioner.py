"""ARAS400k captions from a local Ollama server: image mode (moondream) or percentage mode (gemma3).

Paper: M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language Models",
arXiv 2603.09625 (ARAS400k). Each caption is one `POST /api/generate` with `stream: false`:

- `--mode image` (model moondream:latest): the patch as a base64 JPEG (RGB, quality 85, at most
  1024 px a side) with the remote-sensing expert prompt the reference ran with;
- `--mode percentages` (model gemma3:4b-it-qat): no image, the reference's description prompt built
  from the percentages sorted by share ("The scene is primarily composed of: a large amount of
  cropland (55%), built-up (20%), ... and some bare/sparse (1%).").

`options.seed` is --seed plus the caption number, so a re-run asks for the same captions. Failed
requests are named, tried again (--retries) and never written as captions; a re-run retries them.

Commands (start `ollama serve` and `ollama pull moondream` / `ollama pull gemma3:4b-it-qat` first):

    python ollama_captioner.py --images ARAS400k/train/images --out ARAS400k_train_vision_moondream.csv
    python ollama_captioner.py --mode percentages --percentages ARAS400k/class_percentages/train.csv \
        --out ARAS400k_train_description_gemma3.csv
    python ollama_captioner.py --demo

The demo is a dry run on the 8 seeded demo patches (no server): it writes the request bodies to
`<out>.requests.jsonl` and prints `dry run: 8 requests -> results/.../captions.csv.requests.jsonl`.
"""

import base64
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

from common import atomic, cli, runs
from common.aras400k import captions
from common.errors import InputError, cli_entry, require

DEFAULT_MODELS = {"image": "moondream:latest", "percentages": "gemma3:4b-it-qat"}
# The arguments a re-run must share with the caption CSV it continues (with the prompt, see main).
RESUME_SETTINGS = ("model", "mode", "seed")
# The prompt the reference's image captions were made with (its function default).
EXPERT_IMAGE_PROMPT = (
    "You are an expert in remote sensing and satellite imagery analysis. Based only on the visual content "
    "of the provided 256\u00d7256 satellite image (with ~10 meter spatial resolution), generate a concise, "
    "factual, and objective caption describing the scene. Focus only on clearly observable land cover, "
    "land use, or geographic features (e.g., urban areas, agricultural fields, forests, water bodies, "
    "roads). Do not speculate about specific locations, names, activities, or objects that cannot be "
    "confidently identified at this resolution. Avoid making assumptions or adding details not visible "
    "in the image. "
)
# The reference's percentage-mode prompt for a patch without any class share.
OLLAMA_EMPTY_PROMPT = (
    "The provided data indicates no significant land cover percentages. Please describe the scene as a "
    "blank or non-existent landscape."
)


def get_args_parser():
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    captions.add_captioner_arguments(
        parser,
        model="",
        images="ARAS400k/train/images",
        percentages="",
        out="ARAS400k_train_vision_moondream.csv",
        batch_size=1,
        demo_help="Dry run on the seeded demo patches: writes the request bodies, contacts nothing.",
        model_help="Ollama model; empty: moondream:latest (image mode) or gemma3:4b-it-qat (percentages).",
    )
    add = parser.add_argument
    add("--mode", default="image", choices=("image", "percentages"), help="What the model is given.")
    add("--host", default="http://127.0.0.1:11434", help="Ollama server (local by default).")
    add("--prompt", default=EXPERT_IMAGE_PROMPT, help="Prompt of image mode.")
    add("--timeout", type=float, default=120.0, help="Seconds to wait for one answer (the reference's).")
    add("--dry_run", action="store_true", help="Write the request bodies to <out>.requests.jsonl and stop.")
    return parser


def ollama_percentage_prompt(shares) -> str:
    """The Ollama description prompt: classes sorted by share, "a large amount of ... and some ...".

    The reference reads integer percentages as text; here shares are truncated to integers first,
    the sort is stable (ties keep column order) and classes at 0 % are left out, as there.
    """
    integers = {name: int(value) for name, value in shares.items()}
    ordered = [
        (name, value) for name, value in sorted(integers.items(), key=lambda item: -item[1]) if value != 0
    ]
    if not ordered:
        return OLLAMA_EMPTY_PROMPT
    parts = [
        "Based on the following percentages of land cover classes, generate a concise, factual, and "
        "objective description of the scene.",
        "The scene is primarily composed of:",
    ]
    for index, (name, value) in enumerate(ordered):
        if index == 0:
            parts.append(f"a large amount of {name.lower()} ({value}%),")
        elif index == len(ordered) - 1:
            parts.append(f"and some {name.lower()} ({value}%).")
        else:
            parts.append(f"{name.lower()} ({value}%),")
    parts.append("Do not add details that are not provided in the percentages.")
    return " ".join(parts)


def image_to_base64(path) -> str:
    """The reference's image encoding: RGB, thumbnail to 1024 px, JPEG quality 85, base64."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if max(image.size) > 1024:
            image.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def request_body(name, index, args, percentages) -> tuple[dict, str]:
    """The /api/generate body for one caption and its prompt id."""
    body = {"model": args.model, "stream": False, "options": {"seed": args.seed + index}}
    if args.mode == "image":
        body.update(prompt=args.prompt, images=[image_to_base64(Path(args.images) / name)])
        return body, "ollama_image"
    body["prompt"] = ollama_percentage_prompt(percentages[name])
    return body, "ollama_percentages"


def generate(host: str, body: dict, timeout: float) -> str:
    """POST the body to `<host>/api/generate` and return the stripped `response` text.

    A refusal (401/403) or a rate limit (429) stops the run with one line (`refused`); other failures
    raise, so the batch is tried again."""
    request = urllib.request.Request(
        f"{host.rstrip('/')}/api/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            result = json.loads(answer.read())
    except urllib.error.HTTPError as error:
        if error.code in (401, 403, 429):
            raise refused(host, error) from None
        raise
    if "error" in result:
        raise RuntimeError(result["error"])
    text = result.get("response", "").strip()
    if not text:
        raise RuntimeError("empty response")
    return text


def dry_run_body(name, index, args, percentages) -> dict:
    """A request body for --dry_run; an unreadable image is one error line naming it."""
    try:
        return request_body(name, index, args, percentages)[0]
    except OSError as error:  # PIL's unreadable and truncated images
        raise InputError(Path(args.images) / name, f"cannot be read ({error})", "a PNG image") from None


def refused(host: str, error) -> InputError:
    """A server (or the proxy in front of it) that turned the request down, as one line."""
    kept = "finished captions are kept for the next run"
    if error.code == 429:
        return InputError(
            host, f"is rate-limiting requests (429 {error.reason})", f"to run the same command later; {kept}"
        )
    return InputError(
        host,
        f"refused the request ({error.code} {error.reason})",
        f"an Ollama server (or proxy) at --host that accepts this client; {kept}",
    )


def check_server(host: str, model: str) -> None:
    """One readable line when no server answers, it refuses us, or the model is not pulled."""
    try:
        with urllib.request.urlopen(f"{host.rstrip('/')}/api/tags", timeout=5) as answer:
            models = {entry.get("name") for entry in json.loads(answer.read()).get("models", [])}
    except urllib.error.HTTPError as error:
        if error.code in (401, 403, 429):
            raise refused(host, error) from None
        raise InputError(
            host, f"answered {error.code} {error.reason} to /api/tags", "an Ollama server at --host"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise InputError(
            host,
            f"no Ollama server answers ({error})",
            "`ollama serve` running there: check --host and the network",
        ) from None
    if model not in models and f"{model}:latest" not in models:
        raise InputError(
            host, f"has no model {model} (it has {sorted(models)})", f"`ollama pull {model}` first"
        )


def caption_batch(batch, args, percentages):
    rows = []
    for name, index in batch:
        body, prompt_id = request_body(name, index, args, percentages)
        text = generate(args.host, body, args.timeout)
        rows.append({"filename": name, "caption": text, "model": args.model, "prompt_id": prompt_id})
    return rows


@cli_entry
def main(args):
    if args.demo:
        captions.demo_paths(args, "ollama_captioner")
        args.dry_run = True
    args.model = args.model or DEFAULT_MODELS[args.mode]
    runs.print_args(args)
    captions.check_numbers(args)
    require(0 < args.timeout <= 86400, "--timeout", f"is {args.timeout}", "0 to 86400 seconds")

    # ---- inputs ----
    text_only = args.mode == "percentages"
    percentages = captions.read_percentages(args.percentages) if (text_only or args.percentages) else {}
    # Percentage mode captions every row of the table (as the reference) unless --images is typed.
    images = args.images if not text_only or "images" in cli.typed_flags(args) else ""
    names = captions.files_to_caption(images, percentages, text_only, args.percentages)
    settings = {
        **captions.resume_settings(args, RESUME_SETTINGS),
        "prompt": args.prompt if not text_only else "percentages",
    }
    log = captions.CaptionLog(args.out, settings, args.num_captions, args.overwrite)
    jobs = log.missing(names)
    if args.dry_run:
        lines = [json.dumps(dry_run_body(name, index, args, percentages)) for name, index in jobs]
        path = Path(f"{args.out}.requests.jsonl")
        atomic.write_text(path, "".join(line + "\n" for line in lines))
        print(f"dry run: {len(lines)} requests -> {path}")
        return

    # ---- caption ----
    check_server(args.host, args.model)
    print(f"{len(jobs)} captions to make with {args.model} at {args.host}")
    written, failed, seconds = captions.caption_batches(
        jobs, args.batch_size, lambda batch: caption_batch(batch, args, percentages), log, args.retries
    )
    captions.finish(log, written, failed, seconds, len({name for name, _ in jobs}))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
