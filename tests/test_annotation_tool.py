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
