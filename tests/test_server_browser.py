"""The web page at / in a real headless browser: Debian's chromium, driven by Playwright, against `sdtorch serve`.

Outside CI a missing browser or Playwright skips these tests and says what to install; with $CI set they fail.
The screenshot goes to $SDTORCH_TEST_ARTIFACTS (or the test's tmp_path) as server-page.png.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

PROMPT = "a large red circle in the center on a white background"
DATA_PNG = "data:image/png;base64,"


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(reason + " (required in CI)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        _missing("no chromium browser: install Debian's (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("no Playwright: pip install playwright (its own browser download is not needed)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str, headers: dict) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def start_server(chromium_path, tmp_path_factory):
    """start_server(*args) -> base URL of a `sdtorch serve --model shapes` subprocess; all are stopped at the end."""
    procs = []

    def start(*args: str, key: str | None = None) -> str:
        port = _free_port()
        log = tmp_path_factory.mktemp("serve") / "serve.log"
        cmd = [sys.executable, "-m", "sdtorch", "serve", "--model", "shapes", "--host", "127.0.0.1",
               "--port", str(port), *args]
        proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        deadline = time.monotonic() + 60
        while not _answers(base + "/sdapi/v1/samplers", headers):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                pytest.fail(f"`{' '.join(cmd)}` did not come up (exit {proc.poll()}):\n{tail}")
            time.sleep(0.2)
        return base

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(start_server) -> str:
    return start_server()


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # --no-sandbox: chromium refuses its sandbox when run as root (containers, CI)
        b = pw.chromium.launch(executable_path=chromium_path, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    p = context.new_page()
    p.errors = []
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    yield p
    context.close()


def _open(page, base: str):
    page.goto(base + "/")
    # the sampler list and the model's defaults arrive from the API
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 0", timeout=10_000)
    page.wait_for_function("document.getElementById('width').value === '64'", timeout=10_000)


def _png(data_url: str) -> Image.Image:
    assert data_url.startswith(DATA_PNG), data_url[:40]
    raw = base64.b64decode(data_url[len(DATA_PNG):])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


READ_PROGRESS = """() => {
  const bar = document.getElementById("progress"), preview = document.getElementById("preview");
  return [bar.value, bar.max, !preview.hidden && preview.src.startsWith("data:image/png;base64,")];
}"""


def _wait_for_result(page, timeout_s: float = 40.0) -> list[tuple[float, float, bool]]:
    """Wait for a result image, reading the progress bar every 50 ms; returns the (value, max, preview shown) seen."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while page.locator("#results img").count() == 0:
        assert time.monotonic() < deadline, f"no result after {timeout_s} s; error line: {page.text_content('#error')}"
        seen.append(tuple(page.evaluate(READ_PROGRESS)))
        page.wait_for_timeout(50)
    page.wait_for_selector("#generate:enabled", timeout=5_000)  # the page is idle again
    return seen


def test_page_generates_with_a_moving_progress_bar(server, page, tmp_path):
    t0 = time.monotonic()
    _open(page, server)
    with urllib.request.urlopen(server + "/sdtorch/v1/model", timeout=5) as r:
        model = json.load(r)
    fields = {f: page.input_value("#" + f) for f in ("width", "height", "steps", "cfg_scale", "sampler")}
    assert fields == {"width": "64", "height": "64", "steps": str(model["steps"]),
                      "cfg_scale": str(model["cfg_scale"]), "sampler": model["sampler_name"]}, (fields, model)
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "150")  # long enough (a few seconds) for the 300 ms progress polls to see it move
    page.fill("#seed", "1234")
    page.click("#generate")
    seen = _wait_for_result(page)
    partial = [v for v, m, _ in seen if 0 < v < m]
    assert partial, f"the progress bar never stood between 0 and its maximum: {sorted(set(seen))}"
    assert any(shown for _, _, shown in seen), "no preview (current_image) was shown while the job ran"
    assert page.eval_on_selector("#progress", "e => e.value === e.max")  # full once the images are in

    image = _png(page.get_attribute("#results img", "src"))
    assert image.format == "PNG" and image.size == (64, 64)
    text = page.text_content("#results .infotext")
    assert text.startswith(PROMPT) and "Steps: 150" in text and "Seed: 1234" in text, text
    link = page.locator("#results a.download").first
    assert link.get_attribute("download") == "sdtorch-1234.png"
    assert _png(link.get_attribute("href")).size == (64, 64)
    assert page.is_hidden("#error") and not page.errors, page.errors

    artefacts = Path(os.environ.get("SDTORCH_TEST_ARTIFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "server-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}; {len(partial)} progress readings mid-run, {min(partial):.2f} to {max(partial):.2f}; "
          f"{time.monotonic() - t0:.1f} s from page load to result")


def test_use_this_seed_fills_the_seed_field(server, page):
    _open(page, server)
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "3")
    page.fill("#seed", "-1")
    page.fill("#n_iter", "2")
    page.click("#generate")
    _wait_for_result(page)
    assert page.locator("#results img").count() == 2
    second = page.locator("#results .result").nth(1)
    seed = int(re.search(r"Seed: (\d+)", second.locator(".infotext").text_content()).group(1))
    assert second.locator("a.download").get_attribute("download") == f"sdtorch-{seed}.png"
    second.locator("button.use-seed").click()
    assert page.input_value("#seed") == str(seed)
    assert not page.errors, page.errors


def test_interrupt_stops_the_job(server, page):
    _open(page, server)
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "400")
    page.click("#generate")
    page.wait_for_function("document.getElementById('progress').value > 0", timeout=20_000)
    t0 = time.monotonic()
    with page.expect_request("**/sdapi/v1/interrupt"):
        page.click("#interrupt")
    page.wait_for_selector("#generate:enabled", timeout=15_000)
    assert time.monotonic() - t0 < 10, "the job ran on after Interrupt"
    assert page.is_hidden("#error") and not page.errors, (page.text_content("#error"), page.errors)


def test_inpainting_sends_the_painted_mask(server, page):
    _open(page, server)
    init = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(init, format="PNG")
    page.set_input_files("#file", files=[{"name": "init.png", "mimeType": "image/png", "buffer": init.getvalue()}])
    page.wait_for_selector("#mask", state="visible")
    box = page.locator("#mask").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 20, cy)
    page.mouse.down()
    page.mouse.move(cx + 20, cy, steps=5)
    page.mouse.up()
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "3")
    page.fill("#denoising_strength", "0.9")
    with page.expect_request("**/sdapi/v1/img2img") as request:
        page.click("#generate")
    sent = request.value.post_data_json
    assert sent["init_images"][0].startswith(DATA_PNG) and sent["denoising_strength"] == 0.9
    mask = _png(sent["mask"]).convert("L")
    levels = [v for v, n in enumerate(mask.histogram()) if n]
    assert mask.size == (64, 64) and levels == [0, 255], levels  # black keeps, white repaints
    assert mask.getpixel((32, 32)) == 255 and mask.getpixel((2, 2)) == 0
    _wait_for_result(page)
    assert _png(page.get_attribute("#results img", "src")).size == (64, 64)
    assert page.is_hidden("#error") and not page.errors, page.errors


def test_page_asks_for_the_api_key(start_server, page):
    base = start_server("--api-key", "s3cret", key="s3cret")
    page.goto(base + "/")
    page.wait_for_selector("#key-row", state="visible", timeout=10_000)
    assert page.is_visible("#error")  # the 401 shows as the error line too
    page.fill("#api-key", "s3cret")
    page.click("#save-key")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 0", timeout=10_000)
    assert page.evaluate("sessionStorage.getItem('sdtorch-api-key')") == "s3cret"
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "2")
    with page.expect_request("**/sdapi/v1/txt2img") as request:
        page.click("#generate")
    assert request.value.headers.get("authorization") == "Bearer s3cret"
    _wait_for_result(page)
    assert page.is_hidden("#error") and page.is_hidden("#key-row")
