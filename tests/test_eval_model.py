"""eval_model.py: non-interactive answers equal plain greedy generation, the REPL keeps exactly --history turns and
/clear forgets them, long prompts are cut from the left with a notice, pretrain checkpoints continue raw text, the
think part can be hidden, adapters load, a missing checkpoint names the stage that makes it."""

import io

import pytest
import torch
from helpers import ScriptedLM, load_script, make_model, save_random_adapter

from demo import metrics
from common.distributed import decode_dtype, fast_dtype
from inference import Engine, Sampling, generate, left_pad, load_tools
from model.lora import from_adapter

ev = load_script("eval_model.py")


@pytest.fixture
def out_dir(tmp_path, tokenizer):
    model = make_model("tiny", seed=1)
    for stage in ("sft", "pretrain"):
        model.save_pretrained(tmp_path / stage)
        tokenizer.save_pretrained(tmp_path / stage)
    return tmp_path


def run(argv, stdin=""):
    out = io.StringIO()
    result = ev.main([str(a) for a in argv], stdin=io.StringIO(stdin), out=out)
    return result, out.getvalue()


def test_prompts_file_answers_equal_greedy_generation(out_dir, tokenizer):
    prompts = ["你好", "What is 3 plus 5?"]
    (out_dir / "p.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    # fp32 as the reference is: where the CPU has native bf16, auto picks it and a random model's near-ties flip
    answers, text = run(["--out_dir", out_dir, "--prompts", out_dir / "p.txt", "--temperature", 0,
                         "--max_new_tokens", 12, "--show_speed", "--dtype", "float32"])
    model = make_model("tiny", seed=1)
    expected = metrics.generate_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], 12)
    assert answers == expected
    assert text.count("[prompt ") == 2 and "> 你好" in text


def test_repl_keeps_history_turns_and_clear_forgets(out_dir, tokenizer):
    messages, text = run(["--out_dir", out_dir, "--temperature", 0, "--max_new_tokens", 4, "--history", 1],
                         stdin="first\n/clear\nsecond\nthird\n/quit\n")
    assert [m["content"] for m in messages if m["role"] == "user"] == ["second", "third"]
    assert "[history cleared]" in text
    args = ev.build_parser().parse_args(["--history", "1", "--max_new_tokens", "4"])
    chat = ev.Chat(Engine(make_model("tiny"), tokenizer), args, raw_text=False, out=io.StringIO())
    chat.messages = messages
    prompt = tokenizer.decode(chat.prompt_ids("fourth"))
    assert "third" in prompt and "fourth" in prompt and "second" not in prompt  # exactly one earlier turn


def test_seed_makes_sampled_replies_repeat_and_earlier_thinking_stays_out_of_the_prompt(tokenizer):
    def replies(seed):
        args = ev.build_parser().parse_args(["--temperature", "1", "--max_new_tokens", "12", "--history", "0",
                                             "--seed", str(seed)])
        chat = ev.Chat(Engine(make_model("tiny", seed=3, tie_word_embeddings=False), tokenizer), args,
                       raw_text=False, out=io.StringIO())
        return [chat.reply("你好") for _ in range(2)]

    first = replies(3)
    assert first[0] == first[1] == replies(3)[0] and replies(4)[0] != first[0]
    lm = ScriptedLM(tokenizer, lambda prompt: "<think>\n先想一想。\n</think>\n\n好的。")
    chat = ev.Chat(Engine(lm, tokenizer), ev.build_parser().parse_args(["--max_new_tokens", "30"]), raw_text=False,
                   out=io.StringIO())
    chat.reply("一")
    chat.reply("二")
    assert "好的。" in lm.prompts[-1] and "先想一想" not in lm.prompts[-1]  # the earlier answer, not its thinking


def test_long_prompt_is_cut_from_the_left_with_a_notice(tokenizer):
    args = ev.build_parser().parse_args(["--max_new_tokens", "2040"])
    out = io.StringIO()
    chat = ev.Chat(Engine(make_model("tiny"), tokenizer), args, raw_text=False, out=out)  # 2048-token context
    ids = chat.prompt_ids("word " * 50)
    assert len(ids) == 8 and "cut from the left to 8" in out.getvalue()
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")  # the end (the question) is what stays


def test_pretrain_checkpoint_continues_raw_text(out_dir, tokenizer):
    answers, text = run(["--out_dir", out_dir, "--stage", "pretrain", "--auto", "--temperature", 0,
                         "--max_new_tokens", 5])
    assert "raw text" in text and len(answers) == len(ev.TEST_PROMPTS)
    args = ev.build_parser().parse_args([])
    ids = ev.Chat(Engine(make_model("tiny"), tokenizer), args, raw_text=True).prompt_ids("法国的首都是")
    assert tokenizer.decode(ids) == tokenizer.bos_token + "法国的首都是"  # laid out as in pretraining, no roles


def test_think_part_and_tool_calls_are_dimmed_or_hidden():
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "3+5"}'}}
    events = [("reasoning_content", "3加5"), ("reasoning_content", "等于8。"), ("content", "8"), ("tool_call", call),
              ("tool_result", {"role": "tool", "content": "8"}), ("content", "答案是8")]
    for hide, color in ((True, False), (False, True)):
        out = io.StringIO()
        printer = ev.Printer(out, hide_think=hide, color=color)
        for event in events:
            printer(*event)
        shown = out.getvalue()
        assert "8" in shown and "答案是8" in shown and 'calculator({"expression": "3+5"})' in shown
        assert "[tool result] 8" in shown
        if hide:
            assert "3加5" not in shown and ev.DIM not in shown
        else:
            assert shown.startswith(ev.DIM + "[think] 3加5") and ev.RESET in shown


def test_tools_run_in_the_chat_and_each_call_and_result_is_shown(tmp_path, tokenizer):
    """--tools builtin,file.py:fn: the reply's calls run, the results go back as tool messages, the model answers;
    a tool that raises is reported to the model, the chat goes on. (A scripted model plays the trained one.)"""
    (tmp_path / "my_tools.py").write_text('def lookup(query: str) -> str:\n    """Find facts."""\n'
                                          '    raise RuntimeError("offline")\n', encoding="utf-8")

    def script(prompt):
        if prompt.count("<tool_response>") == 2:
            return "37加25等于62。"
        if "<tool_response>" in prompt:
            return '<tool_call>\n{"name": "lookup", "arguments": {"query": "x"}}\n</tool_call>'
        assert '"name": "lookup"' in prompt and '"name": "calculator"' in prompt  # both schemas shown
        return '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37+25"}}\n</tool_call>'

    args = ev.build_parser().parse_args(["--tools", f"builtin,{tmp_path / 'my_tools.py'}:lookup",
                                         "--max_new_tokens", "60", "--temperature", "0"])
    out = io.StringIO()
    chat = ev.Chat(Engine(ScriptedLM(tokenizer, script), tokenizer), args, raw_text=False, out=out,
                   tools=load_tools(args.tools))
    assert chat.reply("37加25等于几？") == "37加25等于62。"
    shown = out.getvalue()
    assert '[tool call] calculator({"expression": "37+25"})' in shown and "[tool result] 62" in shown
    assert "[tool result] error: lookup failed: RuntimeError: offline" in shown
    roles = [m["role"] for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    with pytest.raises(SystemExit, match="no_such.py"):
        ev.main(["--tools", "no_such.py:f"])


def test_think_switch_reaches_the_template(tokenizer):
    for flag, end in (("--think", "<think>\n"), ("--no_think", "<think>\n\n</think>\n\n"), (None, "assistant\n")):
        args = ev.build_parser().parse_args([flag] if flag else [])
        chat = ev.Chat(Engine(make_model("tiny"), tokenizer), args, raw_text=False, out=io.StringIO())
        assert tokenizer.decode(chat.prompt_ids("hi")).endswith(end)


def test_adapter_loads_on_top_and_missing_checkpoint_names_its_stage(out_dir, tokenizer):
    save_random_adapter(out_dir / "lora", out_dir / "sft", seed=1, std=0.5)
    (out_dir / "p.txt").write_text("你好\n", encoding="utf-8")
    expected = metrics.generate_replies(from_adapter(out_dir / "lora"), tokenizer,
                                        [[{"role": "user", "content": "你好"}]], 10)
    plain = metrics.generate_replies(make_model("tiny", seed=1), tokenizer, [[{"role": "user", "content": "你好"}]], 10)
    common = ["--prompts", out_dir / "p.txt", "--temperature", 0, "--max_new_tokens", 10, "--dtype", "float32"]
    assert run(["--out_dir", out_dir, "--stage", "lora", *common])[0] == expected
    assert run(["--model_path", out_dir / "sft", "--adapter", out_dir / "lora", *common])[0] == expected
    assert expected != plain  # the adapter did change the answer
    with pytest.raises(SystemExit, match=r"no checkpoint at .*dpo.*4-RLHF\.py"):
        run(["--out_dir", out_dir, "--stage", "dpo", "--auto"])


def test_auto_dtype_is_fp32_on_a_cpu_and_the_static_cache_decodes_alike(tmp_path, tokenizer):
    model = make_model("tiny", seed=1)
    model.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    args = ev.build_parser().parse_args(["--out_dir", str(tmp_path), "--device", "cpu"])
    assert args.dtype == "auto"
    loaded, _, _ = ev.load(args)
    # inference on a CPU runs in fp32 even where bf16 is native (fast_dtype, which training uses): decode_dtype
    assert loaded.dtype == decode_dtype("cpu") == torch.float32
    assert fast_dtype("meta") == torch.float32
    # --compile's path: a pre-allocated cache (fixed shapes for the compiled step) decodes exactly as the plain one
    model = make_model("tiny", seed=3, tie_word_embeddings=False)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], 0)
    plain = generate(model, ids, mask, Sampling(max_new_tokens=12), pad_id=0)
    static = generate(model, ids, mask, Sampling(max_new_tokens=12), pad_id=0, static_cache=True, cache_len=256)
    assert torch.equal(plain, static)
