"""The stack's UIs as a person sees them, in a real browser (docker/browser.py): what `make stack-test` checks
after its deployments have run, each check ending with a screenshot in the test's output folder, and a
screenshot of what the browser saw when a check fails.

- MLflow (logged in with Basic credentials): the experiment's runs list shows the training run's scratch and
  concise runs; their compare view shows both test accuracies; the registered model's page shows `@champion` on
  the version the registry reports; the scratch run's artifacts list the reliability diagram, which renders.
- Prefect (logged in through its own log-in page, with the auth string): the deployments page lists every
  deployment, and the flow runs page shows the training run as Completed.
- The inference service's page (with its bearer token): a genuine test image uploaded through it shows the top
  class that /predict answers for the same file.

What each check reads is the rendered page (text, alias tags, a loaded image), not only a status code. The
selectors are the UIs' own (MLflow 3.17, Prefect 3.8): a UI upgrade may need them updated.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from browser import chromium, screenshot

WAIT_S = 60  # a page of the stack rendering (each wait is bounded, and fails naming what it waited for)


class UICheckFailed(AssertionError):
    """A page did not show what it should; the message names the page, and a screenshot shows it."""


class Page:
    """One browser on one UI, with bounded waits that fail with a screenshot."""

    def __init__(self, driver, shots: Path) -> None:
        self.driver, self.shots = driver, shots

    def open(self, url: str) -> None:
        self.driver.get(url)

    def text(self) -> str:
        return self.driver.execute_script("return document.body ? document.body.innerText : ''")

    def wait(self, what: str, predicate: Callable[[], object], name: str) -> object:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                if result := predicate():
                    return result
            except Exception:  # noqa: BLE001 - a page still rendering: its elements come and go
                pass
            if time.monotonic() > deadline:
                shot = screenshot(self.driver, self.shots, f"{name}-failed")
                raise UICheckFailed(f"{what}: not shown within {WAIT_S} s at {self.driver.current_url} (see {shot})")
            time.sleep(0.5)

    def shot(self, name: str) -> Path:
        return screenshot(self.driver, self.shots, name)


# The compare view's metrics table is virtualized (react-virtualized): only the rows in view exist. Scroll its
# grids until the metric's row exists, then read that row's cells from every grid (names, then values).
_METRIC_ROW = """
const [name, done] = arguments;
(async () => {
  const link = () => document.querySelector(`a[title="Plot chart"][href*='metric=%22${name}%22']`);
  const names = document.querySelector('a[title="Plot chart"]')?.closest('.ReactVirtualized__Grid');
  if (!names) return null;
  const grids = [...names.parentElement.parentElement.querySelectorAll('.ReactVirtualized__Grid')];
  for (let top = 0; !link() && top <= names.scrollHeight; top += 90) {
    grids.forEach(g => { g.scrollTop = top; g.dispatchEvent(new Event('scroll')); });
    await new Promise(r => setTimeout(r, 200));
  }
  const hit = link();
  if (!hit) return null;
  hit.scrollIntoView({block: 'center'});
  const top = hit.parentElement.style.top;
  const row = g => [...g.querySelectorAll('[style]')].filter(c => c.style.top === top);
  return grids.map(g => row(g).map(c => c.innerText.trim()));
})().then(done);
"""

_CHAMPION_ROWS = """
return [...document.querySelectorAll('[role="status"][title="champion"]')]
  .map(tag => (tag.closest('[role="row"], tr') || tag.parentElement).innerText);
"""

_RENDERED_IMAGES = """
return [...document.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 100).length;
"""


def check_mlflow(
    base: str, login: str, experiment_id: str, runs: dict[str, dict], champion: str, model: str, shots: Path
) -> list[str]:
    """``runs``: impl -> {"id", "name", "test_accuracy"} of one training run's two MLflow runs."""
    said = []
    basic = {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}
    with chromium(headers=basic) as driver:
        page = Page(driver, shots)
        page.open(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        names = [run["name"] for run in runs.values()]
        page.wait(f"the runs list with {names}", lambda: all(n in page.text() for n in names), "mlflow-runs")
        page.shot("mlflow-runs")
        said.append(f"runs list shows {names}")

        ids = json.dumps([run["id"] for run in runs.values()])
        page.open(f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment_id])}")
        page.wait("the compare view's metrics", lambda: driver.find_element("css selector", 'a[title="Plot chart"]'),
                  "mlflow-compare")  # fmt: skip
        driver.set_script_timeout(WAIT_S)
        row = driver.execute_async_script(_METRIC_ROW, "test_accuracy")
        page.shot("mlflow-compare")
        shown = [float(v) for v in row[1]] if row and row[0] == ["test_accuracy"] else None
        wanted = [run["test_accuracy"] for run in runs.values()]
        if shown is None or len(shown) != 2 or any(abs(s - w) > 5e-4 for s, w in zip(shown, wanted, strict=True)):
            raise UICheckFailed(f"MLflow's compare view shows test_accuracy {row}, not {wanted} (see mlflow-compare)")
        said.append(f"compare view: test_accuracy {row[1]} side by side")

        page.open(f"{base}/#/models/{model}")
        rows = page.wait("the model's @champion alias", lambda: driver.execute_script(_CHAMPION_ROWS), "mlflow-model")
        page.shot("mlflow-model")
        if len(rows) != 1 or f"Version {champion}" not in rows[0]:  # type: ignore[arg-type]
            raise UICheckFailed(f"MLflow's model page shows @champion on {rows}, not on version {champion}")
        said.append(f"{model}: @champion on Version {champion}")

        scratch = runs["scratch"]
        page.open(f"{base}/#/experiments/{experiment_id}/runs/{scratch['id']}/artifacts")
        entry = page.wait(
            "reliability.png in the artifacts list",
            lambda: driver.find_element("xpath", "//*[normalize-space(text())='reliability.png']"),
            "mlflow-artifacts",
        )
        entry.click()  # type: ignore[attr-defined]
        page.wait("the reliability diagram's preview", lambda: driver.execute_script(_RENDERED_IMAGES),
                  "mlflow-artifacts")  # fmt: skip
        page.shot("mlflow-artifacts")
        said.append(f"{scratch['name']}'s artifacts list reliability.png, and it renders")
    return said


def check_prefect(base: str, auth_string: str, deployments: list[str], run_name: str, shots: Path) -> list[str]:
    """Log in as a person does (the UI's own log-in page), then read the deployments and flow runs pages."""
    said = []
    with chromium() as driver:
        page = Page(driver, shots)
        page.open(f"{base}/deployments")
        field = page.wait("Prefect's log-in page", lambda: driver.find_element("css selector", "input[type=password]"),
                          "prefect-login")  # fmt: skip
        field.send_keys(auth_string)  # type: ignore[attr-defined]
        driver.find_element("xpath", "//button[normalize-space()='Login']").click()
        page.wait(f"the deployments {deployments}", lambda: all(d in page.text() for d in deployments),
                  "prefect-deployments")  # fmt: skip
        page.shot("prefect-deployments")
        said.append(f"logged in; deployments page lists {deployments}")

        page.open(f"{base}/runs")

        def completed() -> bool:
            rows = driver.find_elements("xpath", f"//*[normalize-space(text())='{run_name}']/ancestor::*[.//*["
                                        "normalize-space(text())='Completed']][1]")  # fmt: skip
            return bool(rows)

        page.wait(f"the training run {run_name} as Completed on the flow runs page", completed, "prefect-runs")
        page.shot("prefect-runs")
        said.append(f"flow runs page shows {run_name} Completed")
    return said


def check_inference_page(base: str, token: str, image: Path, shots: Path) -> list[str]:
    """Upload ``image`` (a PNG) through the page; the top class shown must be /predict's for the same file."""
    bearer = {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(
        f"{base}/predict", data=image.read_bytes(), headers={**bearer, "content-type": "image/png"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        top = json.loads(response.read())["predictions"][0]
    with chromium(headers=bearer) as driver:
        page = Page(driver, shots)
        page.open(f"{base}/")
        page.wait("the page's file input", lambda: driver.find_element("id", "file"), "inference-page")
        driver.find_element("id", "file").send_keys(str(image))
        shown = page.wait(
            "the predicted classes",
            lambda: driver.find_elements("css selector", "#results .result"),
            "inference-page",
        )
        page.shot("inference-page")
        first = shown[0]  # type: ignore[index]
        if int(first.get_attribute("data-class-id")) != top["class_id"]:
            raise UICheckFailed(f"the page's top class is {first.text!r}, /predict's is {top['class_name']}")
    return [f"the page shows {top['class_name']} first for {image.name}, as /predict does"]
