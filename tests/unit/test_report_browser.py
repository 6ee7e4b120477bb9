"""The HTML report renders offline in headless Chromium: not blank, every plot present and decoded."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from actlab.jobs.profile import ProfileOptions, profile
from actlab.report.plots import FIGURES

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1300,2400")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian chromium + chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-opt"])
def test_report_renders_with_every_plot(browser, tmp_path, model):
    run = profile(model, None, tmp_path / "run", tokens=512, seq_len=128,
                  options=ProfileOptions(query_stride=4, lens_stride=16), progress=False, log=lambda *a: None)
    browser.get((run.path / "report.html").as_uri())
    for key in FIGURES:
        loaded = browser.execute_script(
            "const img = document.querySelector(arguments[0]);"
            "return img !== null && img.complete && img.naturalWidth > 100 && img.naturalHeight > 100;",
            f"#plot-{key} img")
        assert loaded, f"plot {key} missing or not decoded"
    assert browser.execute_script("return document.querySelectorAll('ul.findings li').length") >= 3
    assert browser.execute_script("return document.querySelector('#massive-table') !== null")
    png = tmp_path / "screenshot.png"
    assert browser.save_screenshot(str(png))
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert pixels.std() > 10, "screenshot is blank"
    assert (pixels < 128).mean() > 0.01, "almost no dark pixels: nothing was drawn"
