"""The inference service's page (GET /) in a real browser: Debian's chromium through selenium and
chromium-driver, against `softmax-mlops serve` as a process, with a bearer token as the stack runs it.

The browser sends the token with every request (as a reverse proxy that logs people in would); without it the
page itself is refused, like every route but health. A real test image uploaded through the page must show the
classes and probabilities that /predict answers for the same file, and a sketch drawn with the mouse must show
what /predict answers for the 28x28 image the page sent.
"""

from __future__ import annotations

import importlib.util
import os

import httpx
import numpy as np
import pytest

from helpers import REPO
from stack import serving

pytestmark = [pytest.mark.server, pytest.mark.realdata]

TOKEN = "page-test-token"


def _browser_module():
    spec = importlib.util.spec_from_file_location("stack_browser", REPO / "docker" / "browser.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def browser_module():
    module = _browser_module()
    for path, package in ((module.CHROMIUM, "chromium"), (module.CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path):
            (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{path} is missing (apt-get install {package})")
    return module


def _shown(driver) -> list[tuple[int, str, str]]:
    from selenium.webdriver.common.by import By

    return [
        (
            int(row.get_attribute("data-class-id")),
            row.find_element(By.CLASS_NAME, "name").text,
            row.find_element(By.CLASS_NAME, "prob").text,
        )
        for row in driver.find_elements(By.CSS_SELECTOR, "#results .result")
    ]


def _expected(answer: dict) -> list[tuple[int, str, str]]:
    return [(p["class_id"], p["class_name"], f"{p['probability'] * 100:.1f}%") for p in answer["top_k"]]


def test_the_page_shows_what_predict_answers_for_an_upload_and_a_sketch(
    onnx_model, real_splits, tmp_path, browser_module
):
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    images, labels = real_splits["test"]
    png = tmp_path / f"test_00042_label{labels[42]}.png"
    Image.fromarray(images[42]).save(png)
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with serving(onnx_model[0], tmp_path / "serve.log", "--token-file", str(token_file)) as (url, _):
        with browser_module.chromium() as anonymous:  # no token: the page is refused like every other route
            anonymous.get(f"{url}/")
            assert "this service needs a bearer token" in anonymous.find_element(By.TAG_NAME, "body").text
        with browser_module.chromium(headers=bearer) as driver:
            driver.get(f"{url}/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: "loading" not in d.find_element(By.ID, "model").text)
            assert driver.find_element(By.ID, "model").text.startswith("model: ")

            driver.find_element(By.ID, "file").send_keys(str(png))
            wait.until(lambda d: len(_shown(d)) == 3)
            answer = httpx.post(
                f"{url}/predict", content=png.read_bytes(), headers={**bearer, "content-type": "image/png"}
            ).json()["predictions"][0]
            assert _shown(driver) == _expected(answer)
            widths = [
                float(bar.get_attribute("style").split("width:")[1].split("%")[0])
                for bar in driver.find_elements(By.CSS_SELECTOR, "#results .bar")
            ]
            assert widths == sorted(widths, reverse=True) and widths[0] > 0
            browser_module.screenshot(driver, tmp_path, "page-upload")

            canvas = driver.find_element(By.ID, "sketch")
            strokes = ActionChains(driver).move_to_element_with_offset(canvas, -60, -80).click_and_hold()
            for dx, dy in ((0, 160), (120, 0), (0, -160), (-60, 40)):
                strokes = strokes.move_by_offset(dx, dy)
            strokes.release().perform()
            drawn = np.array(driver.execute_script("return sketchInstance();"), dtype=np.int64)
            assert drawn.shape == (28, 28) and drawn.max() == 255 and (drawn > 0).sum() > 20  # the pen drew
            driver.find_element(By.ID, "predict-sketch").click()
            api = httpx.post(f"{url}/predict", json={"instances": [drawn.tolist()]}, headers=bearer).json()
            wait.until(lambda d: _shown(d) == _expected(api["predictions"][0]))
            browser_module.screenshot(driver, tmp_path, "page-sketch")

            driver.find_element(By.ID, "clear").click()
            assert _shown(driver) == []
            assert int(np.array(driver.execute_script("return sketchInstance();")).max()) == 0


def test_the_page_shows_the_services_refusal_in_one_line(onnx_model, tmp_path, browser_module):
    """A file that is not an image: the service's 400 and its message, on the page, and no stale bars."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text, not a PNG")
    with serving(onnx_model[0], tmp_path / "serve.log") as (url, _), browser_module.chromium() as driver:
        driver.get(f"{url}/")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "error").text)
        error = driver.find_element(By.ID, "error").text
        assert error.startswith("400: the uploaded file: ") and "\n" not in error
        assert _shown(driver) == []
