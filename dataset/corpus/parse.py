"""File formats of the corpus packages, read with the standard library: .deb archives, HTML / Mallard / DocBook,
roff man pages, gettext .mo catalogues and msgpack; and the paragraph cleaning that turns them into documents."""

import gettext
import gzip
import io
import re
import struct
import tarfile
from html.parser import HTMLParser

DOC_CHARS = 2000  # documentation files are cut into documents of about this many characters, at paragraph ends


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
HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


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


def mo_entries(raw):
    """(msgid, msgstr) pairs of a compiled gettext catalogue (.mo) that are translated; the header skipped."""
    catalog = gettext.GNUTranslations(io.BytesIO(raw))._catalog
    return [(k, v) for k, v in catalog.items() if isinstance(k, str) and k and isinstance(v, str) and v and v != k]


_MARKUP = re.compile(r"</?(?:i|b|u|s|small|big|span|tt|sub|sup)\b[^>]*>")  # Pango markup in game strings


def mo_translations(raw):
    return [clean_paragraph(_MARKUP.sub("", v)) for _, v in mo_entries(raw)]


def mo_originals(raw):
    return [clean_paragraph(_MARKUP.sub("", k)) for k, _ in mo_entries(raw)]


def keep_paragraph(text, lang):
    """Mostly Chinese (zh; a translation leaves some paragraphs in English) or free of Han characters (en)."""
    letters = len(re.sub(r"\s", "", text))
    if lang == "zh":
        return len(HAN.findall(text)) >= 2 and len(_CJK_CHAR.findall(text)) >= 0.3 * letters
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
