"""The web chat page in headless Chromium against the real server: a message gets a streamed answer equal to the
API's, the conversation history goes along, clear forgets it, the think part is shown apart, the thinking switch
reaches the template, the page runs tool calls itself (calculator, time) and shows each call, errors are shown."""

import time

import httpx
import pytest
from helpers import ScriptedLM, load_script, make_model

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


def web_script(prompt):
    """A scripted model that knows the protocol (see test_server.ScriptedLM)."""
    if "<tool_response>" in prompt:
        return "37加25等于" + prompt.rsplit("<tool_response>\n", 1)[1].split("\n</tool_response>")[0] + "。"
    if "<tools>" in prompt:
        return '<tool_call>\n{"name": "calculator", "arguments": {"expression": "(37+25)*2//2"}}\n</tool_call>'
    if prompt.endswith("<think>\n"):
        return "先想一想。\n</think>\n\n62"
    return "<think>\n3加5等于8。\n</think>\n<answer>\n8\n</answer>"


@pytest.fixture(scope="module")
def scripted_url():
    from transformers import AutoTokenizer

    from model import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    lm = ScriptedLM(tokenizer, web_script)
    with server.serve_in_background(server.create_app(lm, tokenizer, "scripted", max_tokens_cap=64)) as url:
        yield url, lm.prompts


@pytest.fixture
def scripted_page(driver, scripted_url):
    driver.get(scripted_url[0])
    browser.set_field(driver, "max_tokens", 60)
    return driver


def test_think_part_is_shown_apart_and_collapsible(scripted_page):
    reply = browser.ask(scripted_page, "3加5等于几？")
    assert reply["thinking"].strip() == "3加5等于8。"
    assert reply["answer"].strip() == "8"
    details = scripted_page.find_element("css selector", ".assistant details.think")
    assert details.get_attribute("open") is None  # collapsed until clicked
    details.find_element("tag name", "summary").click()
    assert details.get_attribute("open") is not None


def test_the_thinking_switch_reaches_the_template(scripted_page, scripted_url):
    from selenium.webdriver.support.ui import Select

    Select(scripted_page.find_element("id", "thinking")).select_by_value("on")
    reply = browser.ask(scripted_page, "3加5等于几？")
    assert scripted_url[1][-1].endswith("<|im_start|>assistant\n<think>\n")
    assert (reply["thinking"], reply["answer"]) == ("先想一想。", "62")
    Select(scripted_page.find_element("id", "thinking")).select_by_value("off")
    browser.ask(scripted_page, "再说一遍")
    assert scripted_url[1][-1].endswith("<think>\n\n</think>\n\n")


def test_the_page_runs_tool_calls_itself_and_shows_each_call_and_result(scripted_page, scripted_url):
    scripted_page.find_element("id", "use_tools").click()
    reply = browser.ask(scripted_page, "37加25等于几？")
    # the page's own calculator computed (37+25)*2//2 and sent it back as a tool message
    assert reply["tools"] == [('工具 / tool: calculator({"expression": "(37+25)*2//2"})', "→ 62")]
    assert reply["answer"] == "37加25等于62。"
    last = scripted_url[1][-1]
    assert "<tool_response>\n62\n</tool_response>" in last and '"name": "current_time"' in last
    assert "get_weather" not in last  # the demo's tool is off until ticked
    details = scripted_page.find_element("css selector", ".assistant details.tool")
    assert details.get_attribute("open") is None
    # the page's calculator refuses what is not arithmetic and reports errors as results, never throwing
    results = scripted_page.execute_script(
        "return [calculator({expression: '2**10 % 7'}), calculator({expression: '7/2'}), "
        "runTool({function: {name: 'calculator', arguments: '{\"expression\": \"alert(1)\"}'}}), "
        "runTool({function: {name: 'calculator', arguments: '{\"expression\": \"1/0\"}'}}), "
        "runTool({function: {name: 'nope', arguments: '{}'}}), "
        "runTool({function: {name: 'calculator', arguments: '{oops'}})]")
    assert results[:2] == ["2", "3.5"]
    assert results[2].startswith("error: calculator failed: not arithmetic")
    assert "division by zero" in results[3] and "unknown tool" in results[4] and "not JSON" in results[5]


def test_a_rejected_request_is_shown_as_an_error(page):
    browser.set_field(page, "max_tokens", 100000)  # above the server's cap
    box_text = browser.ask(page, "你好")["answer"]
    assert box_text.startswith("error:") and "max_tokens" in box_text


def test_the_pages_tool_schemas_are_the_servers_and_the_demos(scripted_page):
    from demo.curriculum import WEATHER_SCHEMA
    from inference import calculator, current_time, tool_schema

    tools = scripted_page.execute_script("return TOOLS")
    assert tools == [tool_schema(calculator), tool_schema(current_time), WEATHER_SCHEMA]
