"""``medssl report`` in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
selenium) loads the page with no console error and no network request, every image decodes, the tables render, and a
screenshot is saved as a test artefact (``$MEDSSL_TEST_ARTEFACTS`` or ``runs/test-artefacts/``).

CI installs Chromium in ``.ci/run``; there (``CI`` set) a missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from medssl.api import evaluate, pretrain
from medssl.cli import main

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # a pretraining run, an evaluation and a browser


def _browser_or_skip() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    missing = [n for n, p in (("chromium", chromium), ("chromedriver (chromium-driver)", driver)) if p is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        why = f"no {', '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test ({why}; .ci/run installs them)")
        pytest.skip(why)
    return chromium, driver  # type: ignore[return-value]


def _artefact_dir() -> Path:
    d = Path(os.environ.get("MEDSSL_TEST_ARTEFACTS", ROOT / "runs" / "test-artefacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A 4-step MoCo v2 run with collapse columns and a linear evaluation (tables, ROC / PR), and its report."""
    tmp = tmp_path_factory.mktemp("browser")
    run = pretrain("mocov2", "phantom2d:48", tmp / "run", image_size=32, batch_size=8, max_steps=4, progress=False,
                   overrides=["train.log_every_n_steps=1", "train.collapse_every_n_steps=2", "log.backends=[csv]"])
    evaluate("phantom2d:48", run / "eval", run=run, init="random", protocol="linear", label_fractions=(0.5, 1.0),
             seeds=(0,), image_size=32, batch_size=16, progress=False)
    assert main(["report", str(run)]) == 0
    return run / "report.html"


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1800",
                "--disable-extensions", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-default-apps", "--disable-sync"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _requests(drv) -> list[str]:
    urls = []
    for entry in drv.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def test_report_in_headless_chromium(report, browser):
    url = report.resolve().as_uri()
    browser.get_log("performance")  # drop what the browser did before the page
    browser.get(url)
    assert browser.execute_script("return document.readyState") == "complete"
    assert "medssl" in browser.title.lower()

    # no network: the only request is the page itself (inline data: images are not fetched from anywhere)
    requests = _requests(browser)
    assert url in requests
    assert [u for u in requests if u != url and not u.startswith("data:")] == []

    # every image decodes (decode() rejects for a broken one) and has pixels
    images = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const imgs = Array.from(document.images);
        Promise.all(imgs.map(i => i.decode().then(() => [true, i.naturalWidth, i.naturalHeight, i.src.slice(0, 22)],
                                                  () => [false, i.naturalWidth, i.naturalHeight, i.src.slice(0, 22)])))
            .then(done);
    """)
    assert len(images) >= 4, images  # loss, lr, collapse, ROC / PR at least
    assert all(ok and w > 0 and h > 0 and src.startswith("data:image/png") for ok, w, h, src in images), images

    # tables render: rows and cells with a laid-out size; the evaluation table has the probe's metrics
    tables = browser.execute_script("""
        return Array.from(document.querySelectorAll('table')).map(t => {
            const r = t.getBoundingClientRect();
            return {rows: t.rows.length, cols: t.rows[0] ? t.rows[0].cells.length : 0, w: r.width, h: r.height,
                    text: t.innerText};
        });
    """)
    assert tables, "no table on the page"
    assert all(t["rows"] >= 2 and t["cols"] >= 2 and t["w"] > 0 and t["h"] > 0 for t in tables), tables
    assert any("AUC" in t["text"] and "linear" in t["text"] for t in tables)
    assert any("random" in t["text"] for t in tables)

    # no console message at error level (nothing failed to load or run)
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert errors == []

    shot = _artefact_dir() / "report_chromium.png"
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 200, 12000))  # the whole page in one picture
    assert browser.save_screenshot(str(shot))
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size[0] >= 800 and img.size[1] >= 600
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 100  # text and plots, not a blank page
