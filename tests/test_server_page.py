"""The chat page at `/` in a real headless browser (Debian's chromium driven by Playwright), against a real server
process with the scripted model: load, send, watch the reply stream in, multi-turn history, stop, new chat, the
API key field, and model output that tries to inject HTML (it must show as text and never run)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from test_server import KEY, UNSCRIPTED, XSS, scripted_server  # noqa: E402

CHROMIUM = os.environ.get("QWEN3_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):  # .ci/run installs it: in CI a missing browser is a failure, not a skip
        pytest.fail("no chromium binary: .ci/run should have installed Debian's chromium", pytrace=False)
    pytest.skip("no chromium binary (apt-get install chromium)", allow_module_level=True)

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = scripted_server(tmp_path_factory.mktemp("page"))
    yield s
    assert s.stop() == 0


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent.startsWith('scripted')")
    yield page
    context.close()
    assert errors == []


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_answer(page):
    """Wait for the last assistant message to finish; its element."""
    page.wait_for_selector(".msg.assistant:last-child .stats:not(:empty)")
    return page.locator(".msg.assistant").last


def test_send_streams_reasoning_and_answer_and_keeps_history(page):
    # count the renders of the answer while it streams: more than one means it arrived in pieces
    page.evaluate("""() => { window.__renders = 0; new MutationObserver(() => window.__renders++)
        .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true}); }""")
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    send(page, "think please")
    answer = last_answer(page)
    assert answer.locator(".content").inner_text() == "The answer is 42."
    reasoning = answer.locator("details.reasoning")
    assert reasoning.is_visible() and reasoning.get_attribute("open") is None  # collapsed once done
    reasoning.locator("summary").click()
    assert reasoning.locator(".text").inner_text() == "I ponder.\nStill pondering."
    assert page.evaluate("window.__renders") > 5
    assert "tokens" in answer.locator(".stats").inner_text()
    # the second turn sends the first one as history (the answer without its reasoning)
    page.fill("#max-tokens", "3")
    send(page, "and then?")
    last_answer(page)
    assert sent[-1]["messages"] == [
        {"role": "user", "content": "think please"},
        {"role": "assistant", "content": "The answer is 42."},
        {"role": "user", "content": "and then?"},
    ]
    assert sent[-1]["max_tokens"] == 3 and sent[-1]["stream"] is True
    assert sent[0]["chat_template_kwargs"] == {"enable_thinking": True}
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0


def test_model_output_with_html_never_runs(page):
    send(page, "xss")
    answer = last_answer(page)
    content = answer.locator(".content")
    assert '<img src=x onerror="window.__xss=1">' in content.inner_text()
    assert "<script>window.__xss=2</script>" in content.inner_text()
    assert content.locator("img").count() == 0 and content.locator("script").count() == 0
    assert content.locator("strong").inner_text() == "bold"  # the markdown subset still renders
    # a user message with HTML is text too
    page.fill("#max-tokens", "2")
    send(page, '<img src=y onerror="window.__xss=3"><b>hi</b>')
    last_answer(page)
    user = page.locator(".msg.user").last
    assert user.inner_text().endswith('<img src=y onerror="window.__xss=3"><b>hi</b>')
    assert page.locator("#messages img").count() == 0
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None


def test_stop_ends_the_stream_and_frees_the_request(page, server):
    page.fill("#max-tokens", "900")
    send(page, UNSCRIPTED[0]["content"])
    page.wait_for_function(
        "() => { const c = document.querySelectorAll('.msg.assistant .content'); "
        "return c.length && c[c.length - 1].textContent.length > 20; }"
    )
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.click("#stop")
    answer = last_answer(page)
    assert "stopped" in answer.locator(".stats").inner_text()
    assert page.is_enabled("#send")
    assert server.wait_idle()["qwen3:kv_cache_usage_perc"] == 0


def test_api_key_field_appears_when_the_server_needs_one(browser, tmp_path):
    s = scripted_server(tmp_path, "--api-key", KEY)
    try:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(s.url + "/")
        page.wait_for_selector("#key-box:not(.hidden)")
        assert "API key" in page.inner_text("#model-name")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('model-name').textContent.startsWith('scripted')")
        send(page, XSS[0]["messages"][0]["content"])
        assert "Look:" in last_answer(page).locator(".content").inner_text()
        page.close()
    finally:
        assert s.stop() == 0
