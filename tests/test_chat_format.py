"""Today's MiniMind chat rows (tool calls, tool results, reasoning_content, prompt-only and gt rows) through every
conversation dataset, with our template and with templates that behave like MiniMind2's, minimind-3's and Qwen3's
official ones and like a plain ChatML one (written here: tests never read ../shared). No field of a row disappears:
each is rendered (by the template or by the fallback) or counted as lost."""

import json
import logging

import pytest
import torch
from helpers import make_model, write_jsonl
from transformers import AutoTokenizer

from dataset import DPODataset, PretrainDataset, PromptDataset, ReasonDataset, SFTDataset, pack_collate, pad_collate
from dataset.chat import (ChatEncoder, check_conversations, check_prompt_row, normalize_chat, row_chooses,
                          template_support, with_empty_think)
from inference import Engine
from dataset.jsonl import BadLineError, JsonlFile
from model import TOKENIZER_DIR

TOOLS_BLOCK = ("{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}"
               "{{- messages[0].content + '\\n\\n' }}{%- endif %}{{- '# Tools\\n<tools>' }}{%- for t in tools %}"
               "{{- '\\n' + (t | tojson) }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}")
CALLS = ("{%- for c in (m.tool_calls or []) %}{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
         "{%- set c = c.function if c.function is defined else c %}"
         "{{- '<tool_call>\\n{\"name\": \"' + c.name + '\", \"arguments\": ' }}"
         "{%- if c.arguments is string %}{{- c.arguments }}{%- else %}{{- c.arguments | tojson }}{%- endif %}"
         "{{- '}\\n</tool_call>' }}{%- endfor %}")
TOOL_ROLE = ("{%- elif m.role == 'tool' %}{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
             "{{- '<|im_start|>user' }}{%- endif %}{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
             "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}")
# like minimind-3's: every assistant turn gets a think block (reasoning_content, or split out of the content at
# </think>), the generation prompt opens <think> with open_thinking or writes the empty block
MM3_LIKE = (TOOLS_BLOCK + "{%- elif messages[0].role == 'system' %}"
            "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
            "{%- for m in messages %}{%- set content = m.content if m.content is string else '' %}"
            "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
            "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}"
            "{%- elif m.role == 'assistant' %}{%- set r = '' %}"
            "{%- if m.reasoning_content is string %}{%- set r = m.reasoning_content %}"
            "{%- elif '</think>' in content %}{%- set r = content.split('</think>')[0].rstrip('\\n')"
            ".split('<think>')[-1].lstrip('\\n') %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
            "{%- endif %}{{- '<|im_start|>assistant\\n<think>\\n' + r.strip('\\n') + '\\n</think>\\n\\n'"
            " + content.lstrip('\\n') }}" + CALLS + "{{- '<|im_end|>\\n' }}" + TOOL_ROLE + "{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
            "{%- if open_thinking is defined and open_thinking %}{{- '<think>\\n' }}"
            "{%- else %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
# like MiniMind2's: a default system prompt, replies verbatim (reasoning_content is not rendered)
MM2_LIKE = (TOOLS_BLOCK + "{%- elif messages[0].role == 'system' %}"
            "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
            "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{%- endif %}"
            "{%- for m in messages %}{%- set content = m.content if m.content is string else '' %}"
            "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
            "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}"
            "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + content }}" + CALLS +
            "{{- '<|im_end|>\\n' }}" + TOOL_ROLE + "{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# rewrites earlier turns (as Qwen3's official template does): reasoning only on the last assistant turn
REWRITING = ("{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
             "{%- if loop.last and m.reasoning_content %}{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}"
             "{%- endif %}{{- m.content + '<|im_end|>\\n' }}{%- else %}"
             "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
             "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# like Qwen3's: tools, calls and results as ours, reasoning only on the assistant turns after the last user turn
QWEN3_LIKE = (TOOLS_BLOCK + "{%- elif messages[0].role == 'system' %}"
              "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
              "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
              "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
              "{%- for m in messages %}{%- set content = m.content if m.content is string else '' %}"
              "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
              "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}"
              "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
              "{%- if loop.index0 > ns.last and m.reasoning_content is string %}"
              "{{- '<think>\\n' + m.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}{%- endif %}"
              "{{- content }}" + CALLS + "{{- '<|im_end|>\\n' }}" + TOOL_ROLE + "{%- endif %}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# plain ChatML: knows no tools, tool calls, tool turns or reasoning (a tool turn is not written at all)
PLAIN = ("{%- for m in messages %}{%- if m.role in ['system', 'user', 'assistant'] %}"
         "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# drops every assistant turn but the last: no way to map the earlier ones
UNMAPPABLE = ("{%- for m in messages %}{%- if m.role != 'assistant' or loop.last %}"
              "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

CALC = {"type": "function", "function": {"name": "calculator", "description": "evaluate arithmetic",
                                         "parameters": {"type": "object", "properties": {"expr": {"type": "string"}},
                                                        "required": ["expr"]}}}
CALL_JSON = '{"name": "calculator", "arguments": {"expr": "3*4"}}'
TOOL_ROW = {"conversations": [
    {"role": "system", "content": "你是一个助手。", "tools": json.dumps([CALC], ensure_ascii=False),
     "tool_calls": None, "reasoning_content": None},
    {"role": "user", "content": "3 乘 4 是多少？", "tools": None, "tool_calls": None, "reasoning_content": None},
    {"role": "assistant", "content": "", "tool_calls": json.dumps([{"type": "function", "function": {
        "name": "calculator", "arguments": '{"expr": "3*4"}'}}])},
    {"role": "tool", "content": "12"},
    {"role": "assistant", "content": "答案是 12。", "reasoning_content": "工具返回 12。"},
]}
CALL_TEXT = f"<tool_call>\n{CALL_JSON}\n</tool_call><|im_end|>"
# what each template makes the assistant write, turn by turn (the header and the template's own think block aside)
EXPECTED = {
    "ours": [CALL_TEXT, "<think>\n工具返回 12。\n</think>\n\n答案是 12。<|im_end|>"],
    "mm3": [CALL_TEXT, "工具返回 12。\n</think>\n\n答案是 12。<|im_end|>"],
    "mm2": [CALL_TEXT, "<think>\n工具返回 12。\n</think>\n\n答案是 12。<|im_end|>"],  # reasoning written inline
}


def with_template(template):
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module", params=["ours", "mm3", "mm2"])
def kind_tok(request):
    return request.param, with_template({"ours": None, "mm3": MM3_LIKE, "mm2": MM2_LIKE}[request.param])


def labelled_runs(tokenizer, item) -> list[str]:
    """The labelled tokens, decoded run by run (a run = consecutive labelled positions)."""
    runs, current = [], []
    for tok, label in zip(item["input_ids"].tolist(), item["labels"].tolist()):
        if label != -100:
            assert label == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(r) for r in runs]


def test_tool_call_row_labels_exactly_what_the_assistant_writes(tmp_path, kind_tok):
    kind, tok = kind_tok
    data = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [TOOL_ROW]), tok, 1024, empty_think_ratio=0)
    item = data[0]
    assert labelled_runs(tok, item) == EXPECTED[kind]
    text = tok.decode(item["input_ids"])
    assert '"name": "calculator"' in text and "<tool_response>\n12\n</tool_response>" in text  # all rendered
    assert "工具返回" in text and "lost" not in item


def test_tool_calls_as_json_string_list_or_bare_items_render_the_same(kind_tok):
    _, tok = kind_tok
    enc = ChatEncoder(tok)
    variants = [json.dumps([{"name": "calculator", "arguments": {"expr": "3*4"}}]),
                [{"name": "calculator", "arguments": '{"expr": "3*4"}'}],
                {"type": "function", "function": {"name": "calculator", "arguments": {"expr": "3*4"}}}]
    texts = set()
    for calls in variants:
        row = json.loads(json.dumps(TOOL_ROW["conversations"]))
        row[2]["tool_calls"] = calls
        texts.add(enc.render(*normalize_chat(row)))
    assert len(texts) == 1 and CALL_JSON in texts.pop()


def test_every_conversation_dataset_takes_tool_and_reasoning_rows(tmp_path, kind_tok):
    kind, tok = kind_tok
    sft = write_jsonl(tmp_path / "s.jsonl", [TOOL_ROW])
    reason = ReasonDataset(sft, tok, 1024, tag_weight=5.0, empty_think_ratio=0)[0]
    assert labelled_runs(tok, reason) == EXPECTED[kind]
    assert set(reason["weights"][reason["labels"] != -100].tolist()) <= {1.0, 5.0}
    rejected = json.loads(json.dumps(TOOL_ROW["conversations"]))
    rejected[-1] = {"role": "assistant", "content": "答案是 7。"}
    pair = DPODataset(write_jsonl(tmp_path / "d.jsonl", [{"chosen": TOOL_ROW["conversations"],
                                                           "rejected": rejected}]), tok, 1024, empty_think_ratio=0)[0]
    assert labelled_runs(tok, pair["chosen"]) == EXPECTED[kind][-1:]  # the final reply only
    assert labelled_runs(tok, pair["rejected"]) == ["答案是 7。<|im_end|>"]


def test_reasoning_rows_in_content_form_map_with_a_template_that_rewrites_them(tmp_path):
    """r1_mix-style replies `<think>..</think><answer>..</answer>` in content: minimind-3's template splits them
    into a think block (the old code died: 'does not render assistant turn verbatim')."""
    tok = with_template(MM3_LIKE)
    row = {"conversations": [{"role": "user", "content": "2+3?"},
                             {"role": "assistant", "content": "<think>\n2 加 3\n</think>\n<answer>\n5\n</answer>"}]}
    item = ReasonDataset(write_jsonl(tmp_path / "r.jsonl", [row]), tok, 256, tag_weight=10.0)[0]
    assert labelled_runs(tok, item) == ["2 加 3\n</think>\n\n<answer>\n5\n</answer><|im_end|>"]
    heavy = tok.decode(item["input_ids"][item["weights"] == 10.0])
    assert heavy == "</think><answer></answer>"  # the tags inside the labels; <think> is the template's


def test_template_that_rewrites_earlier_turns_is_mapped_by_role_markers():
    tok = with_template(REWRITING)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r1"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning_content": "r2"}]
    item = ChatEncoder(tok).encode(messages, None, 256)
    assert labelled_runs(tok, item) == ["b<|im_end|>", "<think>\nr2\n</think>\n\nd<|im_end|>"]
    assert item["lost"].tolist() == [1, 0, 0]  # r1 is not in the text: counted


def test_a_row_the_template_cannot_map_is_reported_with_file_line_and_trains_nothing(tmp_path, caplog):
    tok = with_template(UNMAPPABLE)
    rows = [{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        item = SFTDataset(path, tok, 64)[0]
    assert (item["labels"] == -100).all()
    assert f"{path}:1" in caplog.text and "cannot be mapped" in caplog.text


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_adaptive_thinking_gives_rows_without_reasoning_an_empty_labelled_think_block(tmp_path, ratio):
    tok = with_template(None)
    rows = [{"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
            TOOL_ROW]
    data = SFTDataset(write_jsonl(tmp_path / "a.jsonl", rows), tok, 1024, empty_think_ratio=ratio)
    empty = "<think>\n\n</think>\n\n"
    assert labelled_runs(tok, data[0]) == [(empty if ratio else "") + "你好！<|im_end|>"]
    # a turn that has reasoning keeps it; a tool-call turn without reasoning gets the empty block too
    assert labelled_runs(tok, data[1]) == [(empty if ratio else "") + EXPECTED["ours"][0], EXPECTED["ours"][1]]


def test_adaptive_thinking_choice_is_a_fixed_share_independent_of_the_global_rng():
    torch.manual_seed(0)
    first = [row_chooses(7, i, 0.2) for i in range(4000)]
    torch.manual_seed(1)
    assert first == [row_chooses(7, i, 0.2) for i in range(4000)]
    assert abs(sum(first) / 4000 - 0.2) < 0.02
    assert first != [row_chooses(8, i, 0.2) for i in range(4000)]


def test_prompt_rows_of_all_three_kinds(tmp_path, tokenizer):
    rlaif = {"conversations": [{"role": "user", "content": "写一首诗"}, {"role": "assistant", "content": ""}]}
    agent = {"conversations": [{"role": "system", "content": "", "tools": json.dumps([CALC])},
                               {"role": "user", "content": "3 乘 4？"}], "gt": ["12", 12.0]}
    seed = {"conversations": [{"role": "user", "content": "2+3?"},
                              {"role": "assistant", "content": "<think>x</think><answer>5</answer>"}]}
    data = PromptDataset(write_jsonl(tmp_path / "p.jsonl", [rlaif, agent, seed]), tokenizer, 512)
    assert len(data) == 3 and not data.rows.bad_lines
    a, b, c = data[0], data[1], data[2]
    assert a["reference"] is None and a["gt"] is None
    assert tokenizer.decode(a["prompt_ids"]).endswith("写一首诗<|im_end|>\n<|im_start|>assistant\n")
    assert b["gt"] == ["12", "12.0"] and b["tools"][0]["function"]["name"] == "calculator"
    assert '"name": "calculator"' in tokenizer.decode(b["prompt_ids"])
    assert c["reference"] == "<think>x</think><answer>5</answer>"
    with pytest.raises(BadLineError):  # a prompt-only row has nothing to learn from in SFT
        check_conversations(rlaif)


@pytest.mark.parametrize("row, reason", [
    ({"conversations": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": "{not json"}]}, "not valid JSON"),
    ({"conversations": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}]}, "no function name"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "b"}]}, "followed by tool"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     "neither content nor tool calls"),
    ({"conversations": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"name": "f", "arguments": "[1, 2]"}]}]}, "not a JSON object"),
    ({"conversations": [{"role": "system", "content": "s", "tools": "[]"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}, "non-empty list of function schemas"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                           "reasoning_content": 3}]}, "reasoning_content"),
])
def test_malformed_tool_and_reasoning_rows_are_reported_with_their_line(tmp_path, row, reason):
    good = TOOL_ROW
    rows = JsonlFile(write_jsonl(tmp_path / "b.jsonl", [good, row]), check_conversations)
    assert len(rows) == 1 and len(rows.bad_lines) == 1
    assert rows.bad_lines[0].startswith(f"{tmp_path / 'b.jsonl'}:2:") and reason in rows.bad_lines[0]


def test_gt_must_be_answers():
    base = {"conversations": [{"role": "user", "content": "q"}]}
    check_prompt_row({**base, "gt": ["1"]})
    for bad in ([], [{"a": 1}], [True]):
        with pytest.raises(BadLineError, match="gt"):
            check_prompt_row({**base, "gt": bad})


@pytest.mark.parametrize("text", ["<|im_start|>你好，世界。<|im_end|>", "<s>你好，世界。</s>", "你好，世界。"])
def test_pretraining_texts_with_their_own_separators_are_not_wrapped_twice(tmp_path, tokenizer, text):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": text}, {"text": "第二篇。"}])
    data = PretrainDataset(path, tokenizer, max_seq_len=64, packed=False)
    expected = [tokenizer.bos_token_id, *tokenizer("你好，世界。", add_special_tokens=False)["input_ids"],
                tokenizer.eos_token_id]
    row = data[0]
    assert row["input_ids"][row["labels"] != -100].tolist() == expected
    packed = PretrainDataset(path, tokenizer, max_seq_len=4096)
    assert packed.tokens.tolist()[:len(expected)] == expected
    assert packed.tokens.tolist().count(tokenizer.bos_token_id) == 2  # one per document, never doubled


def test_a_pretrain_hq_line_with_several_documents_keeps_each_separator_once(tokenizer):
    from dataset.pretrain import document_ids

    ids = document_ids(tokenizer, ["<|im_start|>甲<|im_end|> <|im_start|>乙<|im_end|>"])[0]
    assert ids.count(tokenizer.bos_token_id) == 2 and ids.count(tokenizer.eos_token_id) == 2
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_checkpoint_keeps_its_tokenizer_and_a_mismatching_one_is_refused(tmp_path):
    from common.resolve import resolve_tokenizer

    ckpt = tmp_path / "out" / "sft"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"")
    assert resolve_tokenizer(None, "sft", tmp_path / "out", TOKENIZER_DIR) == TOKENIZER_DIR  # none saved: ours
    old = with_template(None)
    old.add_tokens(["<old_only>"])  # a tokenizer of another vocabulary, saved with the checkpoint
    old.save_pretrained(ckpt)
    assert resolve_tokenizer(None, "sft", tmp_path / "out", TOKENIZER_DIR) == ckpt
    assert resolve_tokenizer(str(ckpt), "sft", tmp_path / "out", TOKENIZER_DIR) == ckpt
    with pytest.raises(SystemExit, match="does not match the tokenizer the checkpoint"):
        resolve_tokenizer(str(TOKENIZER_DIR), "sft", tmp_path / "out", TOKENIZER_DIR)
    assert resolve_tokenizer(str(TOKENIZER_DIR), "none", tmp_path / "out", TOKENIZER_DIR) == TOKENIZER_DIR


def test_stages_run_on_files_in_todays_formats(tmp_path):
    """SFT on tool/reasoning rows, GRPO on rlaif prompt-only rows and agent_rl gt rows: every row usable (the old
    code skipped each tool row and stopped GRPO with 'no usable lines'); the correctness reward scores gt rows."""
    from helpers import load_script, tiny_args

    sft_rows = [TOOL_ROW] * 6 + [{"conversations": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello",
                                                     "reasoning_content": "greet"}]}] * 2
    rlaif = {"conversations": [{"role": "user", "content": "写一句话"}, {"role": "assistant", "content": ""}]}
    agent = {"conversations": TOOL_ROW["conversations"][:2], "gt": ["12"]}
    sft_path = write_jsonl(tmp_path / "sft_t2t_mini.jsonl", sft_rows)
    rl_path = write_jsonl(tmp_path / "rl.jsonl", [rlaif, agent] * 2)
    summary = load_script("2-sft.py").main(tiny_args(tmp_path, sft_path, "--from", "none", "--max_steps", 2,
                                                     "--batch_size", 4, "--max_seq_len", 512))
    assert summary["steps"] == 2 and not JsonlFile(sft_path, check_conversations).bad_lines
    summary = load_script("6-reason.py").main(tiny_args(
        tmp_path, rl_path, "--method", "grpo", "--from", tmp_path / "out/sft", "--max_steps", 2, "--batch_size", 2,
        "--num_generations", 2, "--max_new_tokens", 8, "--reward", "format,correctness"))
    assert summary["steps"] == 2
    assert all(torch.isfinite(torch.tensor(m["reward"])) for _, m in summary["metric_history"])


def test_correctness_reward_takes_gt_lists_and_never_raises_on_other_references():
    from trainer.rewards import correctness_reward

    reply = "<think>3*4</think><answer>12</answer>"
    assert correctness_reward(reply, ["11", "12"]) == 1.0 and correctness_reward(reply, ["13"]) == 0.0
    assert correctness_reward(reply, None) == 0.0  # rlaif: no reference
    assert correctness_reward(reply, "a poem about spring") == 0.0  # states no integer: 0, not ValueError
    assert correctness_reward(reply, "<answer>12</answer>") == 1.0


@pytest.mark.parametrize("kwargs, tail", [({}, ""), ({"enable_thinking": True}, "<think>\n"),
                                          ({"enable_thinking": False}, "<think>\n\n</think>\n\n"),
                                          ({"open_thinking": True}, "<think>\n"),
                                          ({"open_thinking": False}, "<think>\n\n</think>\n\n"),
                                          ({"enable_thinking": False, "open_thinking": True}, "<think>\n\n</think>\n\n")])
def test_generation_prompt_thinking_switch(tokenizer, kwargs, tail):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False, **kwargs)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" + tail


def test_a_reply_generated_after_either_prompt_renders_back_exactly(tokenizer):
    """Training and inference see the same text: thinking on/off prompt + what the model wrote == the history turn."""
    user = [{"role": "user", "content": "hi"}]
    for kwargs, written, turn in [({"enable_thinking": True}, "r\n</think>\n\nok", {"reasoning_content": "r"}),
                                  ({"enable_thinking": False}, "ok", {"reasoning_content": ""}),
                                  ({}, "ok", {})]:
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False, **kwargs)
        history = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "ok", **turn}],
                                                tokenize=False)
        assert history == prompt + written + "<|im_end|>\n"


def test_tools_are_listed_in_the_system_turn_hermes_style(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], tools=[CALC], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert "<tools>\n" + json.dumps(CALC, ensure_ascii=False) + "\n</tools>" in text
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>' in text


# ------------------------------------------------------------------------------------------------ template fields

# every field of today's chat format in one row: tools, a call with its reasoning, a tool result, a reasoned reply,
# and a later turn with the empty think block
FIELDS_ROW = [
    {"role": "system", "content": "你是一个助手。", "tools": [CALC]},
    {"role": "user", "content": "3 乘 4 是多少？"},
    {"role": "assistant", "content": "", "reasoning_content": "先用计算器。",
     "tool_calls": [{"name": "calculator", "arguments": {"expr": "3*4"}}]},
    {"role": "tool", "content": "12"},
    {"role": "assistant", "content": "答案是 12。", "reasoning_content": "工具返回 12。"},
    {"role": "user", "content": "谢谢"},
    {"role": "assistant", "content": "不客气。", "reasoning_content": ""},
]
KINDS = {"ours": None, "mm2": MM2_LIKE, "mm3": MM3_LIKE, "qwen3": QWEN3_LIKE, "plain": PLAIN}
# what each template still leaves out, per LOSABLE field: Qwen3's drops the reasoning of the turns before the last
# user turn (by design; nothing to fall back to), every other field of every kind is in the text
LOST = {"qwen3": [2, 0, 0]}


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_is_rendered_or_counted_and_named(tmp_path, kind, caplog):
    tok = with_template(KINDS[kind])
    path = write_jsonl(tmp_path / "f.jsonl", [{"conversations": FIELDS_ROW}])
    with caplog.at_level(logging.WARNING):
        item = SFTDataset(path, tok, 1024, empty_think_ratio=0)[0]
    text, labelled = tok.decode(item["input_ids"]), "".join(labelled_runs(tok, item))
    assert '"name": "calculator", "description"' in text.split("<|im_start|>user")[0]  # tools: in the system turn
    assert CALL_JSON in labelled  # the call: written by the assistant, learnt
    assert "<tool_response>\n12\n</tool_response>" in text and "<tool_response>" not in labelled  # read, not learnt
    if kind in LOST:
        assert item["lost"].tolist() == LOST[kind] and "先用计算器。" not in text
        assert f"{path}:1" in caplog.text and "reasoning_content x2" in caplog.text
    else:
        assert "lost" not in item and not caplog.text
        assert "先用计算器。\n</think>" in labelled and "工具返回 12。\n</think>" in labelled
        assert text.count("<think>\n\n</think>") == 1  # the last turn's empty block


def test_fallbacks_make_a_plain_template_write_what_ours_writes():
    """A template that knows no tools, calls, tool turns or reasoning: each field is written into text it does render,
    the way ours writes it, so the text, the labels and the generation prompt all equal our template's."""
    plain, ours = with_template(PLAIN), with_template(None)
    messages, tools = normalize_chat(FIELDS_ROW)
    for thinking in (True, False):
        rows = with_empty_think(messages) if thinking else messages
        a, b = ChatEncoder(plain), ChatEncoder(ours)
        assert a.render(rows, tools) == b.render(rows, tools)
        assert labelled_runs(plain, a.encode(rows, tools, 1024)) == labelled_runs(ours, b.encode(rows, tools, 1024))
    # two results in a row become one user turn of two blocks; tools without a system message get one of their own
    two = normalize_chat([FIELDS_ROW[1], {**FIELDS_ROW[2], "tool_calls": FIELDS_ROW[2]["tool_calls"] * 2},
                          FIELDS_ROW[3], {"role": "tool", "content": "13"}, FIELDS_ROW[4]])[0]
    assert ChatEncoder(plain).render(two, tools) == ChatEncoder(ours).render(two, tools)
    assert ChatEncoder(plain).render(two, tools).count("<|im_start|>user") == 2
    engine = Engine(make_model("tiny"), plain)
    prompt = messages[:4]  # up to the tool result: the model is to write the answer
    assert engine.render(prompt, tools) == Engine(make_model("tiny"), ours).render(prompt, tools)
    assert template_support(plain).missing() == ["reasoning_content", "reasoning_content of earlier turns", "tools",
                                                 "tool_calls", "tool turns"]
    assert template_support(ours).missing() == []


def test_collates_count_the_rows_that_lost_a_field(tmp_path):
    tok = with_template(QWEN3_LIKE)
    rows = [{"conversations": FIELDS_ROW}, {"conversations": [{"role": "user", "content": "a"},
                                                             {"role": "assistant", "content": "b"}]}]
    data = SFTDataset(write_jsonl(tmp_path / "c.jsonl", rows * 2), tok, 1024, empty_think_ratio=0)
    items = [data[i] for i in range(4)]
    assert pad_collate(items)["lost"].tolist() == [2, 0, 0]  # rows, not turns
    assert pack_collate(items, 0, 1024)["lost"].tolist() == [2, 0, 0]
    assert "lost" not in pad_collate(items[1:2])


def test_rl_prompts_that_lose_a_field_are_named(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", [{"conversations": FIELDS_ROW[:6]}])  # ends with a user turn: a prompt
    with caplog.at_level(logging.WARNING):
        PromptDataset(path, with_template(QWEN3_LIKE))[0]
    assert f"{path}:1" in caplog.text and "reasoning_content x2" in caplog.text
