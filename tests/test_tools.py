"""Built-in tools, tool-call parsing and the demo's tool-use metric."""

import json

import pytest
from helpers import ScriptedLM, last_turn

from demo import metrics
from demo.curriculum import WEATHER, WEATHER_SCHEMA
from inference import calculator, parse_tool_calls, run_tool, tool_schema


CALCULATOR_SCHEMA = {"type": "function", "function": {  # written out: what a client sends
    "name": "calculator", "description": "Evaluate arithmetic: + - * / // % ** ( ).",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 37+25"}},
                   "required": ["expression"]}}}


@pytest.mark.parametrize("expression, value", [("37+25", "62"), ("71 - 54", "17"), ("(3.5*2)**2", "49"),
                                               ("7/2", "3.5"), ("-3*-3", "9"), ("2**10 % 7", "2"), ("9//2", "4")])
def test_calculator_computes_arithmetic(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('touch /tmp/pwned')", "not arithmetic"), ("open('x')", "not arithmetic"),
    ("9**9**9", "too large"), ("1/0", "ZeroDivisionError"), ("2 +", "SyntaxError"), ("'a'*3", "not arithmetic")])
def test_calculator_refuses_what_is_not_arithmetic_and_never_raises_through_run_tool(expression, message):
    out = run_tool("calculator", {"expression": expression})
    assert out.startswith("error:") and message in out


def test_run_tool_reports_unknown_tools_and_bad_arguments():
    assert "unknown tool 'calc'" in run_tool("calc", {"expression": "1"})
    assert "bad arguments" in run_tool("calculator", {"expr": "1"})
    assert "bad arguments" in run_tool("calculator", {"expression": "1", "extra": 2})

    def broken(x: int) -> str:
        raise RuntimeError("boom")

    assert run_tool("broken", {"x": 1}, {"broken": broken}) == "error: broken failed: RuntimeError: boom"


def test_schema_comes_from_signature_and_docstring():
    assert tool_schema(calculator) == CALCULATOR_SCHEMA

    def lookup(query: str, limit: int = 3) -> str:
        """Find facts.

        query: what to look for
        """
    fn = tool_schema(lookup)["function"]
    assert fn["description"] == "Find facts." and fn["parameters"]["required"] == ["query"]
    assert fn["parameters"]["properties"] == {"query": {"type": "string", "description": "what to look for"},
                                              "limit": {"type": "integer"}}


def test_parse_tool_calls_splits_content_calls_and_errors():
    text = ('Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n</tool_call>'
            '\n<tool_call>\n{"name": "calculator", "arguments": "{\\"expression\\": \\"3*4\\"}"}\n</tool_call>')
    content, calls, errors = parse_tool_calls(text)
    assert content == "Let me compute." and not errors
    assert [c["function"]["arguments"] for c in calls] == [{"expression": "1+2"}, {"expression": "3*4"}]
    for bad, why in [("<tool_call>{oops}</tool_call>", "not valid JSON"),
                     ('<tool_call>{"arguments": {}}</tool_call>', "is not {"),
                     ('<tool_call>\n{"name": "f", "arguments": {}}', "not closed")]:
        content, calls, errors = parse_tool_calls(bad)
        assert not calls and len(errors) == 1 and why in errors[0]


def test_the_template_renders_a_parsed_call_back_to_the_text_it_came_from(tokenizer):
    generated = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37+25"}}\n</tool_call>'
    content, calls, _ = parse_tool_calls(generated)
    chat = [{"role": "user", "content": "37+25?"}, {"role": "assistant", "content": content, "tool_calls": calls}]
    prompt = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
    assert tokenizer.apply_chat_template(chat, tokenize=False) == prompt + generated + "<|im_end|>\n"


def test_tool_use_scores_count_exactly_what_the_replies_did(tokenizer):
    tools = json.dumps([CALCULATOR_SCHEMA])
    items = [{"conversations": [{"role": "system", "content": "", "tools": tools},
                                {"role": "user", "content": f"{a}+{b}?"}], "gt": [str(a + b)],
              "expected_call": {"name": "calculator", "arguments": {"expression": f"{a}+{b}"}}}
             for a, b in [(37, 25), (40, 11), (12, 30), (50, 20)]]
    call = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{}"}}}}\n</tool_call>'
    script = {  # last user/tool message -> reply
        "37+25?": call.format("37+25"), "62": "37加25等于62。",           # right call, right answer
        "40+11?": call.format("40 + 11"), "51": "40加11等于52。",         # right call (spaces aside), wrong answer
        "12+30?": call.format("12+31"), "43": "12加30等于43。",           # wrong arguments: the answer follows them
        "50+20?": "50加20等于70。",                                        # no call, right anyway
    }
    lm = ScriptedLM(tokenizer, lambda prompt: script.get(last_turn(prompt), "不知道。"))
    scores = metrics.tool_use_scores(lm, tokenizer, items)
    assert scores["valid_call"] == 3 / 4 and scores["right_tool"] == 3 / 4 and scores["right_arguments"] == 2 / 4
    assert scores["answer_accuracy"] == 2 / 4  # 62 right; 52 wrong; 43 is 12+31's, not 12+30's; 70 right
    assert scores["answer_accuracy_without_tools"] == 1 / 4  # only 50+20 is answered without the tool
    assert '"name": "calculator"' in lm.prompts[0] and "<tools>" not in lm.prompts[-1]  # with, then without tools


def test_tool_use_scores_run_calls_in_the_items_scripted_environment_and_match_text_answers(tokenizer):
    tools = json.dumps([WEATHER_SCHEMA])
    items = [{"conversations": [{"role": "system", "content": "", "tools": tools},
                                {"role": "user", "content": f"{city}今天天气怎么样？"}], "gt": [weather],
              "expected_call": {"name": "get_weather", "arguments": {"city": city}},
              "tool_results": {"get_weather": weather}}
             for city, weather in [("北京", "晴"), ("巴黎", "下雨"), ("东京", "下雪")]]
    call = '<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{}"}}}}\n</tool_call>'
    script = {"北京今天天气怎么样？": call.format("北京"), "巴黎今天天气怎么样？": call.format("伦敦"),
              "东京今天天气怎么样？": call.format("东京")}
    seen_results = []

    def reply(prompt):
        last = last_turn(prompt)
        if "<tool_response>" in prompt:  # the answer repeats what the tool said, except for Tokyo's
            seen_results.append(last)
            return "东京今天晴。" if "东京今天天气" in prompt else f"今天{last}。"
        return script[last] if "<tools>" in prompt else "今天晴。"

    scores = metrics.tool_use_scores(ScriptedLM(tokenizer, reply), tokenizer, items)
    assert sorted(seen_results) == sorted(["晴", "下雨", "下雪"])  # each chat's own result, whatever the arguments
    assert scores["valid_call"] == 1 and scores["right_arguments"] == 2 / 3
    assert scores["answer_accuracy"] == 2 / 3 and scores["answer_accuracy_without_tools"] == 1 / 3  # "晴" by luck


def test_final_number_reads_the_answer_not_the_question():
    assert metrics.final_number("71减54等于17。还有呢") == "17"
    assert metrics.final_number("3.5 plus 1 is 4.5. ok") == "4.5"
    assert metrics.final_number("不知道") is None


def test_eval_tools_reports_the_scores_of_tool_use_scores_and_counts_bad_rows(tmp_path, tokenizer):
    """scripts/eval_tools.py on an agent_rl-format file with a malformed row: the reported figures are
    tool_use_scores' on the good rows, the bad row is counted with its line."""
    from helpers import load_script, make_model, write_jsonl

    eval_tools = load_script("scripts/eval_tools.py")
    model = make_model("tiny", seed=3, tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    tools = json.dumps([CALCULATOR_SCHEMA])
    good = [{"conversations": [{"role": "system", "content": "", "tools": tools},
                               {"role": "user", "content": f"{a}+{b}?"}], "gt": a + b} for a, b in [(1, 2), (3, 4)]]
    data = write_jsonl(tmp_path / "agent_rl.jsonl", [good[0], "{broken", {"conversations": [
        {"role": "user", "content": "hi"}], "gt": ["x"]}, good[1]])
    result = eval_tools.main(["--model_path", str(tmp_path / "m"), "--data", str(data), "--max_new_tokens", "8",
                              "--dtype", "float32", "--device", "cpu", "--json", str(tmp_path / "r.json"),
                              "--out_dir", str(tmp_path / "out")])
    assert result["bad_rows"] == 2 and result["n"] == 2
    items = [dict(g, gt=[g["gt"]]) for g in good]
    expected = metrics.tool_use_scores(model, tokenizer, items, max_new_tokens=8)
    assert {k: result[k] for k in expected} == expected
    assert json.loads((tmp_path / "r.json").read_text())["valid_call"] == expected["valid_call"]
    card = {e["name"]: e["value"] for e in json.loads((tmp_path / "out" / "report.json").read_text())}
    assert card["tools: valid_call"] == expected["valid_call"]  # the report card carries the same figure


def test_the_demo_weather_tool_has_the_schema_the_demo_model_learnt():
    from helpers import load_script

    demo_tools = load_script("demo/tools.py")
    assert tool_schema(demo_tools.get_weather) == WEATHER_SCHEMA
    assert demo_tools.get_weather("北京") in {zh for zh, _ in WEATHER}
    assert demo_tools.get_weather("Paris") in {en for _, en in WEATHER}
