"""The shipped tokenizer (model/tokenizer) and the script that trains it (scripts/train_tokenizer.py).

No network: the shipped files are read as they are, and training is checked on a few KB of text written here.
The corpus the script reads (dataset/corpus) is tested in tests/test_corpus.py.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from dataset.corpus import HELD_OUT_EVERY, row_text, sample_jsonl

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "model" / "tokenizer"
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
TOOLS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
RESERVED = [f"<|reserved_{i}|>" for i in range(16)]
LAYOUT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *TAGS, *TOOLS, *RESERVED]  # ids 0..26


def load_script():
    spec = importlib.util.spec_from_file_location("train_tokenizer", ROOT / "scripts" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def script():
    return load_script()


# ----------------------------------------------------------------------------- vocabulary and special tokens

def test_shipped_tokenizer_has_6400_tokens_and_minimind_special_ids(tok):
    assert len(tok) == 6400
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 0, 0)
    assert tok.model_max_length == 32768


def test_token_layout_ids_0_to_26(tok):
    assert tok.convert_ids_to_tokens(list(range(27))) == LAYOUT
    added = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    assert [(t["id"], t["content"]) for t in added] == list(enumerate(LAYOUT))
    special = {t["content"]: t["special"] for t in added}
    assert [special[t] for t in LAYOUT] == [True] * 3 + [False] * 8 + [True] * 16
    assert tok.convert_ids_to_tokens(27) not in LAYOUT and not tok.convert_ids_to_tokens(27).startswith("<|")


@pytest.mark.parametrize("tag", TAGS + TOOLS)
def test_reasoning_and_tool_tags_are_single_tokens_even_inside_text(tok, tag):
    (tag_id,) = tok.encode(tag)
    assert tag_id == LAYOUT.index(tag)
    for text in [f"先想一想{tag}then answer", f'x{tag}\n{{"name": "f"}}\n{tag}y', f"{tag}{tag}"]:
        ids = tok.encode(text)
        assert ids.count(tag_id) == text.count(tag)
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == text  # visible text, not special


@pytest.mark.parametrize("token", RESERVED[:2] + RESERVED[-1:])
def test_reserved_tokens_are_single_special_tokens(tok, token):
    token_id = LAYOUT.index(token)
    ids = tok.encode(f"a{token}b 你好")
    assert ids.count(token_id) == 1
    assert tok.decode(ids) == f"a{token}b 你好"
    assert tok.decode(ids, skip_special_tokens=True) == "ab 你好"


def test_decode_skipping_special_tokens_keeps_reasoning_and_tool_tags(tok):
    text = ("<|im_start|>assistant\n<think>a</think><answer>b</answer>"
            "<tool_call>\n{}\n</tool_call><tool_response>\nok\n</tool_response><|im_end|>")
    kept = ("assistant\n<think>a</think><answer>b</answer>"
            "<tool_call>\n{}\n</tool_call><tool_response>\nok\n</tool_response>")
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == kept


def test_shipped_config_is_what_the_script_writes(script):
    from tokenizers import Tokenizer

    shipped = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert shipped == script.tokenizer_config(Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json")))
    assert shipped["add_bos_token"] is False and shipped["add_eos_token"] is False
    assert shipped["clean_up_tokenization_spaces"] is False
    assert [shipped["added_tokens_decoder"][str(i)]["content"] for i in range(27)] == LAYOUT
    assert "chat_template" not in shipped, "the template lives in chat_template.jinja only"


def test_chat_template_is_the_jinja_file_beside_the_tokenizer(script, tok):
    assert script.CHAT_TEMPLATE_PATH == TOKENIZER_DIR / "chat_template.jinja"
    assert not hasattr(script, "CHAT_TEMPLATE"), "the .jinja file is the single source of the template"
    assert tok.chat_template == (TOKENIZER_DIR / "chat_template.jinja").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- lossless round trip

ROUND_TRIP = {
    "zh": "机器学习是人工智能的一个分支，它让计算机从数据中自动学习规律。",
    "zh_traditional": "學而時習之，不亦說乎？有朋自遠方來，不亦樂乎？",
    "en": "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?",
    "mixed": "我在用 PyTorch 2.13 训练一个 6400 词表的 LLM，loss 降到了 1.23（比昨天低 5%）。",
    "emoji": "Good job 👍🏽! 家庭 👨‍👩‍👧‍👦 flags 🇨🇳🇬🇧 and a rare 𠀀 char. ✨",
    "whitespace": "  leading\ttab\n\n\ntrailing   \r\nwindows line\n \n\t\t  \n   ",
    "code": 'def f(x):\n    """Square."""\n    return x ** 2  # 平方\n\nif __name__ == "__main__":\n\tprint(f(3))\n',
    "punctuation": "“引号”‘单引’《书名》【括号】……——！？；：，。、 \"ascii\" 'quotes' <tag> {json: [1, 2]}",
    "combining": "e\u0301 n\u0303 Å Å ﬁ ＡＢＣ１２３",
    "specials_in_text": "<|im_start|>user\n你好<|im_end|>\n<|endoftext|>",
    "tools_in_text": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
                     "<tool_response>\n晴，25°C\n</tool_response><|reserved_3|>",
    "near_misses": "<tool_call <tool_call/> </tool_response >< think> <|reserved_16|> <|reserved_|>",
}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_is_lossless(tok, name):
    text = ROUND_TRIP[name]
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_round_trip_is_lossless_for_any_unicode(tok, text):  # module-scoped fixture: fine with hypothesis
    assert tok.decode(tok.encode(text)) == text


def test_plain_encode_adds_no_bos_or_eos(tok):
    text = "hello 世界"
    ids = tok(text)["input_ids"]
    assert ids == tok.encode(text, add_special_tokens=False)
    assert 1 not in ids and 2 not in ids and 0 not in ids
    assert tok.decode(ids) == text


# ----------------------------------------------------------------------------- chat template

def render(tok, messages, add_generation_prompt):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_chat_template_user_only_with_generation_prompt_injects_no_system_prompt(tok):
    got = render(tok, [{"role": "user", "content": "你好"}], add_generation_prompt=True)
    assert got == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_system_and_two_rounds(tok):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "1+1=?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "再加 3 呢？"},
        {"role": "assistant", "content": "<think>2+3=5</think><answer>5</answer>"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n1+1=?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\n再加 3 呢？<|im_end|>\n"
        "<|im_start|>assistant\n<think>2+3=5</think><answer>5</answer><|im_end|>\n"
    )
    assert render(tok, messages, add_generation_prompt=False) == expected


def test_chat_template_without_generation_prompt_ends_after_last_turn(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert render(tok, messages, add_generation_prompt=False) == expected


def test_generation_prompt_starts_with_the_bos_id(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    prompt = tok.encode("<|im_start|>assistant\n")
    assert prompt[0] == 1 and tok.decode(prompt[1:]) == "assistant\n"
    assert ids[-len(prompt):] == prompt
    assert ids[0] == 1 and ids.count(2) == 1  # one finished turn, closed by <|im_end|>


# ----------------------------------------------------------------------------- compression

# Written for this test; not in the training corpus.
ZH_SAMPLE = ("昨天下午，图书馆举办了一场关于环境保护的讲座。主讲人是一位研究海洋塑料污染的教授，她用许多照片和数据说明，"
             "每年有大量塑料垃圾流入大海，对鱼类和海鸟造成了严重伤害。讲座结束后，很多同学留下来提问，"
             "大家讨论了减少一次性塑料袋、垃圾分类和回收利用等具体办法。")
EN_SAMPLE = ("Yesterday afternoon the library hosted a talk about protecting the environment. The speaker, a "
             "professor who studies plastic pollution in the ocean, used photos and data to show how much plastic "
             "waste flows into the sea every year and how badly it harms fish and seabirds. After the talk many "
             "students stayed to ask questions, and everyone discussed practical steps such as using fewer "
             "single-use bags, sorting rubbish and recycling.")


def test_chars_per_token_beats_raw_bytes(tok):
    zh_tokens, en_tokens = len(tok.encode(ZH_SAMPLE)), len(tok.encode(EN_SAMPLE))
    zh_cpt, en_cpt = len(ZH_SAMPLE) / zh_tokens, len(EN_SAMPLE) / en_tokens
    print(f"\nchars/token: zh {zh_cpt:.2f} ({len(ZH_SAMPLE)} chars, {zh_tokens} tokens), "
          f"en {en_cpt:.2f} ({len(EN_SAMPLE)} chars, {en_tokens} tokens)")
    # Raw byte-level would be 1 token per UTF-8 byte: 3 per Chinese character, 1 per English letter.
    assert zh_tokens < len(ZH_SAMPLE.encode("utf-8")) / 2
    assert en_cpt > 2.5


@pytest.mark.parametrize("prefix", ["", " ", "等于", "x="])
def test_every_number_is_spelled_digit_by_digit(tok, prefix):
    # Qwen2's split: one token per digit wherever the number stands, so "35" and " 35" share their digit tokens
    # (GPT-2's split let BPE merge some digit pairs and not others: no consistent view of numbers)
    digits = [tok.convert_tokens_to_ids(d) for d in "0123456789"]
    for n in [7, 35, 61, 99, 100, 2026, 31415926]:
        ids = tok.encode(f"{prefix}{n}")
        assert ids[-len(str(n)):] == [digits[int(d)] for d in str(n)], (prefix, n, tok.convert_ids_to_tokens(ids))


# ----------------------------------------------------------------------------- the training function

TINY_CORPUS = [
    "今天天气很好，我们去公园散步。明天可能下雨，记得带伞。",
    "小明喜欢学习数学，他每天做十道题。老师说他进步很快。",
    "The cat sat on the mat. The dog sat on the log. Cats and dogs are friends.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 7))  # 19\n",
    "12 + 7 = 19\n计算 12 加 7 等于 19\n100 - 1 = 99\n",
] * 20


def test_train_tokenizer_puts_the_layout_first_and_round_trips(script, tmp_path):
    trained = script.train_tokenizer(TINY_CORPUS, vocab_size=300)
    assert trained.get_vocab_size() == 300
    assert [trained.token_to_id(t) for t in LAYOUT] == list(range(27))
    text = "<think>计算 12 加 7</think><answer>19</answer><tool_call>{}</tool_call> and the cat 🐱 sat.\n\n  "
    assert trained.decode(trained.encode(text).ids, skip_special_tokens=False) == text
    assert [i for i in trained.encode(text).ids if 3 <= i <= 10] == [3, 4, 5, 6, 7, 8]
    numbers = trained.encode("12 + 7 = 19, 100 - 1 = 99").tokens  # "12" is frequent in the corpus, yet never merges
    assert [t for t in numbers if any(c.isdigit() for c in t)] == list("12719100199")

    script.save_tokenizer(trained, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat_template.jinja", "tokenizer.json",
                                                          "tokenizer_config.json"]
    assert (tmp_path / "chat_template.jinja").read_bytes() == (TOKENIZER_DIR / "chat_template.jinja").read_bytes()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == 300 and (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert loaded.convert_ids_to_tokens(list(range(27))) == LAYOUT
    assert loaded.decode(loaded.encode(text)) == text
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render(loaded, [{"role": "user", "content": "hi"}], add_generation_prompt=True) == expected


def test_train_tokenizer_is_deterministic(script):
    first = script.train_tokenizer(TINY_CORPUS, vocab_size=300).to_str()
    second = script.train_tokenizer(list(reversed(TINY_CORPUS)), vocab_size=300).to_str()
    assert first == second


# ----------------------------------------------------------------------------- training on your own corpus (--data)

def write_jsonl(path, n=400):
    """A small corpus the way MiniMind data looks: pretrain rows, SFT conversations, and some junk lines."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if i % 3 == 0:
                row = {"conversations": [{"role": "user", "content": f"第{i}个问题：{i}加{i}等于多少？"},
                                         {"role": "assistant", "content": f"<think>{i}+{i}</think>答案是{2 * i}。"}]}
            else:
                row = {"text": f"Row {i}: 今天天气很好，我们去公园散步。The cat sat on the mat {i} times."}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if i % 97 == 0:
                f.write("not json\n\n" + json.dumps({"id": i}) + "\n")  # a bad line, a blank, a row without text


def test_sample_jsonl_respects_the_cap_holds_rows_out_and_is_deterministic(tmp_path):
    data = tmp_path / "corpus.jsonl"
    write_jsonl(data)
    train, held, stats = sample_jsonl(data, max_chars=5000, progress=False)
    assert stats["rows"] == 400 and stats["bad_lines"] == 5 and stats["empty_rows"] == 5
    assert 0 < sum(map(len, train)) <= 5000 and stats["train_chars"] == sum(map(len, train))
    assert 0 < sum(map(len, held)) <= 5000 // HELD_OUT_EVERY
    assert stats["chars"] > 4 * 5000  # the cap did cut
    assert not set(train) & set(held)
    assert any("答案是" in t and "<think>" in t for t in train)  # conversation contents, joined as plain text
    again = sample_jsonl(data, max_chars=5000, progress=False)
    assert again == (train, held, stats)
    everything, held_everything, _ = sample_jsonl(data, max_chars=10 ** 9, progress=False)
    assert set(train) <= set(everything) and set(held) <= set(held_everything)
    assert len(everything) + len(held_everything) == 400
    assert row_text({"conversations": [{"role": "user", "content": "a"}, {"content": "b"}]}) == "a\nb"


@pytest.mark.e2e
def test_data_flag_trains_a_tokenizer_with_the_same_layout(tmp_path):
    data, out = tmp_path / "corpus.jsonl", tmp_path / "tok"
    write_jsonl(data)
    run = [sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"), "--data", str(data), "--max_chars", "8000",
           "--vocab_size", "320", "--out_dir", str(out)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "training on" in done.stdout and "held-out rows" in done.stdout
    trained = AutoTokenizer.from_pretrained(str(out))
    assert trained.convert_ids_to_tokens(list(range(27))) == LAYOUT and len(trained) == 320
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "chat_template" not in config and (out / "chat_template.jinja").is_file()
    for text in [*ROUND_TRIP.values(), "<tool_call>\n{}\n</tool_call>第7个问题"]:
        assert trained.decode(trained.encode(text)) == text
    first = (out / "tokenizer.json").read_bytes()
    assert subprocess.run(run, capture_output=True, timeout=120).returncode == 0
    assert (out / "tokenizer.json").read_bytes() == first  # deterministic


def test_data_flag_needs_an_out_dir():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"), "--data", "x.jsonl"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--out_dir" in done.stderr
