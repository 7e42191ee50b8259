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
  - a restart resumes after the last image in the file;
  - as Jupyter does, the page carries a per-session token that every POST must send back, and requests
    whose `Host` or `Origin` is not this server (127.0.0.1 / localhost at its port) are refused (403), so
    another web page open in the same browser cannot post answers (CSRF) or read the images through a
    rebound DNS name; a malformed request gets 400 and one line in the terminal.

    python annotation_tool.py --data_dir data/AID_multilabel          # then open the printed address
    python annotation_tool.py --demo                                  # generated AID-like images
"""

import hmac
import html
import json
import random
import secrets
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import cli
from common.spml import aid_multilabel


def get_args_parser():
    parser = cli.Parser(description="Single-positive annotation of AID-multilabel images in the browser.")
    cli.add_demo_argument(parser, "(24 generated AID-like images).")
    parser.add_argument(
        "--data_dir", default="data/AID_multilabel", help="AID-multilabel folder (images_tr/)."
    )
    parser.add_argument(
        "--out", default="", help=f"Answers CSV (empty: <data_dir>/{aid_multilabel.MANUAL_CSV})."
    )
    parser.renamed("--output", "--out")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to serve on (local only by default); requests must name it or 127.0.0.1/localhost.",
    )
    parser.add_argument("--port", type=int, default=8765, help="Port (0 = any free port).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the per-image order of the classes.")
    parser.add_argument("--results_dir", default="results", help="Where --demo writes its images and CSV.")
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

from common.errors import InputError, cli_entry, require, require_dir

CANDIDATES_PER_BATCH = 4
TOKEN_HEADER = "X-Annotation-Token"  # a custom header: a cross-origin page cannot send it without CORS
MAX_BODY_BYTES = 64 * 1024  # an answer is a few dozen bytes
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
PAGE = (
    """<!doctype html>
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
const TOKEN = "%(token)s";
let state = null, batch = 0;
async function call(path, body) {
  const post = {method: "POST", body: JSON.stringify(body),
                headers: {"Content-Type": "application/json", "%(token_header)s": TOKEN}};
  const response = await fetch(path, body ? post : {});
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
""".replace("%(per)d", str(CANDIDATES_PER_BATCH))
    .replace("%(token_header)s", TOKEN_HEADER)
    .replace("%%", "%")
)


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


class BadRequest(Exception):
    """A request refused with `status` (400 malformed, 403 not from this page); `reason` is logged."""

    def __init__(self, status: HTTPStatus, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def allowed_hosts(host: str, port: int) -> set[str]:
    """The `Host` values this server answers: loopback names (and the served address) at its port."""
    names = {*LOOPBACK_NAMES, f"[{host}]" if ":" in host else host}
    return {f"{name}:{port}" for name in names} | ({*names} if port == 80 else set())


class AnnotationHandler(BaseHTTPRequestHandler):
    """One request to the page; the session, images, page, token and allowed hosts are the server's."""

    timeout = 10  # a client that announces more body bytes than it sends is dropped, not waited for

    def log_message(self, *args):  # keep the terminal for the address and refusals
        pass

    def log_refusal(self, status: HTTPStatus, reason: str):
        request = (getattr(self, "requestline", "") or "-")[:200]
        line = f"refused {int(status)} {request!r} from {self.client_address[0]}: {reason}"
        print(line.encode("ascii", "backslashreplace").decode(), file=sys.stderr, flush=True)

    def send_error(self, code, message=None, explain=None):
        # Malformed request lines and headers (the standard library's own checks): one log line.
        self.log_refusal(HTTPStatus(code), message or HTTPStatus(code).phrase)
        if self.request_version == "HTTP/0.9":  # an unreadable request line: answer with a status line
            self.request_version = "HTTP/1.0"
        super().send_error(code, message, explain)

    def _send(self, body: bytes, content_type: str, status=HTTPStatus.OK):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, data, status=HTTPStatus.OK):
        self._send(json.dumps(data).encode(), "application/json", status)

    def _check_origin(self):
        # DNS rebinding: a foreign name resolved to 127.0.0.1 arrives with that name in Host.
        if self.headers.get("Host", "") not in self.server.hosts:
            raise BadRequest(HTTPStatus.FORBIDDEN, f"Host {self.headers.get('Host')!r} is not this server")
        origin = self.headers.get("Origin")
        if origin is not None and origin.removeprefix("http://") not in self.server.hosts:
            raise BadRequest(HTTPStatus.FORBIDDEN, f"Origin {origin!r} is not this page")

    def _refusing(self, handle):
        try:
            self._check_origin()
            handle()
        except BadRequest as refusal:
            self.log_refusal(refusal.status, refusal.reason)
            self._send(f"{refusal.reason}\n".encode(), "text/plain; charset=utf-8", refusal.status)
            self.close_connection = True

    def do_GET(self):
        self._refusing(self._get)

    def do_POST(self):
        self._refusing(self._post)

    def _get(self):
        path, _, query = self.path.partition("?")
        if path == "/":
            self._send(self.server.page, "text/html; charset=utf-8")
        elif path == "/state":
            self._json(self.server.session.state())
        elif path == "/image":
            from urllib.parse import parse_qs

            name = parse_qs(query).get("name", [""])[0]
            if name not in self.server.image_paths:
                self._send(html.escape(name).encode(), "text/plain", HTTPStatus.NOT_FOUND)
                return
            try:
                image = self.server.image_paths[name].read_bytes()
            except OSError as error:
                raise BadRequest(
                    HTTPStatus.NOT_FOUND, f"{self.server.image_paths[name]}: {error.strerror}"
                ) from None
            self._send(image, "image/jpeg")
        else:
            self._send(b"not found", "text/plain", HTTPStatus.NOT_FOUND)

    def _body(self) -> dict:
        sent = self.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(sent.encode("utf-8", "replace"), self.server.token.encode()):
            raise BadRequest(HTTPStatus.FORBIDDEN, f"missing or wrong {TOKEN_HEADER}")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"Content-Length {length!r}")
        data = self.rfile.read(int(length))
        if len(data) != int(length):
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"body of {len(data)} bytes, announced {length}")
        try:
            body = json.loads(data or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"body is not JSON ({error})") from None
        if not isinstance(body, dict):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "body is not a JSON object")
        return body

    def _post(self):
        if self.path not in ("/answer", "/undo"):
            self._send(b"not found", "text/plain", HTTPStatus.NOT_FOUND)
            return
        body = self._body()
        if self.path == "/answer":
            self.server.session.answer(str(body.get("image")), str(body.get("label")))
        else:
            self.server.session.undo()
        self._json(self.server.session.state())


class AnnotationServer(ThreadingHTTPServer):
    """The threaded server; a connection that fails (a client gone mid-answer) is one log line."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        print(f"connection from {client_address[0]} failed: {error!r}", file=sys.stderr, flush=True)


def make_server(data_dir, output, host="127.0.0.1", port=0, seed=0):
    """The HTTP server of one annotation session (not started); `server.server_address` has the port and
    `server.token` the session's token, which the page carries and every POST must send back."""
    require(0 <= port <= 65535, "--port", f"{port} is not a port number", "0 (any free port) to 65535")
    root = require_dir(data_dir, "the AID-multilabel folder with images_tr/<SceneClass>/*.jpg")
    image_paths = aid_multilabel.list_images(require_dir(root / "images_tr", "images_tr/<SceneClass>/*.jpg"))
    require(image_paths, root / "images_tr", "no JPEG images", "images_tr/<SceneClass>/*.jpg")
    for path in image_paths.values():  # a truncated file would show as a broken image: named instead
        aid_multilabel.check_jpeg(path)
    session = AnnotationSession(sorted(image_paths), output, seed)
    token = secrets.token_urlsafe(32)
    page = PAGE.replace("%(token)s", token).encode()
    try:
        server = AnnotationServer((host, port), AnnotationHandler)
    except (OSError, OverflowError) as error:
        raise InputError(f"{host}:{port}", f"cannot serve there ({error})", "a free local port") from None
    server.hosts = allowed_hosts(host, server.server_address[1])
    server.session, server.image_paths, server.page, server.token = session, image_paths, page, token
    return server


@cli_entry
def main(args):
    if args.demo:
        demo_dir = cli.demo_data_dir(args, "annotation_tool")
        args.data_dir = str(aid_multilabel.write_demo(demo_dir / "aid", 24, seed=7, image_size=96))
        args.out = args.out or str(demo_dir / aid_multilabel.MANUAL_CSV.replace(".csv", "_annotated.csv"))
    output = Path(args.out or Path(args.data_dir) / aid_multilabel.MANUAL_CSV)
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
