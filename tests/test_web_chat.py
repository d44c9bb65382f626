"""The web chat page in headless Chromium against the real server: a message gets a streamed answer equal to the
API's, the conversation history goes along, clear forgets it, the think part is shown apart, errors are shown."""

import time

import httpx
import pytest
from conftest import load_script, make_model

browser = load_script("scripts/web_chat_screenshot.py")
server = browser.server

if browser.find_chromium() is None:
    pytest.skip("Chromium/chromedriver not installed (apt install chromium chromium-driver)", allow_module_level=True)

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def base_url():
    from transformers import AutoTokenizer

    from model import TOKENIZER_DIR

    model = make_model("tiny", seed=3, tie_word_embeddings=False)  # untied: varied output (see test_server)
    # a few ms per forward so the answer arrives as several network reads, as it does with a real model
    model.register_forward_pre_hook(lambda *_: time.sleep(0.03))
    app = server.create_app(model, AutoTokenizer.from_pretrained(TOKENIZER_DIR), "microlm-test", max_tokens_cap=64)
    with server.serve_in_background(app) as url:
        yield url


@pytest.fixture(scope="module")
def driver():
    d = browser.open_browser()
    yield d
    d.quit()


@pytest.fixture
def page(driver, base_url):
    driver.get(base_url)
    browser.set_field(driver, "temperature", 0)
    browser.set_field(driver, "max_tokens", MAX_TOKENS)
    return driver


def api_answer(base_url, messages):
    r = httpx.post(base_url + "/v1/chat/completions", timeout=60,
                   json={"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS})
    return r.json()["choices"][0]["message"]["content"]


def test_a_message_gets_the_streamed_answer_and_history_goes_along(page, base_url):
    first = browser.ask(page, "中国的首都是哪里？")
    expected = api_answer(base_url, [{"role": "user", "content": "中国的首都是哪里？"}])
    assert first["answer"].strip() == expected and expected
    assert first["updates"] > 1  # shown piece by piece, not all at the end
    assert first["thinking"] is None

    second = browser.ask(page, "为什么？")
    history = [{"role": "user", "content": "中国的首都是哪里？"}, {"role": "assistant", "content": first["answer"]},
               {"role": "user", "content": "为什么？"}]
    assert second["answer"].strip() == api_answer(base_url, history)
    assert len(page.find_elements("css selector", ".msg.user")) == 2


def test_clear_forgets_the_conversation(page, base_url):
    alone = api_answer(base_url, [{"role": "user", "content": "为什么？"}])
    browser.ask(page, "中国的首都是哪里？")
    page.find_element("id", "clear").click()
    assert page.find_elements("css selector", ".msg") == []
    assert browser.ask(page, "为什么？")["answer"].strip() == alone  # asked as if first


def test_think_part_is_shown_apart_and_collapsible(page, monkeypatch):
    def reasoning_stream(self, req):
        # the split falls inside the tags, as token boundaries do
        for piece in ["<thi", "nk>\n3加5等于8。\n</th", "ink>\n<answer>\n8\n</ans", "wer>"]:
            yield piece, None
        yield "", "stop"

    monkeypatch.setattr(server.Generator, "stream", reasoning_stream)
    reply = browser.ask(page, "3加5等于几？")
    assert reply["thinking"].strip() == "3加5等于8。"
    assert reply["answer"].strip() == "8"
    details = page.find_element("css selector", ".assistant details")
    assert details.get_attribute("open") is None  # collapsed until clicked
    details.find_element("tag name", "summary").click()
    assert details.get_attribute("open") is not None


def test_a_rejected_request_is_shown_as_an_error(page):
    browser.set_field(page, "max_tokens", 100000)  # above the server's cap
    box_text = browser.ask(page, "你好")["answer"]
    assert box_text.startswith("error:") and "max_tokens" in box_text
