"""The web page in headless Chromium (Debian's chromium + chromium-driver, which `.ci/run`
installs): pick an image, get a caption, hover a word and see its heatmap on the image."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import require_module, require_tool, tiny_pipeline

require_module("fastapi")
webdriver = require_module("selenium.webdriver")
require_tool("chromium", "chromedriver")  # Debian's chromium and chromium-driver

import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from vtfuse.serving import create_app  # noqa: E402

FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1100,1000",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    config = uvicorn.Config(create_app(tiny_pipeline("caption")), port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(100):
        if instance.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def test_caption_and_heatmap_appear(server, browser, tmp_path):
    image = tmp_path / "scene.png"
    Image.new("RGB", (72, 72), (40, 40, 200)).save(image)
    browser.get(server)
    wait = WebDriverWait(browser, 20)
    wait.until(lambda b: "caption model" in b.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tokens span"))
    assert browser.find_element(By.ID, "answer").text.strip()  # the caption
    token = browser.find_elements(By.CSS_SELECTOR, "#tokens span")[-1]
    ActionChains(browser).move_to_element(token).perform()
    painted = browser.execute_script(
        "const c = document.getElementById('heat');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;"
    )
    assert painted > 0  # the hovered word's attention is drawn over the image
    shot = Path(tmp_path / "page.png")
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000
