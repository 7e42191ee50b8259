"""ARAS400k captions: what the five captioners share (percentage CSVs, resumable caption CSVs, generation).

Every captioner (`vision_language_captioner.py`, `vision_captioner.py`, `text_captioner.py`,
`gpt_captioner.py`, `ollama_captioner.py`) reads the class-percentage table of a split
(`common.aras400k.percentages`, values in percent), builds the prompt of its ARAS400k reference
script (Caglar & Temizel, arXiv 2603.09625; each prompt lives in its captioner, the pieces two of
them share here), and appends its captions to one CSV (`CAPTION_COLUMNS`) that a re-run continues.
The settings that shape the captions (model, prompt, generation config) are recorded next to the
CSV and a re-run with other settings is refused. `caption_stats.py` reads the same CSVs.
"""

import argparse
import csv
import io
import json
import math
import os
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from common import atomic, parallel, progress, runs
from common.aras400k import classes, demo_data, percentages
from common.errors import InputError, require, require_dir, require_file

CAPTION_COLUMNS = ["filename", "caption", "model", "prompt_id"]
IMAGE_EXTENSIONS = (".png",)

# The base prompt of the reference's Gemma-3 and Qwen3-VL captioners, word for word.
BASE_PROMPT = (
    "Describe this remote sensing image in 1 or 2 concise sentences, "
    "focusing on land use and key geographical features."
)


# ---- percentage tables and image lists ----


def read_percentages(path) -> dict[str, dict[str, float]]:
    """Read a class-percentage CSV into `{filename: {class name: percent}}`, checking every value.

    Columns must be `PERCENTAGE_COLUMNS` (extra columns are ignored); each value a finite number in
    [0, 100]. Values are read as floats, as pandas reads the reference's float columns.
    """
    path = require_file(path, "a class-percentage CSV (filename + the 7 ARAS400k classes in percent)")
    try:
        return _read_percentages(path)
    except (UnicodeDecodeError, csv.Error) as error:
        problem = f"is not a readable CSV ({type(error).__name__}: {str(error)[:80]})"
        raise InputError(path, problem, "a UTF-8 class-percentage CSV") from None


def _read_percentages(path) -> dict[str, dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = [name for name in percentages.COLUMNS if name not in (reader.fieldnames or [])]
        require(
            not missing,
            path,
            f"lacks the column(s) {', '.join(missing)}",
            ", ".join(percentages.COLUMNS),
        )
        table = {}
        for line, row in enumerate(reader, start=2):
            shares = {}
            for name in classes.CLASS_NAMES:
                try:
                    value = float(row[name])
                except (TypeError, ValueError):
                    value = math.nan
                require(
                    math.isfinite(value) and 0 <= value <= 100,
                    path,
                    f"line {line} ({row['filename']}): {name} is {row[name]!r}",
                    "a percentage between 0 and 100",
                )
                shares[name] = value
            require(
                row["filename"] not in table,
                path,
                f"line {line}: {row['filename']} repeats",
                "one row per image",
            )
            table[row["filename"]] = shares
    require(table, path, "has no rows", "one row per image")
    return table


def ensure_percentages(masks_dir, csv_path) -> Path:
    """Write the percentage CSV of a mask folder when it is missing (the demo); return its path."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        percentages.write_class_percentages(masks_dir, csv_path)
    return csv_path


def list_images(folder) -> list[str]:
    """The sorted file names of the PNG images in a folder (the reference captions `.png` only)."""
    folder = require_dir(folder, "a folder of ARAS400k .png images")
    names = sorted(path.name for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
    require(names, folder, "holds no .png images", "at least one ARAS400k .png image")
    return names


def files_to_caption(images_dir, table, need_percentages: bool, source) -> list[str]:
    """The images to caption: those of `images_dir`, or every row of the table when it is empty.

    A text-only captioner needs a row for every image; the first image without one is an error.
    """
    names = list_images(images_dir) if images_dir else sorted(table)
    if need_percentages:
        lacking = [name for name in names if name not in table]
        require(
            not lacking,
            source,
            f"has no row for {len(lacking)} image(s), e.g. {lacking[:1]}",
            "a row per image",
        )
    return names


def demo_inputs(root, seed: int, train_images: int = 8, image_size: int = 64) -> tuple[Path, Path]:
    """Seeded demo patches (common.aras400k.demo_data) and their percentage CSV; returns (images, CSV)."""
    root = demo_data.write_demo_patches(root, image_size, train_images, seed)
    csv_path = percentages.csv_path(root, "train")
    stale = csv_path.exists() and csv_path.stat().st_mtime < (root / "demo.json").stat().st_mtime
    if stale:
        csv_path.unlink()
    return root / "train" / "images", ensure_percentages(root / "train" / "masks", csv_path)


# ---- prompts: the pieces two captioners share ----


def present_classes(shares: Mapping[str, float]) -> list[str]:
    """`Class (v%)` for every class above 0, in column order, v rounded to 2 decimals as the references do."""
    return [f"{name} ({round(value, 2)}%)" for name, value in shares.items() if value > 0]


# ---- the caption CSV: resumable, header once, settings recorded ----


def settings_path(out_csv) -> Path:
    """Where the settings of a caption CSV are recorded: `<out>.settings.json` next to it."""
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.name + ".settings.json")


class CaptionLog:
    """The append-only caption CSV of one captioner run, and what it still lacks.

    Opening reads the captions already there (a record cut off by a crash is dropped and reported),
    refuses a file made with other settings (`settings_path`), and counts the captions per file;
    `append` writes rows and syncs them to disk, so a killed run loses at most the batch in flight.
    """

    def __init__(self, out_csv, settings: Mapping, num_captions: int, overwrite: bool = False):
        require(num_captions >= 1, "--num_captions", f"is {num_captions}", "at least 1")
        self.path = Path(out_csv)
        self.num_captions = num_captions
        if overwrite:
            for stale in (self.path, settings_path(self.path)):
                stale.unlink(missing_ok=True)
        hint = (
            "the same model and generation settings to continue, --overwrite to start over, or another --out"
        )
        if self.path.exists() and not settings_path(self.path).exists():
            raise InputError(self.path, "exists but has no settings record next to it", hint)
        _require_readable_json(settings_path(self.path), "the settings record an earlier run wrote")
        self.settings = runs.check_same_settings(
            settings_path(self.path), settings, what="its captions", hint=hint
        )
        for stale in self.path.parent.glob(f".{self.path.name}*.tmp*"):  # killed atomic writes
            stale.unlink()
        self.counts = Counter(row["filename"] for row in self._read_existing())
        # The record is written with the first captions, so a run that fails before any leaves nothing.
        self._recorded = settings_path(self.path).exists() and self.path.exists()

    def record_settings(self) -> None:
        """Write the settings record next to the CSV (before its first rows)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(settings_path(self.path), {**self.settings, "versions": runs.library_versions()})
        self._recorded = True

    def _read_existing(self) -> list[dict]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        try:
            text = self.path.read_text(encoding="utf-8")
            rows = list(csv.reader(io.StringIO(text)))
        except (UnicodeDecodeError, csv.Error) as error:
            problem = f"is not a readable caption CSV ({type(error).__name__})"
            raise InputError(self.path, problem, "the CSV an earlier run wrote, or --overwrite") from None
        require(
            rows and rows[0] == CAPTION_COLUMNS, self.path, "has another header", ",".join(CAPTION_COLUMNS)
        )
        if not text.endswith("\n"):
            # A crash during an append left half a record: keep the complete ones only.
            print(
                f"{self.path}: dropping an incomplete last record ({rows[-1][:1]}) left by an interrupted run"
            )
            rows = rows[:-1]
            atomic.write_text(self.path, _csv_text(rows))
        broken = [index + 1 for index, row in enumerate(rows) if len(row) != len(CAPTION_COLUMNS)]
        require(not broken, self.path, f"line {broken[:1]} has another number of fields", "4 fields per line")
        return [dict(zip(CAPTION_COLUMNS, row, strict=True)) for row in rows[1:]]

    def missing(self, filenames: Sequence[str], batch_size: int = 1, shard=None) -> list[tuple[str, int]]:
        """`(filename, caption number)` of every caption still to make, file by file (of a shard's
        batches only, `caption_jobs`); the rows a file has in the CSV are its first jobs."""
        done, jobs = Counter(), []
        for name, index in caption_jobs(filenames, self.num_captions, batch_size, shard):
            if done[name] < self.counts[name]:
                done[name] += 1
            else:
                jobs.append((name, index))
        return jobs

    def append(self, rows: Sequence[Mapping]) -> None:
        """Append caption rows (the header first when the file is new) and sync them to disk."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        lines = ([CAPTION_COLUMNS] if new else []) + [[row[key] for key in CAPTION_COLUMNS] for row in rows]
        if not self._recorded:
            self.record_settings()
        with open(self.path, "a", encoding="utf-8", newline="") as file:
            file.write(_csv_text(lines))
            file.flush()
            os.fsync(file.fileno())
        self.counts.update(row["filename"] for row in rows)


def caption_jobs(filenames: Sequence[str], num_captions: int, batch_size: int, shard=None) -> list:
    """`(filename, caption number)` of every caption, file by file; with `shard` (K, N) only the batches
    of `batch_size` jobs that shard K of N makes (`common.parallel.shard_batches`)."""
    jobs = [(name, index) for name in filenames for index in range(num_captions)]
    if shard is None:
        return jobs
    return [jobs[row] for row in parallel.shard_rows(len(jobs), batch_size, shard)]


def _require_readable_json(path, expected: str) -> None:
    """An existing JSON record that cannot be read (not UTF-8, not JSON, not an object) as one line."""
    path = Path(path)
    if not path.exists():
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    require(isinstance(record, dict), path, "is not a readable JSON record", f"{expected}, or --overwrite")


def _csv_text(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


# ---- running batches: failures reported by file name and retried ----


def caption_batches(
    jobs: Sequence[tuple[str, int]],
    batch_size: int,
    make_captions: Callable[[list[tuple[str, int]]], list[dict]],
    log: CaptionLog,
    retries: int = 2,
    seed: int | None = None,
    show_progress: bool = False,
) -> tuple[int, list[str], float]:
    """Caption `jobs` batch by batch, appending each finished batch to `log`.

    With `seed`, PyTorch is re-seeded before each batch from the seed and the batch's first job, so
    a resumed run samples the same captions as an uninterrupted one (finished batches are a prefix).

    A batch that raises is reported with its file names and tried again up to `retries` times; its
    files are left out of the CSV if it keeps failing, so a later run retries them. An `InputError`
    (a refused key, a rate limit) stops at once; the finished batches stay in the CSV. Returns the
    number of captions written, the files that failed and the seconds spent. A bar of batches
    (rate, ETA) goes to stderr on a terminal or with `show_progress` (common/progress.py).
    """
    start = time.perf_counter()
    written, failed = 0, []
    batches = [list(jobs[index : index + batch_size]) for index in range(0, len(jobs), batch_size)]
    bar = progress.bar(batches, desc="caption batches", enabled=show_progress, unit="batch")
    for number, batch in enumerate(bar, start=1):
        for attempt in range(retries + 1):
            if seed is not None:
                seed_torch((seed + zlib.crc32(f"{batch[0][0]}#{batch[0][1]}".encode())) % 2**32)
            try:
                rows = make_captions(batch)
                break
            except InputError:  # a refusal another try would not change: stop, finished batches kept
                raise
            except Exception as error:  # every failure is named; none stops the other batches
                names = ", ".join(sorted({name for name, _ in batch}))
                again = f"; trying again ({attempt + 1}/{retries})" if attempt < retries else "; giving up"
                problem = f"{type(error).__name__}: {error}"
                print(f"batch {number}/{len(batches)} failed for {names}: {problem}{again}", flush=True)
        else:
            failed.extend(sorted({name for name, _ in batch}))
            continue
        log.append(rows)
        written += len(rows)
        print(f"batch {number}/{len(batches)}: {written}/{len(jobs)} captions", flush=True)
    return written, failed, time.perf_counter() - start


def finish(log: CaptionLog, written: int, failed: Sequence[str], seconds: float, images: int) -> None:
    """Print the throughput line; failed files are one error line (exit 2) after the others finished."""
    rate = images / seconds if seconds > 0 else float("inf")
    print(
        f"captioned {images - len(set(failed))} images ({written} captions) in {seconds:.1f} s: "
        f"{rate:.2f} images/s -> {log.path}"
    )
    if failed:
        names = sorted(set(failed))
        raise InputError(
            log.path,
            f"{len(names)} image(s) failed after retries and have no caption: {', '.join(names[:10])}",
            "the same command again to retry them (finished captions are kept)",
        )


def caption_missing(
    log: CaptionLog,
    names,
    batch_size: int,
    make_captions,
    retries: int,
    seed=None,
    shard=None,
    show_progress=False,
) -> None:
    """The captions `log` still lacks for `names` (of `shard` only), made batch by batch
    (`caption_batches`), then `finish`."""
    jobs = log.missing(names, batch_size, shard)
    images = len({name for name, _ in jobs})
    if shard is not None:
        names = sorted({name for name, _ in caption_jobs(names, log.num_captions, batch_size, shard)})
        print(f"shard {shard[0]}/{shard[1]}: {len(names)} images -> {log.path}")
    print(f"{len(jobs)} captions to make ({len(names) - images} images already done)")
    written, failed, seconds = caption_batches(
        jobs, batch_size, make_captions, log, retries, seed=seed, show_progress=show_progress
    )
    finish(log, written, failed, seconds, images)


def caption_missing_of(args, log: CaptionLog, names, make_captions, shard=None) -> None:
    """`caption_missing` with a local captioner's --batch_size, --retries, --seed and --progress."""
    caption_missing(
        log,
        names,
        args.batch_size,
        make_captions,
        args.retries,
        seed=args.seed,
        shard=shard,
        show_progress=args.progress,
    )


def shard_log(args, settings: Mapping, shard) -> CaptionLog:
    """The caption CSV of this run: `--out`, or with `--shard K/N` its part `<out>.shards/K_of_N.csv`.

    A part records the shard and what deals the jobs (batch size, captions per image) with its
    settings, so a resumed shard and `merge_parts` find the same batches.
    """
    if shard is None:
        return CaptionLog(args.out, settings, args.num_captions, args.overwrite)
    part = parallel.shard_path(args.out, shard, Path(args.out).suffix)
    return CaptionLog(part, {**settings, "shard": _dealt(args, shard)}, args.num_captions, args.overwrite)


def _dealt(args, shard) -> dict:
    # What deals a part's jobs: recorded with its settings, checked on resume and by merge_parts.
    return {
        "part": f"{shard[0]}/{shard[1]}",
        "batch_size": args.batch_size,
        "num_captions": args.num_captions,
    }


def merge_parts(args, names: Sequence[str]) -> Path:
    """`--merge`: the finished `--shard K/N` parts of `--out` joined into the CSV one process writes.

    Every part must hold the captions of exactly its batches (`caption_jobs`); the rows are put
    back in the one-process order, and the settings record of the parts (less the shard) is written
    next to `--out`, so a later run continues the merged CSV like its own.
    """
    out = Path(args.out)
    require(
        args.overwrite or not out.exists(), out, "exists already", "--overwrite to replace it by the merge"
    )
    parts = parallel.shard_parts(out, out.suffix, lambda part: settings_path(part).is_file())
    rows_of, common = {}, None
    for index, part in enumerate(parts, start=1):
        _require_readable_json(settings_path(part), "the settings record of a --shard run")
        record = json.loads(settings_path(part).read_text(encoding="utf-8"))
        dealt = _dealt(args, (index, len(parts)))
        recorded = record.pop("shard", None)
        require(
            recorded == dealt,
            settings_path(part),
            f"records the shard {recorded}",
            f"{dealt} (the --batch_size and --num_captions of the shards)",
        )
        record.pop("versions", None)
        require(
            common in (None, record), part, "was made with other settings than shard 1", "one command line"
        )
        common = record
        jobs = caption_jobs(names, args.num_captions, args.batch_size, (index, len(parts)))
        rows = CaptionLog(part, common | {"shard": dealt}, args.num_captions)._read_existing()
        have, want = Counter(row["filename"] for row in rows), Counter(name for name, _ in jobs)
        require(have == want, part, f"holds {len(rows)} of its {len(jobs)} captions", "a finished shard")
        for row in rows:
            rows_of.setdefault((index, row["filename"]), []).append(row)
    dealt_to = {
        job: index
        for index in range(1, len(parts) + 1)
        for job in caption_jobs(names, args.num_captions, args.batch_size, (index, len(parts)))
    }
    merged = [rows_of[(dealt_to[job], job[0])].pop(0) for job in caption_jobs(names, args.num_captions, 1)]
    lines = [CAPTION_COLUMNS] + [[row[key] for key in CAPTION_COLUMNS] for row in merged]
    atomic.write_json(settings_path(out), {**common, "versions": runs.library_versions()})
    atomic.write_text(out, _csv_text(lines))
    print(f"merged {len(parts)} shards: {len(merged)} captions of {len(names)} images -> {out}")
    return out


def resume_settings(args, keys) -> dict:
    """`runs.settings_of` for a caption CSV: a local model folder is recorded relative to the CSV's
    folder, so a moved results tree with its model still continues; a hub id stays as typed."""
    local = [key for key in keys if key == "model" and Path(getattr(args, key)).is_dir()]
    return runs.settings_of(args, keys, Path(args.out).parent, input_paths=local)


# ---- the numbers every captioner checks before it writes anything ----

MAX_CAPTIONS_PER_IMAGE = 1000
MAX_RETRIES = 100


def check_numbers(args) -> None:
    """The shared numeric flags in range (`--batch_size`, `--max_new_tokens` where the script has them)."""
    require(
        1 <= args.num_captions <= MAX_CAPTIONS_PER_IMAGE,
        "--num_captions",
        f"is {args.num_captions}",
        f"1 to {MAX_CAPTIONS_PER_IMAGE}",
    )
    require(0 <= args.retries <= MAX_RETRIES, "--retries", f"is {args.retries}", f"0 to {MAX_RETRIES}")
    require(0 <= args.seed < 2**32, "--seed", f"is {args.seed}", "0 to 2**32 - 1")
    if hasattr(args, "batch_size"):
        require(args.batch_size >= 1, "--batch_size", f"is {args.batch_size}", "at least 1")
    if hasattr(args, "max_new_tokens"):
        require(args.max_new_tokens >= 1, "--max_new_tokens", f"is {args.max_new_tokens}", "at least 1")


def require_context_room(model, max_new_tokens: int) -> None:
    """--max_new_tokens within the model's context (a larger value could never be generated)."""
    config = getattr(model.config, "text_config", None) or model.config
    room = getattr(config, "max_position_embeddings", None)
    require(
        room is None or max_new_tokens < room,
        "--max_new_tokens",
        f"is {max_new_tokens}, beyond the model's context of {room} tokens",
        f"fewer than {room}",
    )


# ---- PyTorch captioners: seeding, device, generation records, demo tokenizers ----


def generate_texts(model, inputs: Mapping, tokenizer, **generate) -> list[str]:
    """Each prompt's generated continuation, decoded and stripped. The prompts are left-padded, so every
    prompt ends at the same column and the new tokens start there."""
    import torch

    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        generated = model.generate(**inputs, use_cache=True, **generate)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def seed_torch(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (sampling captioners draw from torch's generator)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def torch_device_and_dtype(device: str, dtype: str):
    """`--device auto|cpu|cuda` and `--dtype auto|bfloat16|float32` (auto: bf16 on a GPU, fp32 on a CPU)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    require(
        device != "cuda" or torch.cuda.is_available(),
        "--device",
        "is cuda but no GPU is visible",
        "cpu or auto",
    )
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def generation_record(model, **overrides) -> dict:
    """The generation settings in effect: the checkpoint's GenerationConfig updated by our overrides."""
    config = model.generation_config.to_dict()
    config.update(overrides)
    keys = ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "num_beams")
    return {key: config.get(key) for key in keys}


def require_distinct_captions(num_captions: int, generation: Mapping) -> None:
    """Several captions per image need sampling: greedy decoding would repeat the first one."""
    require(
        num_captions == 1 or generation.get("do_sample"),
        "--num_captions",
        f"is {num_captions} but decoding is greedy (every caption would be the same)",
        "1, or a sampling generation config",
    )


def load_pretrained(loader, model_path, what: str, **kwargs):
    """`loader.from_pretrained(model_path)` with an unusable folder or hub id as one error line.

    The loading progress bars are turned off, so an error stays the only line on stderr.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(
            model_path, f"cannot load {what} ({first[:200]})", f"a local {what} folder or a hub id"
        ) from None


DEMO_SENTENCES = [
    "This remote sensing image shows tree cover, shrubland, grassland and cropland fields.",
    "Built-up areas, bare or sparse vegetation and water bodies appear in the scene.",
    "Describe the scene in 1 or 2 concise sentences focusing on spatial layout and dominant land use.",
]


def demo_tokenizer(special_tokens: Sequence[str], chat_template: str, vocab_size: int = 320, **named):
    """A byte-level BPE tokenizer trained on a few sentences, as a fast tokenizer with a chat template.

    `named` maps the tokenizer's roles (eos_token, pad_token, ...) to entries of `special_tokens`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(DEMO_SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, **named)


# ---- the flags every captioner shares ----


def add_captioner_arguments(
    parser,
    model: str,
    images: str,
    percentages: str,
    out: str,
    batch_size: int = 0,
    demo_help: str = "",
    model_help: str = "",
) -> None:
    """The flags of every captioner: inputs, output, batch size, captions per image, retries, seed, demo."""
    add = parser.add_argument
    add(
        "--model",
        default=model,
        help=model_help or "Local model folder (save_pretrained / hf download), or a hub id with network.",
    )
    add("--images", default=images, help="Folder of .png patches to caption.")
    add(
        "--percentages",
        default=percentages,
        help="Class-percentage CSV of the split (filename + 7 classes in %%).",
    )
    add(
        "--out", default=out, help="Caption CSV (filename, caption, model, prompt_id); a re-run continues it."
    )
    if batch_size:
        add(
            "--batch_size",
            type=int,
            default=batch_size,
            help="Captions per generate call (and per CSV append).",
        )
    add("--num_captions", type=int, default=1, help="Captions per image (several need sampling).")
    add("--retries", type=int, default=2, help="Extra tries of a failed batch before its files are reported.")
    add("--seed", type=int, default=0, help="Seeds Python, NumPy and PyTorch (sampling captioners).")
    add("--overwrite", action="store_true", help="Delete --out and its settings record and start over.")
    add("--results_dir", default="results", help=argparse.SUPPRESS)
    parser.add_argument(
        "--demo",
        action="store_true",
        help=demo_help
        or "Caption the seeded demo patches with a tiny randomly initialised model of the real "
        "architecture (gibberish captions, real pipeline; under a minute on a CPU).",
    )


def add_torch_arguments(parser) -> None:
    """--device, --dtype and --progress of the transformers captioners."""
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when visible."
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="auto: bfloat16 on cuda, float32 on cpu.",
    )
    progress.add_argument(parser)


def demo_paths(args, script_stem: str) -> Path:
    """Point a captioner's flags at the demo data; returns the demo folder (under results/demo_data)."""
    folder = Path(args.results_dir) / "demo_data" / script_stem
    args.images, args.percentages = (str(path) for path in demo_inputs(folder / "patches", args.seed))
    args.out = str(Path(args.results_dir) / script_stem / "demo" / "captions.csv")
    # The demo re-creates its captions each time, so its throughput line is always measured.
    args.overwrite = True
    return folder
