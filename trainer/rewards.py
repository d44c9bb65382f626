"""Rewards for GRPO / PPO (6-reason.py --method grpo|agent, 4-RLHF.py --method ppo) and the reasoning metrics: rule
rewards (a completion is or is not a well-formed `<think>…</think><answer>…</answer>` reply; its final answer does or
does not match the reference, as a number or as text; MiniMind's shaping rewards for length, the think block and
repetition) and reward models: Hugging Face sequence classifiers (`RewardModel`) and remote-code models with a
`get_score(tokenizer, conversation)` method, like MiniMind's default internlm2-1_8b-reward (`ScoringRewardModel`).

A reward is any function `(prompt, completion: str, reference) -> float`, or the older `(completion, reference)`;
`prompt` is the conversation before the reply (a list of {"role", "content"} messages), `reference` the row's
reference answer, its `gt` list, or None for prompt-only rows. A function with `needs_reference = True` is skipped
(scores 0) on rows without one. `load_reward` finds a function by name:

    format                       REWARDS below
    correctness
    length, think_length,        MiniMind's shaping rewards (its constants; `--reward minimind` is these four)
    think_closed, repetition
    my_package.rewards:length    an importable module and a function in it
    path/to/my_rewards.py:score  a Python file and a function in it
"""

import re

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from inference.tools import load_function

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.S)
_INT = re.compile(r"-?\d+")


def is_well_formatted(text: str) -> bool:
    """The whole reply (outer whitespace aside) is `<think>…</think>`, optional whitespace, `<answer>…</answer>`:
    each tag exactly once, both parts non-empty, nothing before or after."""
    t = text.strip()
    if any(t.count(tag) != 1 for tag in TAGS):
        return False
    m = _FORMAT.fullmatch(t)
    return m is not None and bool(m.group(1).strip()) and bool(m.group(2).strip())


def format_reward(text: str) -> float:
    """GRPO format reward: 1.0 for a well-formed reply (`is_well_formatted`); otherwise 0.1 for each of the four tags
    that occurs exactly once (at most 0.4), a gradient toward the format that never equals getting it right."""
    if is_well_formatted(text):
        return 1.0
    return 0.1 * sum(text.count(tag) == 1 for tag in TAGS)


def extract_answer(text: str):
    """The stripped text between the only `<answer>` and the only `</answer>` after it, else None."""
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return None
    start, end = text.index("<answer>") + len("<answer>"), text.index("</answer>")
    return text[start:end].strip() if start <= end else None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _numbers(text: str) -> list[float]:
    """The numbers a text states ("1,000" is one number: thousands separators are dropped)."""
    return [float(n) for n in _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text))]


def _normalise(text: str) -> str:
    """Case, whitespace and punctuation (any script's) removed: "New  York." == "new york"."""
    import unicodedata

    return "".join(c for c in text.casefold() if not c.isspace() and not unicodedata.category(c).startswith("P"))


def final_answer(text: str) -> str | None:
    """What a reply answers: with answer tags, its one <answer> block (None if the tags are not exactly one pair);
    without (a plain reply, e.g. an agent's last turn), its text after any </think>."""
    if "<answer>" in text or "</answer>" in text:
        return extract_answer(text)
    return text.rsplit("</think>", 1)[-1].strip()


def reference_number(reference):
    """The one number a reference states (an int, a number string, or a reply with an <answer> block), else None."""
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return float(reference)
    numbers = _numbers(final_answer(str(reference)) or "")
    return numbers[0] if len(numbers) == 1 else None


def answer_matches(text: str, reference) -> bool:
    """The reply's final answer equals the reference: as a number when the reference states exactly one (the answer
    must state exactly that one number: "8", "8个", "答案是8.0" count, "7 or 8" does not), else as text with case,
    whitespace and punctuation ignored. Never raises."""
    answer = final_answer(text)
    if reference is None or answer is None:
        return False
    number = reference_number(reference)
    if number is not None:
        numbers = _numbers(answer)
        return len(numbers) == 1 and abs(numbers[0] - number) <= 1e-6 * max(1.0, abs(number))
    expected = _normalise(final_answer(str(reference)) or "")
    return bool(expected) and _normalise(answer) == expected


def correctness_reward(text: str, reference_answer) -> float:
    """GRPO answer reward: 1.0 if the reply's final answer matches the reference (`answer_matches`), else 0.0. A list
    of references (agent_rl's "gt") counts any of them; no reference (rlaif's prompt-only rows) scores 0.0."""
    refs = reference_answer if isinstance(reference_answer, list) else [reference_answer]
    return 1.0 if any(answer_matches(text, ref) for ref in refs) else 0.0


correctness_reward.needs_reference = True  # prompt-only rows skip it (the RL stages say so at the start)


_SENTENCE_END = re.compile(r"[。！？!?\n]|\.(?=\s|$)")


def first_sentence(text: str) -> str:
    """The text before the first 。！？!? or newline, or a full stop followed by a space or the end."""
    return _SENTENCE_END.split(text, maxsplit=1)[0]


def final_number(text: str):
    """The last number of the reply's first sentence ("71减54等于17。" -> "17"), or None."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", first_sentence(text))
    return numbers[-1] if numbers else None


def agent_answer_correct(text: str, gt) -> bool:
    """An agent's final reply states the answer first: numeric references against the last number of its first
    sentence, text ones contained in its first sentence (an answer buried after other claims does not count)."""
    gt = [str(g) for g in (gt if isinstance(gt, list) else [gt]) if g is not None]
    if not gt:
        return False
    if all(re.fullmatch(r"-?\d+(?:\.\d+)?", g) for g in gt):
        number = final_number(text)
        return number is not None and any(float(number) == float(g) for g in gt)
    return any(g in first_sentence(text) for g in gt)


def reward_arity(fn) -> int:
    """3 for fn(prompt, completion, reference), 2 for the older fn(completion, reference)."""
    import inspect

    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # a callable without a signature: the three-argument form
        return 3
    return 3 if len(params) >= 3 else 2


def call_reward(fn, prompt, completion: str, reference) -> float:
    """Score with either form of reward function."""
    return float(fn(prompt, completion, reference) if reward_arity(fn) == 3 else fn(completion, reference))


def split_think(text: str) -> tuple:
    """(the think block's text or None, the reply after it): what a reader sees is the part after `</think>`."""
    if "</think>" not in text:
        return None, text.strip()
    think, answer = text.split("</think>", 1)
    return think.replace("<think>", "").strip(), answer.strip()


# MiniMind's shaping rewards (trainer/train_grpo.py there): its ranges in characters and its values
def length_reward(text: str) -> float:
    """+0.5 for a reply of 20 to 800 characters (outer whitespace aside), else -0.5: neither empty nor rambling."""
    return 0.5 if 20 <= len(text.strip()) <= 800 else -0.5


def think_length_reward(text: str) -> float:
    """With a think block: +1.0 when its text is 20 to 300 characters, else -0.5 (thinking that says something and
    stops); 0 without one."""
    think, _ = split_think(text)
    if think is None:
        return 0.0
    return 1.0 if 20 <= len(think) <= 300 else -0.5


def think_closed_reward(text: str) -> float:
    """With a think block: +0.25 when `</think>` occurs exactly once, else -0.25; 0 without one."""
    if "</think>" not in text:
        return 0.0
    return 0.25 if text.count("</think>") == 1 else -0.25


_UNIT = re.compile(r"[^\W\u3400-\u9fff]+|[\u3400-\u9fff]|[^\w\s]")


def repetition_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """-min(cap, 2 cap x repeated n-grams / n-grams) over the answer (the text after any think block). Units are
    words, single CJK characters and punctuation marks, so Chinese text is not one long "word"."""
    units = _UNIT.findall(split_think(text)[1].lower())
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    if not grams:
        return 0.0
    return -min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams))


REWARDS = {
    "format": lambda completion, reference: format_reward(completion),
    "correctness": correctness_reward,
    "length": lambda completion, reference: length_reward(completion),
    "think_length": lambda completion, reference: think_length_reward(completion),
    "think_closed": lambda completion, reference: think_closed_reward(completion),
    "repetition": lambda completion, reference: repetition_penalty(completion),
}
PRESETS = {"minimind": ("length", "think_length", "think_closed", "repetition")}  # all weighted 1, as there


def expand_rewards(spec: str) -> list:
    """--reward's comma-separated names, a preset (`minimind`) replaced by its rewards."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    return [n for name in names for n in PRESETS.get(name, (name,))]


def load_reward(spec: str):
    """A reward function from a builtin name, `module:function` or `file.py:function` (see the module doc)."""
    if spec in REWARDS:
        return REWARDS[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"unknown reward {spec!r}: use one of {sorted(REWARDS)}, 'module:function' or "
                         f"'file.py:function'")
    return load_function(where, name, f"reward file {where} (from --reward {spec})", f"(from --reward {spec})")


def reward_model_kind(path, trust_remote_code: bool = False) -> str:
    """"get_score" for a remote-code model whose AutoModel class scores conversations (internlm2-reward's form),
    "classifier" for a sequence-classification model. Remote code runs only with trust_remote_code."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        raise SystemExit(f"--reward_model {path}: no config.json there; give a Hugging Face model folder")
    auto_map = json.loads(config.read_text()).get("auto_map") or {}
    if auto_map and not trust_remote_code:
        raise SystemExit(f"--reward_model {path} ships its own model code (auto_map: {', '.join(auto_map)}); "
                         f"read it, then add --trust_remote_code to run it")
    if "AutoModel" in auto_map and "AutoModelForSequenceClassification" not in auto_map:
        return "get_score"
    return "classifier"


def load_reward_model(path, device="cpu", dtype="float32", trust_remote_code=False, clip=None):
    """The reward model at `path`, of whichever kind it is (`reward_model_kind`)."""
    cls = ScoringRewardModel if reward_model_kind(path, trust_remote_code) == "get_score" else RewardModel
    return cls(path, device, dtype, clip=clip, trust_remote_code=trust_remote_code)


class RewardModel:
    """A Hugging Face sequence-classification reward model (one logit per conversation, e.g. Skywork-Reward) as a
    reward: it reads prompt + the reply as a reader sees it (`split_think`: the think block left out, as MiniMind's
    reward does) with its own tokenizer and chat template, on its own device and dtype, frozen; scores are clipped to
    +-clip when given. `score` takes a batch; calling it scores one reply."""

    needs_reference = False

    def __init__(self, path, device="cpu", dtype="float32", batch_size: int = 16, max_length: int = 2048,
                 clip=None, trust_remote_code=False):
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype),
                                                                        trust_remote_code=trust_remote_code)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has {self.model.config.num_labels} labels; a reward model scores "
                             f"with one")
        if self.tokenizer.pad_token is None:  # the score is read at the last real token: padding must be known
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size, self.max_length, self.clip = device, batch_size, max_length, clip

    def clipped(self, scores) -> list[float]:
        return [max(-self.clip, min(self.clip, s)) for s in scores] if self.clip else list(scores)

    def text(self, prompt, completion: str) -> str:
        messages = [*(prompt or []), {"role": "assistant", "content": split_think(completion)[1]}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    def score(self, prompts, completions) -> list[float]:
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        scores = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=False).to(self.device)
                scores += self.model(**enc).logits[:, 0].float().tolist()
        return self.clipped(scores)

    def __call__(self, prompt, completion: str, reference=None) -> float:
        return self.score([prompt], [completion])[0]


class ScoringRewardModel(RewardModel):
    """A remote-code reward model that scores a conversation with `model.get_score(tokenizer, messages)` (the
    internlm2-reward interface MiniMind uses), one conversation at a time, clipped to +-clip (MiniMind's 3)."""

    def __init__(self, path, device="cpu", dtype="float32", clip=None, trust_remote_code=True, **_):
        from transformers import AutoModel

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        self.model = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=True)
        if not callable(getattr(self.model, "get_score", None)):
            raise SystemExit(f"--reward_model {path}: its AutoModel class {type(self.model).__name__} has no "
                             f"get_score(tokenizer, messages) method and it is not a sequence classifier")
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.clip = device, clip

    def score(self, prompts, completions) -> list[float]:
        chats = [[*(p or []), {"role": "assistant", "content": split_think(c)[1]}]
                 for p, c in zip(prompts, completions)]
        with torch.no_grad():
            return self.clipped([float(self.model.get_score(self.tokenizer, chat)) for chat in chats])
