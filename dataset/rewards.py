"""Rule rewards for GRPO (6-reason.py --method grpo) and the reasoning metrics: a completion either is or is not a
well-formed `<think>…</think><answer>…</answer>` reply, and its answer either is or is not the reference number.

A reward is any function `(completion: str, reference: str) -> float`; `load_reward` finds one by name:

    format                       REWARDS below
    correctness
    my_package.rewards:length    an importable module and a function in it
    path/to/my_rewards.py:score  a Python file and a function in it
"""

import re

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


def reference_number(reference) -> int:
    """An int, a number string, or a whole reference reply with an <answer> block -> the one integer it states."""
    if isinstance(reference, int):
        return reference
    answer = extract_answer(reference)
    numbers = _INT.findall(answer if answer is not None else reference)
    if len(numbers) != 1:
        raise ValueError(f"reference {reference!r} does not state exactly one integer")
    return int(numbers[0])


def correctness_reward(text: str, reference_answer) -> float:
    """GRPO answer reward: 1.0 if the reply has exactly one `<answer>…</answer>` block, that block states exactly one
    integer, and it equals the reference ("8", "8个", "答案是8" all count; "7 or 8" does not); else 0.0. A list of
    references (agent_rl's "gt") counts any of them; no reference (rlaif's prompt-only rows) or one that states no
    single integer scores 0.0."""
    answer = extract_answer(text)
    if answer is None or reference_answer is None:
        return 0.0
    numbers = _INT.findall(answer)
    if len(numbers) != 1:
        return 0.0
    for ref in (reference_answer if isinstance(reference_answer, list) else [reference_answer]):
        try:
            if int(numbers[0]) == reference_number(ref):
                return 1.0
        except (ValueError, TypeError):
            continue
    return 0.0


REWARDS = {
    "format": lambda completion, reference: format_reward(completion),
    "correctness": correctness_reward,
}


def load_reward(spec: str):
    """A reward function from a builtin name, `module:function` or `file.py:function` (see the module doc)."""
    if spec in REWARDS:
        return REWARDS[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"unknown reward {spec!r}: use one of {sorted(REWARDS)}, 'module:function' or "
                         f"'file.py:function'")
    from inference.tools import load_function

    return load_function(where, name, f"reward file {where} (from --reward {spec})", f"(from --reward {spec})")
