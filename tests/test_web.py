"""The web chat page in a real browser: headless Debian Chromium driven by playwright sends messages
to a running `daulat serve` and sees the reply stream in.

Chromium comes from the system (`apt-get install chromium`); the test installs it itself when it runs
as root on a machine with apt-get, and is skipped, saying why, only where it cannot.
"""

import json
import os
import shutil
import subprocess

import httpx
import pytest
from conftest import missing, require
from infer_fixtures import API_KEY, checkpoint, server  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.slow  # over ~10 s: left out of the fast loop (-m 'not slow')

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-dev-shm-usage"]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=300, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env,
                           timeout=900, capture_output=True)
        except (OSError, subprocess.TimeoutExpired):
            pass
        path = shutil.which("chromium")
    if path is None:
        missing("Chromium", "`apt-get install chromium` (tests/install-chromium.sh does it as root)")
    return path


@pytest.fixture(scope="module")
def browser():
    sync_api = require("playwright.sync_api")
    executable = chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def set_value(page, selector: str, value) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(value))


def test_chat_page_streams_a_reply_and_keeps_the_conversation(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    page.goto(server.url + "/", wait_until="domcontentloaded")
    page.evaluate("localStorage.clear()")

    # without the key the server refuses, and the page says why
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.error", timeout=30_000)
    assert "API key" in page.inner_text(".message.error")

    # with the key: greedy settings, so the reply can be checked against the API
    page.fill("#api_key", API_KEY)
    page.dispatch_event("#api_key", "change")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('micro')", timeout=30_000)
    set_value(page, "#temperature", 0)
    set_value(page, "#max_tokens", 24)
    page.evaluate("""() => {  // count how often the reply's text changes while it streams in
        window.updates = 0;
        new MutationObserver(() => { window.updates += 1; }).observe(
            document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#input", "What is 2 + 3?")
    page.click("#send")
    page.wait_for_selector(".message.assistant:not(.streaming) + .meta", timeout=60_000)
    reply = page.eval_on_selector(".message.assistant", "el => el.textContent")
    expected = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                          json={"messages": [{"role": "user", "content": "What is 2 + 3?"}], "temperature": 0,
                                "max_tokens": 24}).json()["choices"][0]["message"]["content"]
    assert reply == expected and reply
    assert page.evaluate("window.updates") > 3  # the text arrived in pieces, not at once

    # the second turn sends the whole conversation, kept in the page
    page.fill("#input", "And 4 + 4?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.message.assistant:not(.streaming) + .meta').length == 2",
                           timeout=60_000)
    last = bodies[-1]
    assert last["stream"] is True and last["temperature"] == 0 and last["max_tokens"] == 24
    assert [m["role"] for m in last["messages"]] == ["user", "assistant", "user"]
    assert last["messages"][1]["content"] == reply
    page.screenshot(path=str(tmp_path / "chat.png"))

    page.click("#clear")
    assert page.query_selector(".message") is None
    page.close()
