"""The ARAS400k captioners: reference prompts, resumable CSV, the Qwen3-VL inputs, one generate per
family with tiny models, the OpenAI Batch flow and Ollama against local HTTP servers."""

import argparse
import base64
import csv
import email.parser
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from conftest import assert_main_error, call_main
from PIL import Image

import gpt_captioner
import ollama_captioner
import text_captioner
import vision_captioner
import vision_language_captioner
from common.aras400k import captions
from common.errors import InputError

SHARES = {
    "Tree": 41.5,
    "Shrubland": 0.0,
    "Grassland": 12.0,
    "Cropland": 0.0,
    "Built-up": 3.333,
    "Bare/sparse": 0.0,
    "Water": 43.167,
}
NONE = dict.fromkeys(SHARES, 0.0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo patches, their percentage CSV and the three tiny transformers checkpoints."""
    root = tmp_path_factory.mktemp("captions")
    torch.manual_seed(0)
    images, table = captions.demo_inputs(root / "patches", seed=0, train_images=4)
    return {
        "root": root,
        "images": images,
        "percentages": table,
        "qwen_vl": vision_language_captioner.make_demo_model(root / "qwen_vl"),
        "gemma": vision_captioner.make_demo_model(root / "gemma"),
        "qwen": text_captioner.make_demo_model(root / "qwen"),
    }


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


# ---- prompts exactly as the reference scripts build them ----


def test_prompts_are_the_references():
    assert vision_language_captioner.vision_language_prompt(SHARES) == (
        "This remote sensing image contains the following land cover distribution: Tree (41.5%), "
        "Grassland (12.0%), Built-up (3.33%), Water (43.17%). Based on this information, describe the "
        "scene in 1 or 2 concise sentences focusing on spatial layout and dominant land use types.",
        "percentages",
    )
    assert vision_language_captioner.vision_language_prompt(NONE) == (captions.BASE_PROMPT, "base")
    assert vision_language_captioner.vision_language_prompt(None) == (captions.BASE_PROMPT, "base")
    system, user = text_captioner.text_messages(SHARES)
    assert system == {"role": "system", "content": "You are a remote sensing expert."}
    assert user["content"] == (
        "An image shows: Tree (41.5%), Grassland (12.0%), Built-up (3.33%), Water (43.17%). Describe the "
        "scene in 1 or 2 concise sentences focusing on dominant land use."
    )
    assert text_captioner.text_messages(NONE)[1]["content"].startswith(
        "An image shows: unidentified land cover. "
    )
    assert gpt_captioner.gpt_user_message(SHARES) == "Tree 41%, Grassland 12%, Built-up 3%, Water 43%"
    assert ollama_captioner.ollama_percentage_prompt(SHARES) == (
        "Based on the following percentages of land cover classes, generate a concise, factual, and "
        "objective description of the scene. The scene is primarily composed of: a large amount of water "
        "(43%), tree (41%), grassland (12%), and some built-up (3%). Do not add details that are not "
        "provided in the percentages."
    )
    # Ties keep column order; a single class only gets the "a large amount of" part; none: the fallback.
    tied = {**NONE, "Water": 50.0, "Tree": 50.0}
    assert "a large amount of tree (50%), and some water (50%)." in ollama_captioner.ollama_percentage_prompt(
        tied
    )
    single = ollama_captioner.ollama_percentage_prompt({**NONE, "Cropland": 100.0})
    assert "composed of: a large amount of cropland (100%), Do not add" in single
    assert ollama_captioner.ollama_percentage_prompt(NONE) == ollama_captioner.OLLAMA_EMPTY_PROMPT


def test_percentage_csv_errors(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("filename,Tree\na.png,3\n")
    with pytest.raises(InputError, match="lacks the column"):
        captions.read_percentages(path)
    header = ",".join(["filename", *SHARES])
    path.write_text(f"{header}\na.png,1,2,3,4,5,6,x\n")
    with pytest.raises(InputError, match=r"line 2 \(a.png\): Water is 'x'; expected a percentage"):
        captions.read_percentages(path)


# ---- the caption CSV: resume, header once, incomplete records, changed settings ----


def test_caption_log_resumes_and_refuses_other_settings(tmp_path):
    out = tmp_path / "c.csv"
    log = captions.CaptionLog(out, {"model": "m"}, num_captions=2)
    assert log.missing(["a.png", "b.png"]) == [("a.png", 0), ("a.png", 1), ("b.png", 0), ("b.png", 1)]
    row = {"filename": "a.png", "caption": 'two\nlines, "quoted"', "model": "m", "prompt_id": "p"}
    log.append([row, {**row, "caption": "x"}])
    log.append([{**row, "filename": "b.png"}])
    again = captions.CaptionLog(out, {"model": "m"}, num_captions=2)
    assert again.missing(["a.png", "b.png"]) == [("b.png", 1)]
    assert out.read_text().count("filename,caption") == 1
    assert read_rows(out)[0]["caption"] == 'two\nlines, "quoted"'
    # Half a record left by a crash is dropped, the complete ones are kept.
    with open(out, "a") as file:
        file.write('c.png,"half a capt')
    assert captions.CaptionLog(out, {"model": "m"}, 2).missing(["a.png", "b.png", "c.png"]) == [
        ("b.png", 1),
        ("c.png", 0),
        ("c.png", 1),
    ]
    assert len(read_rows(out)) == 3
    with pytest.raises(InputError, match="made with model=m"):
        captions.CaptionLog(out, {"model": "other"}, 2)
    assert not captions.CaptionLog(out, {"model": "other"}, 2, overwrite=True).counts


def test_failed_batches_are_named_retried_and_left_out(tmp_path, capsys):
    log = captions.CaptionLog(tmp_path / "c.csv", {"model": "m"}, 1)
    attempts = {}

    def make(batch):
        names = tuple(name for name, _ in batch)
        attempts[names] = attempts.get(names, 0) + 1
        if names == ("c.png", "d.png") or (names == ("a.png", "b.png") and attempts[names] == 1):
            raise RuntimeError("out of memory")
        return [{"filename": n, "caption": n, "model": "m", "prompt_id": "p"} for n in names]

    jobs = log.missing(["a.png", "b.png", "c.png", "d.png", "e.png"])
    written, failed, _ = captions.caption_batches(jobs, 2, make, log, retries=1)
    printed = capsys.readouterr().out
    assert "batch 1/3 failed for a.png, b.png: RuntimeError: out of memory; trying again (1/1)" in printed
    assert "batch 2/3 failed for c.png, d.png: RuntimeError: out of memory; giving up" in printed
    assert (written, failed) == (3, ["c.png", "d.png"])
    assert [row["filename"] for row in read_rows(log.path)] == ["a.png", "b.png", "e.png"]
    with pytest.raises(
        InputError, match=r"2 image.s. failed after retries and have no caption: c.png, d.png"
    ):
        captions.finish(log, written, failed, 1.0, 5)


# ---- Qwen3-VL: our input assembly equals the processor's ----


def test_qwen_vl_inputs_equal_the_processor(demo, monkeypatch):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLProcessor, processing_utils

    tokenizer = AutoTokenizer.from_pretrained(demo["qwen_vl"])
    image_processor = AutoImageProcessor.from_pretrained(demo["qwen_vl"], backend="pil")
    # Without torchvision the processor refuses to start for want of its video processor; images
    # never reach it, so its class check is skipped for that one missing part.
    check = processing_utils.ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(
        processing_utils.ProcessorMixin,
        "check_argument_for_proper_class",
        lambda self, name, arg: None if arg is None else check(self, name, arg),
    )
    processor = Qwen3VLProcessor(image_processor, tokenizer, None, chat_template=tokenizer.chat_template)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 64), (96, 48))
    ]
    texts = [vision_language_captioner.vision_language_prompt(SHARES)[0], captions.BASE_PROMPT]
    conversations = [
        [{"role": "user", "content": [{"type": "text", "text": t}, {"type": "image", "image": i}]}]
        for t, i in zip(texts, images, strict=True)
    ]
    expected = processor.apply_chat_template(
        conversations,
        tokenize=True,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
        processor_kwargs={"padding": True, "padding_side": "left"},
    )
    ours = vision_language_captioner.qwen_vl_inputs(tokenizer, image_processor, conversations, images)
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    assert (ours["attention_mask"][:, 0] == 0).any()  # the shorter prompt is padded on the left


# ---- one generate per family with the tiny models ----


def test_vision_language_captioner_captions_and_resumes(demo, tmp_path, capsys):
    out = tmp_path / "vl.csv"
    argv = (
        f"--model {demo['qwen_vl']} --images {demo['images']} --percentages {demo['percentages']} "
        f"--out {out} --batch_size 3 --max_new_tokens 4"
    )
    call_main(vision_language_captioner, argv)
    rows = read_rows(out)
    assert [row["filename"] for row in rows] == captions.list_images(demo["images"])
    assert {row["prompt_id"] for row in rows} == {"percentages"}
    assert all(row["caption"] and row["model"] == str(demo["qwen_vl"]) for row in rows)
    assert "images/s" in capsys.readouterr().out
    call_main(vision_language_captioner, argv)
    assert "0 captions to make (4 images already done)" in capsys.readouterr().out
    assert read_rows(out) == rows
    assert_main_error(
        capsys, lambda: call_main(vision_language_captioner, f"{argv} --num_captions 2"), "decoding is greedy"
    )


def test_vision_captioner_records_the_checkpoint_sampling(demo, tmp_path):
    out = tmp_path / "gemma.csv"
    call_main(
        vision_captioner, f"--model {demo['gemma']} --images {demo['images']} --out {out} --max_new_tokens 3"
    )
    assert {row["prompt_id"] for row in read_rows(out)} == {"base"}
    recorded = json.loads(captions.settings_path(out).read_text())["generation"]
    assert (recorded["do_sample"], recorded["top_k"], recorded["top_p"]) == (True, 64, 0.95)


def test_text_captioner_resume_equals_an_uninterrupted_run(demo, tmp_path):
    out = tmp_path / "text.csv"
    argv = (
        f"--model {demo['qwen']} --percentages {demo['percentages']} --out {out} "
        "--batch_size 3 --num_captions 2 --max_new_tokens 4"
    )
    call_main(text_captioner, argv)
    full = out.read_text()
    assert len(read_rows(out)) == 8
    # Keep the header and the first batch only, as if the run had been killed after it.
    out.write_text("".join(full.splitlines(keepends=True)[:1]) + _first_rows(full, 3))
    call_main(text_captioner, argv)
    assert out.read_text() == full


def test_vision_captioner_resume_equals_an_uninterrupted_sampling_run(demo, tmp_path):
    out = tmp_path / "gemma_resume.csv"
    argv = (
        f"--model {demo['gemma']} --images {demo['images']} --out {out} "
        "--batch_size 2 --num_captions 2 --max_new_tokens 4"
    )
    call_main(vision_captioner, argv)
    full = out.read_text()
    assert len(read_rows(out)) == 8
    assert json.loads(captions.settings_path(out).read_text())["generation"]["do_sample"] is True
    # Keep the header and the first batch only, as if the run had been killed after it.
    out.write_text("".join(full.splitlines(keepends=True)[:1]) + _first_rows(full, 2))
    call_main(vision_captioner, argv)
    assert out.read_text() == full


def _first_rows(text, count):
    rows = list(csv.reader(io.StringIO(text)))[1 : 1 + count]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


# ---- local HTTP servers speaking the OpenAI files/batches API and Ollama's /api/generate ----


class Server:
    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.state = {"requests": [], "files": {}, "batches": {}, "fail_once": set(), "seen": set()}
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.state = self.httpd.state

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, data, status=200):
        body = data.encode() if isinstance(data, str) else json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        return self.rfile.read(int(self.headers["Content-Length"]))


class OpenAIHandler(Handler):
    def do_POST(self):
        state = self.server.state
        if self.path == "/v1/files":
            header = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
            message = email.parser.BytesParser().parsebytes(header + self.body())
            part = next(p for p in message.get_payload() if p.get_filename())
            file_id = f"file-{len(state['files'])}"
            state["files"][file_id] = part.get_payload(decode=True).decode()
            info = {
                "id": file_id,
                "object": "file",
                "bytes": 1,
                "created_at": 0,
                "filename": part.get_filename(),
            }
            return self.reply({**info, "purpose": "batch", "status": "processed"})
        request = json.loads(self.body())
        assert (request["endpoint"], request["completion_window"]) == ("/v1/chat/completions", "24h")
        batch_id = f"batch-{len(state['batches'])}"
        state["batches"][batch_id] = {"input": request["input_file_id"], "polls": 0}
        return self.reply(self.batch(batch_id, "validating"))

    def batch(self, batch_id, status, **extra):
        fields = {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions", "created_at": 0}
        fields.update(input_file_id=self.server.state["batches"][batch_id]["input"], completion_window="24h")
        return {**fields, "status": status, **extra}

    def do_GET(self):
        state = self.server.state
        if self.path.startswith("/v1/files/"):
            return self.reply(state["files"][self.path.split("/")[3]])
        batch_id = self.path.rsplit("/", 1)[1]
        record = state["batches"][batch_id]
        record["polls"] += 1
        if record["polls"] == 1:
            counts = {"total": 1, "completed": 0, "failed": 0}
            return self.reply(self.batch(batch_id, "in_progress", request_counts=counts))
        outputs, errors = [], []
        for line in state["files"][record["input"]].splitlines():
            request = json.loads(line)
            state["requests"].append(request)
            cid = request["custom_id"]
            if cid in state["fail_once"] and cid not in state["seen"]:
                state["seen"].add(cid)
                errors.append({"id": "r", "custom_id": cid, "response": None, "error": {"message": "boom"}})
                continue
            text = f"caption of {request['body']['messages'][1]['content']}"
            body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": f" {text} "}}]}
            outputs.append({"id": "r", "custom_id": cid, "response": {"status_code": 200, "body": body}})
        files = {}
        for kind, lines in (("output", outputs), ("error", errors)):
            if lines:
                files[f"{kind}_file_id"] = f"file-{kind}-{batch_id}"
                state["files"][files[f"{kind}_file_id"]] = "".join(json.dumps(x) + "\n" for x in lines)
        return self.reply(self.batch(batch_id, "completed", **files))


def test_gpt_captioner_end_to_end_with_the_openai_client(demo, tmp_path, monkeypatch, capsys):
    server = Server(OpenAIHandler)
    server.state["fail_once"].add("demo_train_0001.png#0")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    out = tmp_path / "gpt.csv"
    argv = (
        f"--percentages {demo['percentages']} --out {out} --base_url {server.url}/v1 "
        "--poll_seconds 0 --max_requests_per_file 3"
    )
    try:
        call_main(gpt_captioner, f"{argv} --dry_run")
        assert "dry run: 4 requests in 2 file(s)" in capsys.readouterr().out
        assert not server.state["files"]
        call_main(gpt_captioner, argv)
    finally:
        server.close()
    printed = capsys.readouterr().out
    assert "request demo_train_0001.png#0 failed: {'message': 'boom'}" in printed
    assert "1 requests to send (retry 1/2)" in printed
    table = captions.read_percentages(demo["percentages"])
    rows = read_rows(out)
    assert sorted(row["filename"] for row in rows) == sorted(table)
    for row in rows:
        assert row["caption"] == f"caption of {gpt_captioner.gpt_user_message(table[row['filename']])}"
    first = server.state["requests"][0]
    assert first["body"]["messages"][0]["content"] == gpt_captioner.GPT_SYSTEM_MESSAGE
    assert first["body"]["temperature"] == 1.0
    state = json.loads(gpt_captioner.state_path(out).read_text())
    assert [b["requests"] for b in state["batches"]] == [3, 1, 1] and all(
        b["collected"] for b in state["batches"]
    )


class OllamaHandler(Handler):
    def do_GET(self):
        self.reply({"models": [{"name": "moondream:latest"}, {"name": "gemma3:4b-it-qat"}]})

    def do_POST(self):
        request = json.loads(self.body())
        self.server.state["requests"].append(request)
        if not self.server.state["seen"]:
            self.server.state["seen"].add("first")
            return self.reply({"error": "model is loading"}, status=200)
        size = (
            Image.open(io.BytesIO(base64.b64decode(request["images"][0]))).size
            if "images" in request
            else None
        )
        self.reply({"response": f" {size} {request['prompt'][:20]} ", "done": True})


def test_ollama_captioner_against_a_local_server(demo, tmp_path, capsys):
    server = Server(OllamaHandler)
    try:
        out = tmp_path / "ollama.csv"
        call_main(ollama_captioner, f"--images {demo['images']} --out {out} --host {server.url}")
        percent_out = tmp_path / "percent.csv"
        argv = (
            f"--mode percentages --percentages {demo['percentages']} --out {percent_out} --host {server.url}"
        )
        call_main(ollama_captioner, argv)
    finally:
        server.close()
    assert "RuntimeError: model is loading; trying again (1/2)" in capsys.readouterr().out
    rows = read_rows(out)
    assert len(rows) == 4 and all(row["caption"].startswith("(64, 64) You are an expert") for row in rows)
    first = server.state["requests"][0]
    assert (first["model"], first["stream"], first["prompt"]) == (
        "moondream:latest",
        False,
        ollama_captioner.EXPERT_IMAGE_PROMPT,
    )
    text_rows = read_rows(percent_out)
    assert len(text_rows) == 4 and {row["model"] for row in text_rows} == {"gemma3:4b-it-qat"}
    assert text_rows[0]["caption"].startswith("None Based on the foll")


def test_ollama_without_a_server_is_one_line(demo, tmp_path, capsys):
    argv = f"--images {demo['images']} --out {tmp_path / 'o.csv'} --host http://127.0.0.1:9"
    assert_main_error(capsys, lambda: call_main(ollama_captioner, argv), "no Ollama server answers")


# ---- remote failures: one line saying what to check, exit 2, finished captions kept ----


class StatusHandler(Handler):
    """Answers every request with the server's `status` (an API error body), or closes without one."""

    def answer(self):
        status = self.server.state["status"]
        self.server.state["requests"].append(self.path)
        if status == "close":
            self.close_connection = True
            return
        self.reply({"error": {"message": f"status {status}", "type": "x", "code": str(status)}}, status)

    def do_GET(self):
        self.answer()

    def do_POST(self):
        self.body()
        self.answer()


def unused_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("status", "fragments"),
    [
        (401, ("OPENAI_API_KEY: was refused by", "401", "a valid key")),
        (429, ("is rate-limiting this key (429", "again later")),
        ("close", ("does not answer", "check the network and --base_url")),
        ("unreachable", ("does not answer", "ConnectError", "check the network and --base_url")),
    ],
)
def test_gpt_captioner_remote_failures_are_one_line(demo, tmp_path, monkeypatch, capsys, status, fragments):
    monkeypatch.setenv("OPENAI_API_KEY", "refused-key")
    server = Server(StatusHandler)
    server.state["status"] = status
    url = f"http://127.0.0.1:{unused_port()}/v1" if status == "unreachable" else f"{server.url}/v1"
    out = tmp_path / "gpt.csv"
    argv = f"--percentages {demo['percentages']} --out {out} --base_url {url} --poll_seconds 0"
    try:
        line = assert_main_error(capsys, lambda: call_main(gpt_captioner, argv), url, *fragments)
    finally:
        server.close()
    assert "refused-key" not in line and "finished captions and submitted batches are kept" in line
    assert not out.exists() and not gpt_captioner.state_path(out).exists()


@pytest.mark.parametrize(
    ("status", "fragments"),
    [
        (401, ("refused the request (401",)),
        (429, ("rate-limiting", "(429")),
        ("close", ("no Ollama server",)),
    ],
)
def test_ollama_captioner_remote_failures_are_one_line(demo, tmp_path, capsys, status, fragments):
    server = Server(StatusHandler)
    server.state["status"] = status
    out = tmp_path / "o.csv"
    argv = f"--images {demo['images']} --out {out} --host {server.url}"
    try:
        assert_main_error(capsys, lambda: call_main(ollama_captioner, argv), server.url, *fragments)
    finally:
        server.close()
    assert not out.exists() and not captions.settings_path(out).exists()


def test_ollama_refusal_mid_run_stops_and_keeps_the_finished_captions(demo, tmp_path, capsys):
    server = Server(OllamaHandler)
    server.state["seen"].add("first")  # no "model is loading" answer first
    out = tmp_path / "o.csv"
    argv = f"--images {demo['images']} --out {out} --host {server.url} --batch_size 2"
    original = OllamaHandler.do_POST

    def refuse_after_two(handler):
        if len(handler.server.state["requests"]) >= 2:
            handler.body()
            return handler.reply({"error": "unauthorized"}, status=401)
        return original(handler)

    try:
        OllamaHandler.do_POST = refuse_after_two
        assert_main_error(capsys, lambda: call_main(ollama_captioner, argv), "refused the request (401")
        assert len(read_rows(out)) == 2 and len(server.state["requests"]) == 2
        OllamaHandler.do_POST = original
        call_main(ollama_captioner, argv)  # the next run makes the two captions still missing
    finally:
        OllamaHandler.do_POST = original
        server.close()
    assert len(read_rows(out)) == 4


# ---- --shard K/N and --merge: one job split over processes ----

SHARDED = {
    # 4 images x 2 captions in batches of 3: image 2's captions fall into shards 1 and 2.
    "text": (text_captioner, "--model {qwen} --percentages {percentages} --batch_size 3 --num_captions 2"),
    "vision": (vision_captioner, "--model {gemma} --images {images} --batch_size 1"),
    "vision_language": (
        vision_language_captioner,
        "--model {qwen_vl} --images {images} --percentages {percentages} --batch_size 1",
    ),
}


@pytest.mark.parametrize("name", SHARDED)
def test_three_shards_and_merge_equal_one_run(demo, tmp_path, capsys, name):
    script, argv = SHARDED[name]
    argv = argv.format(**demo) + " --max_new_tokens 3"
    call_main(script, f"{argv} --out {tmp_path / 'one.csv'}")
    merged = tmp_path / "merged.csv"
    for index in (1, 3):
        call_main(script, f"{argv} --out {merged} --shard {index}/3")
    merge = lambda: call_main(script, f"{argv} --out {merged} --merge")  # noqa: E731
    assert_main_error(capsys, merge, "2_of_3.csv: is missing or unfinished", "all 3 shards finished")
    assert not merged.exists()
    call_main(script, f"{argv} --out {merged} --shard 2/3")
    call_main(script, f"{argv} --out {merged} --shard 2/3")  # a finished part resumes to nothing
    assert "0 captions to make" in capsys.readouterr().out
    merge()
    assert merged.read_text() == (tmp_path / "one.csv").read_text()
    records = (
        json.loads(captions.settings_path(tmp_path / csv).read_text()) for csv in ("one.csv", "merged.csv")
    )
    assert next(records) == next(records)
    call_main(script, f"{argv} --out {merged}")  # one process continues the merged CSV as its own
    assert "0 captions to make (4 images already done)" in capsys.readouterr().out


def test_merge_refuses_an_unfinished_part(tmp_path):
    """A part killed after its first caption: the merge names it and writes nothing (no model needed)."""
    out, names = tmp_path / "text.csv", ["a.png", "b.png"]
    args = argparse.Namespace(out=str(out), overwrite=False, batch_size=1, num_captions=2)
    for index in (1, 2):
        part = tmp_path / "text.csv.shards" / f"{index}_of_2.csv"
        log = captions.CaptionLog(part, {"model": "m", "shard": captions._dealt(args, (index, 2))}, 2)
        jobs = captions.caption_jobs(names, 2, 1, (index, 2))[: 1 if index == 1 else None]
        log.append([{"filename": name, "caption": "c", "model": "m", "prompt_id": "p"} for name, _ in jobs])
    with pytest.raises(
        InputError, match=r"1_of_2\.csv: holds 1 of its 2 captions; expected a finished shard"
    ):
        captions.merge_parts(args, names)
    assert not out.exists()
    args.batch_size = 2
    with pytest.raises(InputError, match=r"records the shard .*batch_size': 1"):
        captions.merge_parts(args, names)


@pytest.mark.parametrize("value", ["0/3", "4/3", "x", "1/0"])
def test_bad_shard_values_are_one_line(demo, tmp_path, capsys, value):
    argv = f"--model {demo['qwen']} --percentages {demo['percentages']} --out {tmp_path / 'x.csv'}"
    call = lambda: call_main(text_captioner, f"{argv} --shard {value}")  # noqa: E731
    assert_main_error(capsys, call, "--shard", f"got '{value}'", "K/N with 1 <= K <= N")
    call = lambda: call_main(text_captioner, f"{argv} --shard 1/2 --merge")  # noqa: E731
    assert_main_error(capsys, call, "--merge: was given with --shard")
    assert not list(tmp_path.iterdir())
