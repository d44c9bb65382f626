"""The shipped tokenizer (model/tokenizer) and the script that trains it (scripts/train_tokenizer.py).

No network: the shipped files are read as they are, and training is checked on a few KB of text written here.
"""

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "model" / "tokenizer"
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


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


@pytest.mark.parametrize("tag", TAGS)
def test_reasoning_tags_are_single_tokens_even_inside_text(tok, tag):
    (tag_id,) = tok.encode(tag)
    assert tag_id == 3 + TAGS.index(tag)
    ids = tok.encode(f"先想一想{tag}then answer")
    assert ids.count(tag_id) == 1
    assert tok.decode(ids) == f"先想一想{tag}then answer"


def test_decode_skipping_special_tokens_keeps_reasoning_tags(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>a</think><answer>b</answer><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>a</think><answer>b</answer>"


def test_shipped_config_is_what_the_script_writes(script):
    from tokenizers import Tokenizer

    shipped = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert shipped == script.tokenizer_config(Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json")))
    assert shipped["add_bos_token"] is False and shipped["add_eos_token"] is False
    assert shipped["clean_up_tokenization_spaces"] is False
    assert "chat_template" not in shipped, "the template lives in chat_template.jinja only"
    assert script.CHAT_TEMPLATE_PATH == TOKENIZER_DIR / "chat_template.jinja"


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


# ----------------------------------------------------------------------------- the training function

TINY_CORPUS = [
    "今天天气很好，我们去公园散步。明天可能下雨，记得带伞。",
    "小明喜欢学习数学，他每天做十道题。老师说他进步很快。",
    "The cat sat on the mat. The dog sat on the log. Cats and dogs are friends.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 7))  # 19\n",
    "12 + 7 = 19\n计算 12 加 7 等于 19\n100 - 1 = 99\n",
] * 20


def test_train_tokenizer_puts_specials_first_and_round_trips(script, tmp_path):
    trained = script.train_tokenizer(TINY_CORPUS, vocab_size=300)
    assert trained.get_vocab_size() == 300
    for i, token in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *TAGS]):
        assert trained.token_to_id(token) == i
    text = "<think>计算 12 加 7</think><answer>19</answer> and the cat 🐱 sat.\n\n  "
    assert trained.decode(trained.encode(text).ids, skip_special_tokens=False) == text
    assert [trained.token_to_id(t) for t in TAGS] == [i for i in trained.encode(text).ids if 3 <= i <= 6]

    script.save_tokenizer(trained, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == 300 and (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert loaded.decode(loaded.encode(text)) == text
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render(loaded, [{"role": "user", "content": "hi"}], add_generation_prompt=True) == expected


def test_train_tokenizer_is_deterministic(script):
    first = script.train_tokenizer(TINY_CORPUS, vocab_size=300).to_str()
    second = script.train_tokenizer(list(reversed(TINY_CORPUS)), vocab_size=300).to_str()
    assert first == second
