"""annotation_tool.py in real headless Chromium (selenium): clicks, keys, next batch, undo, CSV, resume."""

import shutil
import threading

import pytest

import annotation_tool as at
from common.spml import aid_multilabel

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def test_candidate_order_is_seeded_and_a_permutation():
    first = at.candidate_order("airport_1", seed=0)
    assert first == at.candidate_order("airport_1", seed=0) != at.candidate_order("airport_1", seed=1)
    assert sorted(first) == sorted(aid_multilabel.CLASSES)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_AVOID_STATS", "true")  # no network: the driver and browser paths are given
    webdriver = pytest.importorskip("selenium.webdriver")
    driver_path, chromium = shutil.which("chromedriver"), shutil.which("chromium")
    if not (driver_path and chromium):
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def serve(data_dir, output, seed=0):
    server = at.make_server(data_dir, output, "127.0.0.1", 0, seed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def test_annotate_by_click_and_key_with_next_batch_undo_and_resume(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data = aid_multilabel.write_demo(tmp_path / "aid", num_images=8, seed=1, image_size=32)
    output = tmp_path / "answers.csv"
    server, url = serve(data, output)
    images = sorted(aid_multilabel.list_images(data / "images_tr"))
    wait = WebDriverWait(browser, 10)

    def progress_is(text):
        wait.until(lambda d: d.find_element(By.ID, "progress").text == text)

    def candidates():
        return [b.text.split(": ", 1)[1] for b in browser.find_elements(By.CLASS_NAME, "candidate")]

    try:
        browser.get(url)
        progress_is(f"Image 1 of {len(images)}")
        order = at.candidate_order(images[0], 0)
        assert candidates() == order[:4]
        browser.find_element(By.ID, "candidate_2").click()  # a click: the 2nd candidate
        progress_is(f"Image 2 of {len(images)}")
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("n")  # next batch of categories, then key 1
        assert candidates() == at.candidate_order(images[1], 0)[4:8]
        body.send_keys("1")
        progress_is(f"Image 3 of {len(images)}")
        body.send_keys("3")
        progress_is(f"Image 4 of {len(images)}")
        body.send_keys("u")  # undo the last answer
        progress_is(f"Image 3 of {len(images)}")
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        server.shutdown()
        server.server_close()
    names, matrix = aid_multilabel.read_label_csv(output, one_positive=True)
    assert names == images[:2]
    chosen = [aid_multilabel.CLASSES[i] for i in matrix.argmax(1)]
    assert chosen == [order[1], at.candidate_order(images[1], 0)[4]]
    assert (tmp_path / "page.png").stat().st_size > 1000

    # A restart resumes after the last answer in the file.
    resumed = at.make_server(data, output)
    assert resumed.session.state()["done"] == 2 and resumed.session.current() == images[2]
    resumed.server_close()


# ---- raw HTTP: the page's token, Host and Origin checks, malformed requests ----


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """annotation_tool.py as a user runs it (a subprocess, its own stderr) on 8 generated images."""
    import re
    import subprocess
    import sys

    from conftest import REPO

    folder = tmp_path_factory.mktemp("served")
    data = aid_multilabel.write_demo(folder / "aid", num_images=8, seed=1, image_size=32)
    output = folder / "answers.csv"
    argv = ["--data_dir", data, "--out", output, "--port", "0"]
    process = subprocess.Popen(
        [sys.executable, str(REPO / "annotation_tool.py"), *map(str, argv)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [process.stdout.readline(), process.stdout.readline()]
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", lines[1]).group(1))
        page = http_request(port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")[1]
        token = re.search(rb'const TOKEN = "([^"]+)"', page).group(1).decode()
        yield {"port": port, "token": token, "output": output, "process": process, "data": data}
    finally:
        process.terminate()
        process.wait(timeout=30)


def http_request(port, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send raw bytes (request line and headers as given) and return (status, body) of the answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(head.encode("latin-1") + body)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), payload


def post(served, body: bytes, path="/answer", host=None, **headers) -> int:
    """A POST like the page's (its token, JSON), with `headers` overriding or (None) removing fields."""
    fields = {
        "Host": host or f"127.0.0.1:{served['port']}",
        "Content-Type": "application/json",
        "X-Annotation-Token": served["token"],
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    fields.update({key.replace("_", "-"): value for key, value in headers.items()})
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return http_request(served["port"], head + "\r\n", body)[0]


def answer_body(served) -> bytes:
    import json

    current = sorted(aid_multilabel.list_images(served["data"] / "images_tr"))
    done = len(aid_multilabel.read_label_csv(served["output"])[0]) if served["output"].exists() else 0
    return json.dumps({"image": current[done], "label": "sea"}).encode()


REFUSALS = {
    "missing token": ({"X_Annotation_Token": None}, 403),
    "wrong token": ({"X_Annotation_Token": "guessed"}, 403),
    # What any web page can send without a CORS preflight: a text/plain form post from its own origin.
    "cross-origin text/plain": (
        {"X_Annotation_Token": None, "Origin": "http://evil.example", "Content_Type": "text/plain"},
        403,
    ),
    "foreign Origin with the token": ({"Origin": "http://evil.example"}, 403),
    "Origin null": ({"Origin": "null"}, 403),
    "foreign Host (DNS rebinding)": ({"host": "evil.example:{port}"}, 403),
    "localhost at another port": ({"host": "localhost:1"}, 403),
    "no Content-Length": ({"Content_Length": None}, 400),
    "Content-Length not a number": ({"Content_Length": "abc"}, 400),
    "negative Content-Length": ({"Content_Length": "-5"}, 400),
    "huge Content-Length": ({"Content_Length": str(10**12)}, 400),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_posts_answer_403_or_400_and_leave_the_csv_unchanged(served, case):
    assert post(served, answer_body(served)) == 200  # the page's own request is accepted
    before = served["output"].read_bytes()
    headers, status = REFUSALS[case]
    headers = {k: v.format(port=served["port"]) if isinstance(v, str) else v for k, v in headers.items()}
    assert post(served, answer_body(served), **headers) == status
    assert post(served, b"{}", path="/undo", **headers) == status
    assert served["output"].read_bytes() == before
    assert post(served, b"{}", path="/undo") == 200  # the next case starts from the same answers


@pytest.mark.parametrize(
    "body", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]", b'"label"', b"null"], ids=str
)
def test_malformed_bodies_answer_400_and_leave_the_csv_unchanged(served, body):
    assert post(served, answer_body(served)) == 200
    before = served["output"].read_bytes()
    assert post(served, body) == 400
    assert post(served, body, path="/undo") == 400
    assert served["output"].read_bytes() == before
    assert post(served, b"{}", path="/undo") == 200


def test_foreign_host_cannot_read_the_page_or_images_and_bad_request_lines_get_400(served):
    port = served["port"]
    for path in (
        "/",
        "/state",
        "/image?name=" + sorted(aid_multilabel.list_images(served["data"] / "images_tr"))[0],
    ):
        assert http_request(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")[0] == 200
        assert http_request(port, f"GET {path} HTTP/1.1\r\nHost: rebound.example:{port}\r\n\r\n")[0] == 403
        assert http_request(port, f"GET {path} HTTP/1.0\r\n\r\n")[0] == 403  # no Host at all
    assert http_request(port, "BROKEN\r\n\r\n")[0] == 400
    assert http_request(port, "GET / HTTP/1.1 extra\r\n\r\n")[0] == 400
    assert http_request(port, "GET / HTTP/9.9\r\n\r\n")[0] == 505


def test_refusals_are_one_log_line_each_and_no_traceback(served):
    # Runs last in this file: everything above was refused with one line, nothing else was printed.
    post(served, b"{not json")
    process = served["process"]
    process.terminate()
    _, stderr = process.communicate(timeout=30)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("refused ") for line in lines), stderr[-3000:]
    assert "Traceback" not in stderr
    assert any("not JSON" in line for line in lines) and any(
        "Origin 'http://evil.example'" in line for line in lines
    )
