"""The chat page of `chattune serve` in a real browser: headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium) types a message, presses Enter and sees the reply stream in; the second turn carries the
history; "New chat" and the system prompt work. Skipped where Chromium or its driver is absent."""

from __future__ import annotations

import os
import shutil

import pytest

from chattune.inference.generate import generate_replies
from chattune.model.load import load_chat_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="the page test needs Chromium and its driver "
                                 "(Debian: apt-get install chromium chromium-driver)"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture()
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (pip install -e "
                                                                 "'.[test]')")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_AVOID_STATS"] = "true"  # Selenium Manager would otherwise try to report usage over the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture()
def server(browser, start_server, trained_dir, tmp_path):
    s = start_server(trained_dir, "--served-model-name", "tiny", "--device", "cpu", log=tmp_path / "server.log")
    yield s.ready()
    assert s.stop() == 0, s.log.read_text()[-3000:]


def _texts(driver, css: str) -> list[str]:
    # textContent, not .text: WebDriver's .text trims the spaces a reply may start or end with
    return driver.execute_script(f"return [...document.querySelectorAll({css!r})].map(e => e.textContent)")


def _send(driver, text: str, n_replies: int) -> None:
    """Type a message, press Enter, wait until the page is idle with n_replies non-empty replies."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "input").send_keys(text + Keys.ENTER)
    WebDriverWait(driver, 120).until(
        lambda d: d.execute_script("return document.body.dataset.state") == "idle"
        and len(_texts(d, ".msg.assistant")) == n_replies and all(_texts(d, ".msg.assistant")))


def test_typing_a_message_streams_the_reply_in(browser, server, trained_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chat_model = load_chat_model(str(trained_dir), "cpu")

    def reply(conv):
        return generate_replies(*chat_model, [conv], max_new_tokens=12)[0]["reply"]

    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "model-name").text == "tiny")
    for field, value in (("temperature", "0"), ("max-tokens", "12")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)

    first = "What is 12 + 34?"
    _send(browser, first, 1)
    conv = [{"role": "user", "content": first}]
    answer = reply(conv)
    assert _texts(browser, ".msg.user") == [first] and _texts(browser, ".msg.assistant") == [answer]
    assert browser.find_element(By.ID, "input").get_attribute("value") == ""

    second = "And 12 + 12?"  # the page sends the whole history: the reply is the multi-turn one
    _send(browser, second, 2)
    conv += [{"role": "assistant", "content": answer}, {"role": "user", "content": second}]
    assert _texts(browser, ".msg.assistant")[1] == reply(conv)

    browser.find_element(By.ID, "new-chat").click()
    assert _texts(browser, ".msg") == []
    browser.find_element(By.ID, "system").send_keys("Be brief.")
    _send(browser, first, 1)
    assert _texts(browser, ".msg.assistant") == [reply([{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": first}])]
