"""Single-positive annotation of AID-multilabel training images in the browser (the AdaGC manual labels).

Paper: C. Liu, G. Perantoni, L. Bruzzone, X. X. Zhu, "Adaptive Gradient Calibration for Single-Positive
Multi-Label Learning in Remote Sensing Image Scene Classification", arXiv 2510.08269: an annotator sees one
image and four randomly shuffled candidate classes, picks the one present, or asks for the next batch of
categories when none fits. This tool serves that page on 127.0.0.1 (stdlib http.server):
  - one image of images_tr/ at a time, in name order, with progress "n of N";
  - the 17 classes shuffled per image with a seeded RNG (seed + image name: the same order on every run),
    shown four at a time; "Next batch of categories" (key N) shows the next four, cycling;
  - keys 1-4 pick a candidate, U (or Backspace) undoes the last answer;
  - every answer rewrites the CSV atomically (temporary file + rename) in the layout of
    `single_positive_labels_manual.csv` that train_multilabel_model.py reads (image, 17 0/1 columns);
  - a restart resumes after the last image in the file.

    python annotation_tool.py --data_dir data/AID_multilabel          # then open the printed address
    python annotation_tool.py --demo                                  # generated AID-like images
"""

import html
import json
import random
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

from common import cli
from common.errors import cli_entry, require, require_dir
from common.spml import aid_multilabel

CANDIDATES_PER_BATCH = 4
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Single-positive annotation</title>
<style>
body { font-family: sans-serif; margin: 24px; }
#image { width: 384px; height: 384px; image-rendering: pixelated; border: 1px solid #888; }
button { font-size: 16px; margin: 6px 6px 0 0; padding: 8px 14px; }
.candidate { min-width: 150px; }
</style></head>
<body>
<h2>Which class is in the image?</h2>
<div id="progress"></div>
<img id="image" alt="image to annotate">
<div id="name"></div>
<div id="candidates"></div>
<button id="next_batch">Next batch of categories (N)</button>
<button id="undo">Undo last answer (U)</button>
<p>Keys: 1-4 pick a candidate, N next batch, U undo.</p>
<script>
let state = null, batch = 0;
async function call(path, body) {
  const response = await fetch(path, body ? {method: "POST", body: JSON.stringify(body)} : {});
  state = await response.json(); batch = 0; render();
}
function render() {
  const done = state.image === null;
  document.getElementById("progress").textContent = done
    ? `All ${state.total} images annotated` : `Image ${state.done + 1} of ${state.total}`;
  document.getElementById("name").textContent = done ? "" : state.image;
  const image = document.getElementById("image");
  image.style.display = done ? "none" : "";
  if (!done) image.src = "/image?name=" + encodeURIComponent(state.image);
  const box = document.getElementById("candidates");
  box.innerHTML = "";
  if (done) return;
  const count = state.classes.length, per = %(per)d;
  for (let k = 0; k < per; k++) {
    const name = state.classes[(batch * per + k) %% count];
    const button = document.createElement("button");
    button.className = "candidate"; button.id = "candidate_" + (k + 1);
    button.textContent = `${k + 1}: ${name}`;
    button.onclick = () => answer(name);
    box.appendChild(button);
  }
}
function answer(name) { call("/answer", {image: state.image, label: name}); }
function nextBatch() { batch = (batch + 1) %% Math.ceil(state.classes.length / %(per)d); render(); }
document.getElementById("next_batch").onclick = nextBatch;
document.getElementById("undo").onclick = () => call("/undo", {});
document.addEventListener("keydown", (event) => {
  if (!state) return;
  const key = event.key.toLowerCase();
  if (key >= "1" && key <= String(%(per)d)) document.getElementById("candidate_" + key)?.click();
  else if (key === "n") nextBatch();
  else if (key === "u" || key === "backspace") call("/undo", {});
});
call("/state");
</script></body></html>
""".replace("%(per)d", str(CANDIDATES_PER_BATCH)).replace("%%", "%")


def get_args_parser():
    parser = cli.Parser(description="Single-positive annotation of AID-multilabel images in the browser.")
    cli.add_demo_argument(parser, "(24 generated AID-like images).")
    parser.add_argument(
        "--data_dir", default="data/AID_multilabel", help="AID-multilabel folder (images_tr/)."
    )
    parser.add_argument(
        "--output", default="", help=f"Answers CSV (empty: <data_dir>/{aid_multilabel.MANUAL_CSV})."
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (local only by default).")
    parser.add_argument("--port", type=int, default=8765, help="Port (0 = any free port).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the per-image order of the classes.")
    parser.add_argument("--results_dir", default="results", help="Where --demo writes its images and CSV.")
    return parser


def candidate_order(image_name: str, seed: int, classes=aid_multilabel.CLASSES) -> list[str]:
    """The seeded shuffle of the classes for one image (independent of the order images are shown in)."""
    order = list(classes)
    random.Random(f"{seed}:{image_name}").shuffle(order)
    return order


class AnnotationSession:
    """The images, the answers so far (the CSV's rows) and the atomic rewrite of the CSV per answer."""

    def __init__(self, images: list[str], output: Path, seed: int):
        self.images, self.output, self.seed = images, Path(output), seed
        self.lock, self.answers = threading.Lock(), []
        if self.output.exists():
            names, matrix = aid_multilabel.read_label_csv(self.output, one_positive=True)
            unknown = [name for name in names if name not in images]
            require(
                not unknown, self.output, f"image {unknown[:1]} is not in images_tr/", "rows of images_tr/"
            )
            rows = zip(names, matrix, strict=True)
            self.answers = [(name, aid_multilabel.CLASSES[int(np.argmax(row))]) for name, row in rows]

    def current(self):
        answered = {name for name, _ in self.answers}
        return next((name for name in self.images if name not in answered), None)

    def state(self) -> dict:
        image = self.current()
        classes = candidate_order(image, self.seed) if image else []
        return {"image": image, "done": len(self.answers), "total": len(self.images), "classes": classes}

    def _write(self):
        if not self.answers:
            self.output.unlink(missing_ok=True)
            return
        matrix = np.zeros((len(self.answers), len(aid_multilabel.CLASSES)), np.uint8)
        for row, (_, label) in enumerate(self.answers):
            matrix[row, aid_multilabel.CLASSES.index(label)] = 1
        aid_multilabel.write_label_csv(self.output, [name for name, _ in self.answers], matrix)

    def answer(self, image: str, label: str) -> bool:
        with self.lock:
            if image != self.current() or label not in aid_multilabel.CLASSES:
                return False  # a stale or repeated click: the page reloads the state instead
            self.answers.append((image, label))
            self._write()
            return True

    def undo(self) -> None:
        with self.lock:
            if self.answers:
                self.answers.pop()
                self._write()


def make_handler(session: AnnotationSession, image_paths: dict):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the terminal for the address and errors
            pass

        def _send(self, body: bytes, content_type: str, status=HTTPStatus.OK):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, data, status=HTTPStatus.OK):
            self._send(json.dumps(data).encode(), "application/json", status)

        def do_GET(self):
            path, _, query = self.path.partition("?")
            if path == "/":
                self._send(PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/state":
                self._json(session.state())
            elif path == "/image":
                from urllib.parse import parse_qs

                name = parse_qs(query).get("name", [""])[0]
                if name not in image_paths:
                    self._send(html.escape(name).encode(), "text/plain", HTTPStatus.NOT_FOUND)
                    return
                self._send(image_paths[name].read_bytes(), "image/jpeg")
            else:
                self._send(b"not found", "text/plain", HTTPStatus.NOT_FOUND)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/answer":
                session.answer(str(body.get("image")), str(body.get("label")))
            elif self.path == "/undo":
                session.undo()
            else:
                self._send(b"not found", "text/plain", HTTPStatus.NOT_FOUND)
                return
            self._json(session.state())

    return Handler


def make_server(data_dir, output, host="127.0.0.1", port=0, seed=0):
    """The HTTP server of one annotation session (not started); `server.server_address` has the port."""
    root = require_dir(data_dir, "the AID-multilabel folder with images_tr/<SceneClass>/*.jpg")
    image_paths = aid_multilabel.list_images(require_dir(root / "images_tr", "images_tr/<SceneClass>/*.jpg"))
    require(image_paths, root / "images_tr", "no JPEG images", "images_tr/<SceneClass>/*.jpg")
    session = AnnotationSession(sorted(image_paths), output, seed)
    server = ThreadingHTTPServer((host, port), make_handler(session, image_paths))
    server.session = session
    return server


@cli_entry
def main(args):
    if args.demo:
        demo_dir = cli.demo_data_dir(args, "annotation_tool")
        args.data_dir = str(aid_multilabel.write_demo(demo_dir / "aid", 24, seed=7, image_size=96))
        args.output = args.output or str(
            demo_dir / aid_multilabel.MANUAL_CSV.replace(".csv", "_annotated.csv")
        )
    output = Path(args.output or Path(args.data_dir) / aid_multilabel.MANUAL_CSV)
    server = make_server(args.data_dir, output, args.host, args.port, args.seed)
    state = server.session.state()
    host, port = server.server_address[:2]
    print(f"{state['done']} of {state['total']} images annotated; answers go to {output}")
    print(f"open http://{host}:{port}/ (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"stopped; {server.session.state()['done']} answers are in {output}")
    finally:
        server.server_close()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
