"""Screenshot of the `vtfuse serve` page, in headless Chromium, with a word's heatmap shown.

    python docs/screenshot.py RUN IMAGE OUT.png [--word red] [--question "..."]

Serves RUN on a free localhost port, opens the page, picks IMAGE, asks the question for a VQA
model, hovers the first token equal to --word (else the last) and saves the page as OUT.png.
Needs Debian's chromium and chromium-driver and `pip install selenium`.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time

import uvicorn
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from vtfuse.pipeline import Pipeline
from vtfuse.serving import create_app
from vtfuse.training.checkpoint import resolve_model_folder

FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=900,900", "--user-data-dir=/tmp/vtfuse-screenshot-chromium",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("image")
    parser.add_argument("out")
    parser.add_argument("--word", default="")
    parser.add_argument("--question", default="")
    args = parser.parse_args()

    folder = resolve_model_folder(args.run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(Pipeline.load(folder), folder=folder)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in FLAGS:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: "model" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(args.image)
        if args.question:
            browser.find_element(By.ID, "question").send_keys(args.question)
            browser.find_element(By.ID, "go").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tokens span"))
        tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens span")
        chosen = next((t for t in tokens if t.text == args.word), tokens[-1])
        ActionChains(browser).move_to_element(chosen).perform()
        time.sleep(0.3)
        browser.save_screenshot(args.out)
        print(f"{args.out}: hovering {chosen.text!r}; {browser.find_element(By.ID, 'answer').text}")
    finally:
        browser.quit()
        server.should_exit = True


if __name__ == "__main__":
    main()
