"""Drive the web chat page in headless Chromium: ask questions, wait for the streamed answers, save a screenshot.

    python scripts/web_chat_screenshot.py --stage reason              # -> images/web_chat.png
    python scripts/web_chat_screenshot.py --model_path out/demo/reason --prompt "1+1=?" --prompt "你好"

Needs Chromium and its driver (Debian: apt install chromium chromium-driver) and `pip install selenium`.
The browser test (tests/test_web_chat.py) uses the same functions.
"""

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from common.cli import HelpFormatter
from scripts import serve_openai_api as server

# headless, and nothing that reaches beyond this machine
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-dev-shm-usage"]
# counts every change of an answer's text, to see that it arrived in pieces
COUNT_UPDATES = """
window.answerUpdates = 0;
new MutationObserver(ms => { for (const m of ms) if (m.target.classList && m.target.classList.contains('answer'))
  window.answerUpdates++; }).observe(document.getElementById('log'), {childList: true, subtree: true});
"""


def find_chromium():
    """(browser, driver) paths, or None when either is missing."""
    browser = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def open_browser(width=1000, height=900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise FileNotFoundError("Chromium or chromedriver not found; on Debian: apt install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS + [f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.binary_location = found[0]
    # an explicit driver path: selenium then never tries to download one
    return webdriver.Chrome(options=options, service=Service(executable_path=found[1]))


def set_field(driver, element_id, value):
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(str(value))


def ask(driver, text, timeout=120):
    """Type text into the page, send it, wait until its answer has finished streaming. Returns
    {"answer", "thinking", "tools", "updates"}: the shown answer, the think part (None when absent), the tool calls
    shown ([(call, result)]), and how many times the answer's text changed while it streamed."""
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(driver.find_elements("css selector", ".assistant"))
    driver.execute_script(COUNT_UPDATES)
    set_field(driver, "input", text)
    driver.find_element("id", "send").click()

    def finished(d):
        boxes = d.find_elements("css selector", ".assistant")
        return len(boxes) > before and boxes[-1].get_attribute("data-done") == "1" and boxes[-1]

    box = WebDriverWait(driver, timeout).until(finished)
    text = "return arguments[0].lastChild.textContent"
    think = box.find_elements("css selector", "details.think")
    tools = [(driver.execute_script("return arguments[0].firstChild.textContent", d),
              driver.execute_script(text, d)) for d in box.find_elements("css selector", "details.tool")]
    return {"answer": box.find_element("class name", "answer").text,
            "thinking": driver.execute_script(text, think[0]) if think else None, "tools": tools,
            "updates": driver.execute_script("return window.answerUpdates")}


def main(argv=None):
    import torch

    from inference.load import add_model_args, load

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", action="append", help="a message to send (repeatable)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--output", default=str(ROOT / "images" / "web_chat.png"))
    parser.add_argument("--tools", default=None, help="tick these page tools (e.g. get_weather) and switch tools on")
    parser.add_argument("--thinking", default="auto", choices=["auto", "on", "off"])
    args = parser.parse_args(argv)
    prompts = args.prompt or ["中国的首都是哪里？", "Tell me about yourself."]

    torch.manual_seed(0)
    model, tokenizer, path = load(args)
    with server.serve_in_background(server.create_app(model, tokenizer, Path(path).name)) as url:
        driver = open_browser()
        try:
            driver.get(url)
            set_field(driver, "temperature", args.temperature)
            set_field(driver, "max_tokens", args.max_tokens)
            driver.execute_script(f"document.getElementById('thinking').value = '{args.thinking}'")
            if args.tools:
                wanted = args.tools.split(",")
                driver.execute_script("document.getElementById('use_tools').checked = true; for (const t of TOOLS) "
                                      "document.getElementById('tool_' + t.function.name).checked = "
                                      "arguments[0].includes(t.function.name)", wanted)
            for prompt in prompts:
                reply = ask(driver, prompt)
                print(f"> {prompt}\n{reply}")
            # open the think parts and tool calls so the picture shows them
            driver.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.output)
        finally:
            driver.quit()
    print(f"screenshot of {path} -> {args.output}")


if __name__ == "__main__":
    main()
