"""The demo curriculum: deterministic synthetic data for all six stages, small enough to train on a laptop CPU.

One small world -- countries, animals, people, colours -- plus sums of small numbers, told as plain text for
pretraining and asked about as chats in the later stages. Some facts and sums are held out: they appear in
pretrain.jsonl only, and sft_eval / kd_eval / dpo_eval ask about them, so a stage can only answer them by surfacing
what pretraining stored. Every answer is templated, so `demo/metrics.py` can check it.

    python -m demo.curriculum                            # rewrites demo/data/ byte for byte
    python -m demo.curriculum --seed 1 --out_dir /tmp/demo

Only the standard library is used; every random choice comes from `random.Random(f"{seed}:{file}")`, and no set is
iterated, so the output depends on the seed alone.
"""

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from common.cli import HelpFormatter

from . import DATA_DIR
from .readme import readme

DEFAULT_SEED = 0
DEFAULT_OUT_DIR = DATA_DIR
LANGS = ("zh", "en")

# ----------------------------------------------------------------------------------------------------- the world

# The world is small on purpose: a 1-2M-parameter model must memorise it in a few hundred steps.
# (zh, en, capital zh, capital en, continent zh, continent en)
COUNTRIES = [
    ("中国", "China", "北京", "Beijing", "亚洲", "Asia"),
    ("日本", "Japan", "东京", "Tokyo", "亚洲", "Asia"),
    ("印度", "India", "新德里", "New Delhi", "亚洲", "Asia"),
    ("法国", "France", "巴黎", "Paris", "欧洲", "Europe"),
    ("英国", "Britain", "伦敦", "London", "欧洲", "Europe"),
    ("德国", "Germany", "柏林", "Berlin", "欧洲", "Europe"),
    ("意大利", "Italy", "罗马", "Rome", "欧洲", "Europe"),
    ("西班牙", "Spain", "马德里", "Madrid", "欧洲", "Europe"),
    ("埃及", "Egypt", "开罗", "Cairo", "非洲", "Africa"),
    ("秘鲁", "Peru", "利马", "Lima", "南美洲", "South America"),
]
# (zh, en, sound zh, sound en, food zh, food en)
ANIMALS = [
    ("狗", "dog", "汪汪", "woof", "骨头", "bones"),
    ("猫", "cat", "喵喵", "meow", "鱼", "fish"),
    ("牛", "cow", "哞哞", "moo", "草", "grass"),
    ("羊", "sheep", "咩咩", "baa", "树叶", "leaves"),
    ("鸭子", "duck", "嘎嘎", "quack", "虫子", "worms"),
    ("猪", "pig", "哼哼", "oink", "玉米", "corn"),
    ("老鼠", "mouse", "吱吱", "squeak", "奶酪", "cheese"),
    ("狮子", "lion", "吼吼", "roar", "肉", "meat"),
]
# invented people: (zh, en, job zh, job en, city zh, city en)
PEOPLE = [
    ("小明", "Xiaoming", "医生", "doctor", "上海", "Shanghai"),
    ("小红", "Xiaohong", "老师", "teacher", "北京", "Beijing"),
    ("小王", "Xiaowang", "厨师", "cook", "南京", "Nanjing"),
    ("小刚", "Xiaogang", "司机", "driver", "武汉", "Wuhan"),
    ("小丽", "Xiaoli", "护士", "nurse", "广州", "Guangzhou"),
    ("小华", "Xiaohua", "工程师", "engineer", "成都", "Chengdu"),
    ("小军", "Xiaojun", "警察", "police officer", "西安", "Xian"),
    ("小芳", "Xiaofang", "歌手", "singer", "杭州", "Hangzhou"),
    ("小强", "Xiaoqiang", "农民", "farmer", "重庆", "Chongqing"),
    ("小美", "Xiaomei", "作家", "writer", "天津", "Tianjin"),
]
# (zh, en, colour zh, colour en, English verb)
THINGS = [
    ("天空", "the sky", "蓝色", "blue", "is"),
    ("雪", "snow", "白色", "white", "is"),
    ("香蕉", "bananas", "黄色", "yellow", "are"),
    ("苹果", "apples", "红色", "red", "are"),
    ("煤", "coal", "黑色", "black", "is"),
    ("草地", "grass", "绿色", "green", "is"),
    ("茄子", "eggplants", "紫色", "purple", "are"),
    ("橙子", "oranges", "橙色", "orange", "are"),
]
TOOL_HELD_OUT = 40  # (city, question, weather) cases the tool metric asks, never in training
MAX_SUM = 10  # sums: a + b <= 10; differences: b <= a <= 10 (they undo every sum)
# share of the reasoning SFT traces that forget the story's last event: the model learns both habits (a group of GRPO
# samples has both) and GRPO's reward picks the right one. At 0.5 which habit greedy decoding followed was a coin
# flip that rounding decided (held-out accuracy 0.08 / 0.21 / 0.29 / 0.38 in four runs), and from 0.38 GRPO gained
# 0.05; at 0.7 the careless habit leads (0.10 bf16, 0.16 fp32) and GRPO gains +0.28 / +0.31
CARELESS_SHARE = 0.7

# how many facts of each kind, and sums, only pretraining sees (and the eval splits ask about)
HELD_OUT = {"capital": 3, "continent": 2, "sound": 2, "food": 2, "job": 2, "city": 2, "color": 2, "add": 10,
            "sub": 8}


def _an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(text):
    return text[0].upper() + text[1:]


@dataclass
class Fact:
    """One checkable fact. `answer[lang]` is the canonical sentence: pretraining text states it verbatim, chats
    answer with it verbatim, so the metric can look for it. `wrong[lang]` are the same sentence with a wrong value."""
    id: str
    kind: str
    subject: str        # groups the facts about one entity (country, animal, person)
    answer: dict
    questions: dict
    wrong: dict


# kind -> (zh answer, en answer, zh questions, en questions); s/S subject, v/V value, verb for English plurals
KINDS = {
    "capital": (lambda s, v: f"{s}的首都是{v}。", lambda S, V, verb: f"The capital of {S} is {V}.",
                ["{s}的首都是哪里？", "{s}的首都是哪座城市？", "请问{s}的首都在哪里？"],
                ["What is the capital of {S}?", "Which city is the capital of {S}?",
                 "Do you know the capital of {S}?"]),
    "continent": (lambda s, v: f"{s}位于{v}。", lambda S, V, verb: f"{S} is in {V}.",
                  ["{s}在哪个大洲？", "{s}位于哪个洲？"], ["Which continent is {S} in?", "Where is {S}?"]),
    "sound": (lambda s, v: f"{s}的叫声是{v}。", lambda S, V, verb: f"A {S} says {V}.",
              ["{s}怎么叫？", "{s}的叫声是什么？"], ["What does a {S} say?", "What sound does a {S} make?"]),
    "food": (lambda s, v: f"{s}喜欢吃{v}。", lambda S, V, verb: f"A {S} likes to eat {V}.",
             ["{s}喜欢吃什么？", "{s}爱吃什么？"], ["What does a {S} like to eat?", "What food does a {S} like?"]),
    "job": (lambda s, v: f"{s}是一名{v}。", lambda S, V, verb: f"{S} is {_an(V)}.",
            ["{s}是做什么工作的？", "{s}的职业是什么？"], ["What is {S}'s job?", "What does {S} do for a living?"]),
    "city": (lambda s, v: f"{s}住在{v}。", lambda S, V, verb: f"{S} lives in {V}.",
             ["{s}住在哪里？", "{s}住在哪个城市？"], ["Where does {S} live?", "Which city does {S} live in?"]),
    "color": (lambda s, v: f"{s}是{v}的。", lambda S, V, verb: f"{_cap(S)} {verb} {V}.",
              ["{s}是什么颜色的？", "{s}的颜色是什么？"], ["What color {verb} {S}?", "What is the color of {S}?"]),
}
ARITH = {
    "add": ("加", "plus", lambda a, b: a + b),
    "sub": ("减", "minus", lambda a, b: a - b),
}
ARITH_QUESTIONS = {
    "zh": ["{a}{w}{b}等于几？", "{a}{w}{b}等于多少？", "请算一下{a}{w}{b}。", "{a}{sym}{b}等于几？"],
    "en": ["What is {a} {w} {b}?", "What is {a} {sym} {b}?", "How much is {a} {w} {b}?"],
}


def world_facts():
    """All non-arithmetic facts, in a fixed order."""
    rows = []  # (kind, subject zh, subject en, value zh, value en, verb)
    for zh, en, cap, cap_en, cont, cont_en in COUNTRIES:
        rows += [("capital", zh, en, cap, cap_en, ""), ("continent", zh, en, cont, cont_en, "")]
    for zh, en, snd, snd_en, food, food_en in ANIMALS:
        rows += [("sound", zh, en, snd, snd_en, ""), ("food", zh, en, food, food_en, "")]
    for zh, en, job, job_en, city, city_en in PEOPLE:
        rows += [("job", zh, en, job, job_en, ""), ("city", zh, en, city, city_en, "")]
    for zh, en, col, col_en, verb in THINGS:
        rows.append(("color", zh, en, col, col_en, verb))
    facts = []
    for kind, s, S, v, V, verb in rows:
        zh_answer, en_answer, zh_q, en_q = KINDS[kind]
        others = []  # other values of the same kind, first-seen order
        for k, _, _, v2, V2, _ in rows:
            if k == kind and v2 != v and (v2, V2) not in others:
                others.append((v2, V2))
        facts.append(Fact(
            id=f"{kind}:{S}", kind=kind, subject=s,
            answer={"zh": zh_answer(s, v), "en": en_answer(S, V, verb)},
            questions={"zh": [q.format(s=s) for q in zh_q], "en": [q.format(S=S, verb=verb) for q in en_q]},
            wrong={"zh": [zh_answer(s, v2) for v2, _ in others], "en": [en_answer(S, V2, verb) for _, V2 in others]}))
    return facts


def arithmetic_facts():
    pairs = [("add", a, b) for a in range(MAX_SUM + 1) for b in range(MAX_SUM + 1 - a)]
    pairs += [("sub", a, b) for a in range(MAX_SUM + 1) for b in range(a + 1)]
    facts = []
    for kind, a, b in pairs:
        w_zh, w_en, op = ARITH[kind]
        c, sym = op(a, b), "+" if kind == "add" else "-"
        wrong = [x for x in (c - 2, c - 1, c + 1, c + 2) if x >= 0]
        facts.append(Fact(
            id=f"{kind}:{a}{sym}{b}", kind=kind, subject=f"{a}{sym}{b}",
            answer={"zh": f"{a}{w_zh}{b}等于{c}。", "en": f"{a} {w_en} {b} is {c}."},
            questions={"zh": [q.format(a=a, b=b, w=w_zh, sym=sym) for q in ARITH_QUESTIONS["zh"]],
                       "en": [q.format(a=a, b=b, w=w_en, sym=sym) for q in ARITH_QUESTIONS["en"]]},
            wrong={"zh": [f"{a}{w_zh}{b}等于{x}。" for x in wrong], "en": [f"{a} {w_en} {b} is {x}." for x in wrong]}))
    return facts


def choose_held_out(facts, seed):
    """Ids of the facts only pretraining sees. Sums with a 0 stay in training (they are the easy rule)."""
    rng = random.Random(f"{seed}:held-out")
    held = []
    for kind, n in HELD_OUT.items():
        pool = [f.id for f in facts if f.kind == kind and "0" not in re.split(r"[+-]", f.subject)]
        held += rng.sample(pool, n)
    return held


# ----------------------------------------------------------------------------------------------------- phrases

FILLER = {
    "zh": ["今天天气很好。", "大家都很开心。", "我们一起去看看吧。", "学习让人快乐。", "太阳慢慢地升起来了。",
           "风轻轻地吹着。", "小朋友们在唱歌。", "这是一个美好的早晨。", "晚上，天上有很多星星。", "他们笑了起来。",
           "路边开满了花。", "时间过得真快。"],
    "en": ["The weather is nice today.", "Everyone is happy.", "Let us go and see.", "Learning is fun.",
           "The sun rises slowly.", "A soft wind is blowing.", "The children are singing.",
           "It is a lovely morning.", "At night there are many stars in the sky.", "They all laughed.",
           "Flowers grow along the road.", "Time flies."],
}
ABOUT = {  # a sentence about a subject that states no fact, by fact kind
    "zh": {"capital": ["很多人喜欢去{s}旅行。", "{s}有很长的历史，也有很多好吃的食物。"],
           "continent": ["很多人喜欢去{s}旅行。", "{s}有很多美丽的风景。"],
           "sound": ["{s}是很多小朋友喜欢的动物。", "在农场和动物园里常常能见到{s}。"],
           "food": ["{s}是很多小朋友喜欢的动物。", "每种动物都有自己爱吃的东西。"],
           "job": ["{s}每天都认真工作。", "{s}的朋友们都很喜欢{s}。"],
           "city": ["{s}觉得自己的城市很美。", "{s}周末常常在城里散步。"],
           "color": ["颜色可以帮助我们认识身边的东西。", "小朋友们很喜欢画{s}。"]},
    "en": {"capital": ["Many people like to travel to {s}.", "{s} has a long history and a lot of good food."],
           "continent": ["Many people like to travel to {s}.", "{s} has many beautiful places."],
           "sound": ["Many children like the {s}.", "You can often see a {s} on a farm or in a zoo."],
           "food": ["Many children like the {s}.", "Every animal has a favourite food."],
           "job": ["{s} works hard every day.", "{s} has many good friends."],
           "city": ["{s} thinks the city is beautiful.", "{s} often takes a walk in the city at weekends."],
           "color": ["Colors help us to know the things around us.", "Children like to draw {s}."]},
}
SYSTEM = {
    "zh": ["你是一个乐于助人的助手。", "你是一个知识丰富的小助手，回答要简短准确。"],
    "en": ["You are a helpful assistant.", "You are a small assistant. Answer briefly and correctly."],
}
KD_SYSTEM = {"zh": "你是一个知识渊博、耐心细致的助手，回答时会多讲一些相关的知识。",
             "en": "You are a knowledgeable and patient assistant who explains a little more than asked."}
CHAT = {  # (user phrasings, reply)
    "zh": [(["你好", "你好！", "您好"], "你好！我是一个小小的语言模型，有什么可以帮你的吗？"),
           (["你是谁？", "你叫什么名字？", "介绍一下你自己"], "我是一个从零开始训练的小语言模型，可以回答一些简单的问题。"),
           (["谢谢", "谢谢你！", "太感谢了"], "不客气！"),
           (["再见", "拜拜"], "再见，祝你有美好的一天！")],
    "en": [(["Hello", "Hi!", "Hello there"], "Hello! I am a tiny language model. How can I help you?"),
           (["Who are you?", "What is your name?", "Tell me about yourself"],
            "I am a small language model trained from scratch. I can answer simple questions."),
           (["Thanks", "Thank you!", "Thank you very much"], "You are welcome!"),
           (["Goodbye", "Bye"], "Goodbye, have a nice day!")],
}
REFUSE = {"zh": ["抱歉，我不能回答这个问题。", "我不知道。"],
          "en": ["Sorry, I cannot answer that.", "I do not know."]}
RUDE = {"zh": ["这么简单的问题还要问我？自己想去吧。", "别烦我。"],
        "en": ["That is a silly question. Figure it out yourself.", "Stop bothering me."]}
RAMBLE = {"zh": "嗯……这个问题有点难，让我想一想。我猜{w}吧，不过我也不太确定，你最好自己再查一查。",
          "en": "Hmm... that is a hard question, let me think. I guess {w}, but I am not sure, you should check it "
                "yourself."}
CLOSING = {"zh": ["希望这个回答对你有帮助！", "如果还想知道别的，可以继续问我。"],
           "en": ["I hope this helps!", "Feel free to ask me more."]}
MORE = {"zh": ["能再详细说说吗？", "还有呢？"], "en": ["Can you tell me more?", "What else?"]}

JOIN = {"zh": "", "en": " "}
# The demo's tool: today's weather in one of the capitals. The weather changes from chat to chat, so no model can know
# it without calling the tool; the call copies the city from the question and the answer the word the tool returned
# (both from small closed sets: a two-digit calculator call needs positional copying the 1.6M model never learned).
WEATHER_SCHEMA = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER = [("晴", "sunny"), ("多云", "cloudy"), ("下雨", "rainy"), ("下雪", "snowy"), ("有雾", "foggy"), ("刮大风", "windy")]
WEATHER_QUESTIONS = {"zh": ["{c}今天天气怎么样？", "{c}今天是什么天气？"],
                     "en": ["What is the weather in {c} today?", "How is the weather in {c} today?"]}


def strip_end(sentence):
    return sentence.rstrip("。.")


# ----------------------------------------------------------------------------------------------------- curriculum

class Curriculum:
    """Everything derived from one seed: the facts, which are held out, and one generator per file."""

    def __init__(self, seed=DEFAULT_SEED):
        self.seed = seed
        self.world = world_facts()
        self.arith = arithmetic_facts()
        self.facts = self.world + self.arith
        self.by_id = {f.id: f for f in self.facts}
        self.held_ids = choose_held_out(self.facts, seed)
        held = set(self.held_ids)
        self.held = [self.by_id[i] for i in self.held_ids]
        self.train_world = [f for f in self.world if f.id not in held]
        self.train_arith = [f for f in self.arith if f.id not in held]

    def rng(self, name):
        return random.Random(f"{self.seed}:{name}")

    def sum_allowed(self, kind, a, b):
        return f"{kind}:{a}{'+' if kind == 'add' else '-'}{b}" not in self.held_ids

    def train_fact(self, rng, world_share=0.5):
        return rng.choice(self.train_world if rng.random() < world_share else self.train_arith)

    def sizes(self) -> dict:
        """How big the world is, for the README: entities of each sort, facts, sums, and how many are held out."""
        held_facts = sum(f.kind not in ARITH for f in self.held)
        return {"countries": len(COUNTRIES), "animals": len(ANIMALS), "people": len(PEOPLE), "things": len(THINGS),
                "facts": len(self.world), "sums": len(self.arith), "max_sum": MAX_SUM, "held_facts": held_facts,
                "held_sums": len(self.held) - held_facts}

    # ---------------------------------------------------------------------------------------- 1 pretrain

    def pretrain_doc(self, rng, lang, kind=None):
        kind = kind or rng.choice(["entry", "entry", "facts", "facts", "facts", "drill", "drill", "story", "travel",
                                   "clinic" if lang == "zh" else "story"])
        j = JOIN[lang]
        if kind == "clinic":
            return self.clinic(rng, rng.choice(DEPARTMENTS))
        if kind == "entry":
            subject = rng.choice(self.world).subject
            return self.entry(rng, lang, subject)
        if kind == "facts":
            return j.join(rng.choice(self.facts).answer[lang] for _ in range(rng.randint(6, 12)))
        if kind == "drill":
            if rng.random() < 0.3:  # a row of the table, in order
                a, op = rng.randint(0, MAX_SUM), rng.choice(["add", "sub"])
                bs = range(MAX_SUM + 1 - a)
                rows = [self.by_id[f"add:{a}+{b}"] for b in bs] if op == "add" else \
                    [self.by_id[f"sub:{a + b}-{b}"] for b in bs]
                return j.join(f.answer[lang] for f in rows)
            return j.join(rng.choice(self.arith).answer[lang] for _ in range(rng.randint(8, 16)))
        if kind == "story":
            return self.story(rng, lang)
        return self.travel(rng, lang)

    def entry(self, rng, lang, subject):
        facts = [f for f in self.world if f.subject == subject]
        name = facts[0].subject if lang == "zh" else facts[0].id.split(":", 1)[1]
        parts = [f.answer[lang] for f in facts]
        parts.append(rng.choice(ABOUT[lang][facts[0].kind]).format(s=name))
        parts.append(rng.choice(FILLER[lang]))
        rng.shuffle(parts)
        return JOIN[lang].join(_cap(p) for p in parts)

    def story(self, rng, lang):
        p, q = rng.sample(PEOPLE, 2)
        animal = rng.choice(ANIMALS)
        a = rng.randint(1, MAX_SUM - 1)
        b = rng.randint(1, MAX_SUM - a)
        by_kind = {f.kind: f for f in self.world if f.subject in (p[0], animal[0])}
        items = rng.choice(ITEMS)
        if lang == "zh":
            place = rng.choice(["公园", "动物园", "农场", "学校", "河边", "超市"])
            parts = [by_kind["job"].answer["zh"], by_kind["city"].answer["zh"], f"有一天，{p[0]}去{place}玩。",
                     f"{p[0]}看到了一只{animal[0]}。", by_kind["sound"].answer["zh"], by_kind["food"].answer["zh"],
                     f"{p[0]}有{a}{items[1]}{items[0]}，{q[0]}又给了{p[0]}{b}{items[1]}。",
                     f"{a}加{b}等于{a + b}，所以{p[0]}现在有{a + b}{items[1]}{items[0]}。", rng.choice(FILLER["zh"])]
        else:
            place = rng.choice(["the park", "the zoo", "a farm", "school", "the river", "the shop"])
            parts = [by_kind["job"].answer["en"], by_kind["city"].answer["en"], f"One day, {p[1]} went to {place}.",
                     f"{p[1]} saw a {animal[1]}.", by_kind["sound"].answer["en"], by_kind["food"].answer["en"],
                     f"{p[1]} had {_count(a, items)}, and {q[1]} gave {p[1]} {b} more.",
                     f"{a} plus {b} is {a + b}, so {p[1]} has {_count(a + b, items)} now.",
                     rng.choice(FILLER["en"])]
        return JOIN[lang].join(parts)

    def clinic(self, rng, department):
        """General text about a hospital department (zh): the words the LoRA stage's medical chats use, so that the
        base model knows them -- a domain adapter sharpens what a base model has read, it cannot learn new tokens
        through frozen embeddings. No question is asked in the chat templates' words."""
        dept, symptoms, advice = department
        a, b = rng.sample(symptoms, 2)
        who, dur = rng.choice(MED_WHO[1:]), rng.choice(MED_DUR)
        if rng.random() < 0.5:
            parts = [f"{dept}是医院里的一个科室。", f"{a}、{b}的病人常常到{dept}就诊。",
                     f"{who[1:]}{dur}{rng.choice(symptoms)}，到医院挂了{dept}的号。",
                     f"医生根据病人的描述给出建议：{advice}", "网上的建议仅供参考，请以医生面诊为准。"]
            rng.shuffle(parts)
            return "".join(parts)
        return (f"病人说：“医生您好，请问我这种情况应该看什么科？”医生问：“您{a}多久了？还有哪里不舒服吗？”"
                f"病人说：“{rng.choice(MED_DUR2)}了，一直没好，还有点{b}。”"
                f"医生说：“根据您的描述，建议您到{dept}就诊，比较稳妥。”（{advice}）")

    def travel(self, rng, lang):
        p, country = rng.choice(PEOPLE), rng.choice(COUNTRIES)
        facts = {f.kind: f for f in self.world if f.subject in (p[0], country[0])}
        if lang == "zh":
            parts = [f"{p[0]}想去{country[0]}旅行。", facts["capital"].answer["zh"], facts["continent"].answer["zh"],
                     f"{p[0]}从{p[4]}出发，坐飞机去了{country[2]}。", rng.choice(FILLER["zh"])]
        else:
            parts = [f"{p[1]} wanted to travel to {country[1]}.", facts["capital"].answer["en"],
                     facts["continent"].answer["en"], f"{p[1]} flew from {p[5]} to {country[3]}.",
                     rng.choice(FILLER["en"])]
        return JOIN[lang].join(parts)

    def pretrain(self, target_bytes=1_100_000):
        """Every fact in every language first (coverage), then random documents up to `target_bytes`, shuffled."""
        rng = self.rng("pretrain")
        docs = []
        for lang in LANGS:
            subjects = []
            for f in self.world:
                if f.subject not in subjects:
                    subjects.append(f.subject)
            docs += [self.entry(rng, lang, s) for s in subjects]
            arith = [f.answer[lang] for f in self.arith]
            docs += [JOIN[lang].join(arith[i:i + 12]) for i in range(0, len(arith), 12)]
        docs += [self.clinic(rng, d) for d in DEPARTMENTS]
        size = sum(len(d.encode()) for d in docs)
        while size < target_bytes:
            lang = rng.choice(LANGS)
            doc = "\n".join(self.pretrain_doc(rng, lang) for _ in range(rng.randint(1, 3)))
            docs.append(doc)
            size += len(doc.encode())
        rng.shuffle(docs)
        return [{"text": d} for d in docs]

    def pretrain_eval(self, train_rows, n=100):
        rng, seen = self.rng("pretrain_eval"), {r["text"] for r in train_rows}
        out = []
        while len(out) < n:
            doc = self.pretrain_doc(rng, LANGS[len(out) % 2], kind=rng.choice(["story", "travel", "facts"]))
            if doc not in seen:
                seen.add(doc)
                out.append({"text": doc})
        return out

    # ---------------------------------------------------------------------------------------- 2 SFT

    def qa(self, rng, fact, lang):
        return [{"role": "user", "content": rng.choice(fact.questions[lang])},
                {"role": "assistant", "content": fact.answer[lang]}]

    def chat_turn(self, rng, lang, which=None):
        users, reply = CHAT[lang][which if which is not None else rng.randrange(len(CHAT[lang]))]
        return [{"role": "user", "content": rng.choice(users)}, {"role": "assistant", "content": reply}]

    def maybe_system(self, rng, lang, p=0.2):
        return [{"role": "system", "content": rng.choice(SYSTEM[lang])}] if rng.random() < p else []

    def sft(self, n=3000):
        rng, rows = self.rng("sft"), []
        for _ in range(n):
            lang, r = rng.choice(LANGS), rng.random()
            msgs = self.maybe_system(rng, lang)
            if r < 0.08:
                msgs += self.chat_turn(rng, lang)
            elif r < 0.70:
                msgs += self.qa(rng, self.train_fact(rng), lang)
            else:  # multi-turn, sometimes opened with a greeting
                if rng.random() < 0.3:
                    msgs += self.chat_turn(rng, lang, 0)
                for _ in range(rng.randint(2, 3)):
                    msgs += self.qa(rng, self.train_fact(rng), lang)
            rows.append({"conversations": msgs})
        return rows

    def sft_eval(self, n_extra=34):
        """Each held-out fact asked once per language, then `n_extra` two-turn chats ending with one."""
        rng, rows = self.rng("sft_eval"), []
        for fact in self.held:
            for lang in LANGS:
                rows.append({"conversations": self.maybe_system(rng, lang) + self.qa(rng, fact, lang)})
        for _ in range(n_extra):
            lang, fact = rng.choice(LANGS), rng.choice(self.held)
            msgs = self.qa(rng, self.train_fact(rng), lang) + self.qa(rng, fact, lang)
            rows.append({"conversations": msgs})
        return rows

    def weather_cases(self):
        """(train, held out) (lang, capital, question template, weather) cases: a held-out one never trains."""
        if not hasattr(self, "_weather_cases"):
            cases = [(lang, c, q, w) for lang in LANGS for c in range(len(COUNTRIES))
                     for q in range(len(WEATHER_QUESTIONS[lang])) for w in range(len(WEATHER))]
            held = self.rng("tools-held-out").sample(cases, TOOL_HELD_OUT)
            self._weather_cases = [x for x in cases if x not in set(held)], held
        return self._weather_cases

    def weather_chat(self, case):
        """(question, call, result, answer) of one case."""
        lang, c, q, w = case
        city = COUNTRIES[c][2] if lang == "zh" else COUNTRIES[c][3]
        weather = WEATHER[w][0] if lang == "zh" else WEATHER[w][1]
        answer = f"{city}今天{weather}。" if lang == "zh" else f"It is {weather} in {city} today."
        return (WEATHER_QUESTIONS[lang][q].format(c=city), {"name": "get_weather", "arguments": {"city": city}},
                weather, answer)

    def tool_system(self, rng, lang):
        """MiniMind's form: the tools as a JSON string on a system message with no other text (with a system text
        as well, half the time, the demo model made 0.78 valid calls and 0.30 right answers; without, 0.88 and 0.35)."""
        return {"role": "system", "content": "", "tools": json.dumps([WEATHER_SCHEMA], ensure_ascii=False)}

    def sft_tools(self, n=800, direct_share=0.25):
        """Tool-call chats: a weather question -> a get_weather call -> its result -> the answer; and questions the
        model answers without calling anything although the tool is there."""
        rng, rows = self.rng("sft_tools"), []
        train, _ = self.weather_cases()
        for _ in range(n):
            case = rng.choice(train)
            msgs = [self.tool_system(rng, case[0])]
            if rng.random() < direct_share:
                msgs += self.qa(rng, rng.choice(self.train_world), case[0])
            else:
                question, call, result, answer = self.weather_chat(case)
                msgs += [{"role": "user", "content": question},
                         {"role": "assistant", "content": "", "tool_calls": json.dumps([call], ensure_ascii=False)},
                         {"role": "tool", "content": result},
                         {"role": "assistant", "content": answer}]
            rows.append({"conversations": msgs})
        return rows

    def agent_rl(self, n=400):
        """agent_rl format for agentic RL: training weather questions (never a held-out case), "gt" and the tool's
        scripted result in that chat, as tools_eval.jsonl scripts it: the tool knows this chat's weather, whatever
        city it is asked for. (With the result given only to the right city -- {"arguments": ..., "result": ...},
        which 6-reason.py supports -- the 1.6M model, which copies the city right 40% of the time, learnt nothing in
        40 steps: the reward was too rare.)"""
        rng, rows = self.rng("agent_rl"), []
        train, _ = self.weather_cases()
        for _ in range(n):
            case = rng.choice(train)
            question, _, result, _ = self.weather_chat(case)
            rows.append({"conversations": [self.tool_system(rng, case[0]), {"role": "user", "content": question}],
                         "gt": [result], "tool_results": {"get_weather": result}})
        return rows

    def tools_eval(self):
        """agent_rl format (conversations + gt), plus the call a right answer makes and what the tool returns in
        this chat ("tool_results": the scripted environment the metric runs the call in)."""
        rng, rows = self.rng("tools_eval"), []
        for case in self.weather_cases()[1]:
            question, call, result, _ = self.weather_chat(case)
            rows.append({"conversations": [self.tool_system(rng, case[0]), {"role": "user", "content": question}],
                         "gt": [result], "expected_call": call, "tool_results": {"get_weather": result}})
        return rows

    # ---------------------------------------------------------------------------------------- 3 KD

    def rich_answer(self, rng, fact, lang):
        """The canonical sentence first (so the QA metric still applies), then what a big teacher would add."""
        parts = [fact.answer[lang]]
        if fact.kind in ARITH:
            a, b = (int(x) for x in re.findall(r"\d+", fact.subject))
            step, c = (1, a + b) if fact.kind == "add" else (-1, a - b)
            if b == 0:
                parts.append({"zh": "任何数加上或减去0，都还等于它自己。",
                              "en": "Adding or taking away 0 leaves a number unchanged."}[lang])
            else:
                counted = [str(a + step * i) for i in range(1, b + 1)]
                if lang == "zh":
                    parts.append(f"可以这样想：从{a}开始往{'后' if step > 0 else '回'}数{b}个数："
                                 f"{'、'.join(counted)}，最后数到的就是{c}。")
                else:
                    parts.append(f"Think of it like this: start at {a} and count {'on' if step > 0 else 'back'} {b}: "
                                 f"{', '.join(counted)}. The last number is {c}.")
        else:
            related = [f for f in self.train_world if f.subject == fact.subject and f.id != fact.id]
            parts += [f.answer[lang] for f in related]
            name = fact.subject if lang == "zh" else fact.id.split(":", 1)[1]
            parts.append(_cap(rng.choice(ABOUT[lang][fact.kind]).format(s=name)))
        parts.append(rng.choice(CLOSING[lang]))
        return JOIN[lang].join(parts)

    def more_answer(self, rng, fact, lang):
        """Answer to "tell me more" about the previous fact: other facts about the subject, or more sums."""
        if fact.kind in ARITH:
            others = [f for f in self.train_arith if f.kind == fact.kind and f.id != fact.id
                      and f.subject.split("+" if fact.kind == "add" else "-")[0] ==
                      fact.subject.split("+" if fact.kind == "add" else "-")[0]]
        else:
            others = [f for f in self.train_world if f.subject == fact.subject and f.id != fact.id]
            others += rng.sample([f for f in self.train_world if f.kind == fact.kind and f.id != fact.id], 2)
        lead = {"zh": "当然可以。", "en": "Sure."}[lang]
        picked = rng.sample(others, min(3, len(others)))
        return JOIN[lang].join([lead] + [f.answer[lang] for f in picked] + [rng.choice(CLOSING[lang])])

    def kd(self, n=500):
        rng, rows = self.rng("kd"), []
        for _ in range(n):
            lang = rng.choice(LANGS)
            msgs = [{"role": "system", "content": KD_SYSTEM[lang]}] if rng.random() < 0.3 else []
            if rng.random() < 0.3:
                msgs += self.chat_turn(rng, lang, 0)
            for _ in range(rng.randint(2, 5)):
                fact = self.train_fact(rng, world_share=0.6)
                msgs += [{"role": "user", "content": rng.choice(fact.questions[lang])},
                         {"role": "assistant", "content": self.rich_answer(rng, fact, lang)}]
                if rng.random() < 0.3:
                    msgs += [{"role": "user", "content": rng.choice(MORE[lang])},
                             {"role": "assistant", "content": self.more_answer(rng, fact, lang)}]
            if rng.random() < 0.5:
                msgs += self.chat_turn(rng, lang, 2)
            rows.append({"conversations": msgs})
        return rows

    def kd_eval(self, n=100):
        """Teacher answers about the held-out facts: each fact once per language, then random ones up to n."""
        rng = self.rng("kd_eval")
        combos = [(f, lang) for f in self.held for lang in LANGS]
        combos += [(rng.choice(self.held), rng.choice(LANGS)) for _ in range(max(0, n - len(combos)))]
        return [{"conversations": self.maybe_system(rng, lang) + [
            {"role": "user", "content": rng.choice(fact.questions[lang])},
            {"role": "assistant", "content": self.rich_answer(rng, fact, lang)}]} for fact, lang in combos[:n]]

    # ---------------------------------------------------------------------------------------- 4 DPO

    def dpo_pair(self, rng, fact, lang, context):
        prompt = context + [{"role": "user", "content": rng.choice(fact.questions[lang])}]
        style = rng.choices(["wrong", "refuse", "rude", "ramble"], weights=[4, 2, 2, 2])[0]
        wrong = rng.choice(fact.wrong[lang])
        guess = wrong[0].lower() + wrong[1:] if re.match(r"(The|A) ", wrong) else wrong
        bad = {"wrong": wrong, "refuse": rng.choice(REFUSE[lang]), "rude": rng.choice(RUDE[lang]),
               "ramble": RAMBLE[lang].format(w=strip_end(guess))}
        return {"chosen": prompt + [{"role": "assistant", "content": fact.answer[lang]}],
                "rejected": prompt + [{"role": "assistant", "content": bad[style]}]}

    def dpo(self, n=1500):
        rng, rows = self.rng("dpo"), []
        for _ in range(n):
            lang = rng.choice(LANGS)
            context = self.maybe_system(rng, lang)
            if rng.random() < 0.15:
                context += self.qa(rng, self.train_fact(rng), lang)
            if rng.random() < 0.05:  # greetings: polite beats rude
                users, reply = CHAT[lang][0]
                prompt = context + [{"role": "user", "content": rng.choice(users)}]
                rows.append({"chosen": prompt + [{"role": "assistant", "content": reply}],
                             "rejected": prompt + [{"role": "assistant", "content": rng.choice(RUDE[lang])}]})
                continue
            rows.append(self.dpo_pair(rng, self.train_fact(rng), lang, context))
        return rows

    def dpo_eval(self, n=100):
        """Pairs about the held-out facts: each fact once per language, then random ones up to n."""
        rng = self.rng("dpo_eval")
        combos = [(f, lang) for f in self.held for lang in LANGS]
        combos += [(rng.choice(self.held), rng.choice(LANGS)) for _ in range(max(0, n - len(combos)))]
        return [self.dpo_pair(rng, f, lang, self.maybe_system(rng, lang)) for f, lang in combos[:n]]

    # ---------------------------------------------------------------------------------------- 5 LoRA (medical)

    def medical(self, n_train=1000):
        """Symptom -> department. Eval uses, per symptom, a question template that training never pairs with it,
        and symptom pairs that training never combines."""
        rng = self.rng("lora_medical")
        held_template = {s: rng.randrange(len(MED_TEMPLATES)) for _, symptoms, _ in DEPARTMENTS for s in symptoms}
        held_pairs = []
        for dept, symptoms, _ in DEPARTMENTS:
            pairs = [(a, b) for a in symptoms for b in symptoms if a != b]
            held_pairs += [(dept, p) for p in rng.sample(pairs, 2)]
        held_pair_keys = [p for _, p in held_pairs]

        def row(dept, advice, question):
            return {"conversations": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": MED_ANSWER.format(dept=dept, advice=advice)}]}

        def fill(template, sym, sym2=""):
            return template.format(who=rng.choice(MED_WHO), dur=rng.choice(MED_DUR), dur2=rng.choice(MED_DUR2),
                                   sym=sym, sym2=sym2)

        advice_of = {dept: advice for dept, _, advice in DEPARTMENTS}
        eval_rows, seen = [], set()
        for dept, symptoms, advice in DEPARTMENTS:
            for s in symptoms:
                eval_rows.append(row(dept, advice, fill(MED_TEMPLATES[held_template[s]], s)))
        for dept, (a, b) in held_pairs:
            for _ in range(2):
                eval_rows.append(row(dept, advice_of[dept], fill(MED_PAIR_TEMPLATE, a, b)))
        seen.update(r["conversations"][0]["content"] for r in eval_rows)

        train = []
        while len(train) < n_train:
            dept, symptoms, advice = rng.choice(DEPARTMENTS)
            if rng.random() < 0.25:
                a, b = rng.sample(symptoms, 2)
                if (a, b) in held_pair_keys:
                    continue
                question = fill(MED_PAIR_TEMPLATE, a, b)
            else:
                s = rng.choice(symptoms)
                t = rng.randrange(len(MED_TEMPLATES))
                if t == held_template[s]:
                    continue
                question = fill(MED_TEMPLATES[t], s)
            if question in seen:
                continue
            seen.add(question)
            train.append(row(dept, advice, question))
        return train, eval_rows

    # ---------------------------------------------------------------------------------------- 6 reasoning

    def word_problem(self, rng, lang, careless=False):
        """A 2-3 step add/subtract story problem; every step is a sum that training may show. careless: the trace
        (and its answer) leaves out the story's last event -- a teacher's slip the reward can tell from the right
        habit; the story is the same."""
        while True:
            x, n_steps = rng.randint(1, MAX_SUM - 1), rng.randint(2, 3)
            steps, cur = [], x
            for _ in range(n_steps):
                kind = "sub" if cur == MAX_SUM or (cur >= 2 and rng.random() < 0.5) else "add"
                k = rng.randint(1, MAX_SUM - cur) if kind == "add" else rng.randint(1, cur)
                if not self.sum_allowed(kind, cur, k):
                    break
                new = cur + k if kind == "add" else cur - k
                steps.append((kind, cur, k, new))
                cur = new
            if len(steps) == n_steps:
                break
        p, q = rng.sample(PEOPLE, 2)
        item = rng.choice(ITEMS)
        traced = steps[:-1] if careless else steps  # the steps the trace works through
        if lang == "zh":
            name, other, (thing, cl) = p[0], q[0], item[:2]
            story = [f"{name}有{x}{cl}{thing}。"]
            think = [f"{name}一开始有{x}{cl}{thing}。"]
            for kind, a, k, c in steps:
                if kind == "add":
                    story.append(rng.choice([f"{other}又给了{name}{k}{cl}。", f"{name}又买了{k}{cl}。",
                                             f"{name}在路上捡到了{k}{cl}。"]))
                    think.append(f"多了{k}{cl}：{a}加{k}等于{c}。")
                else:
                    story.append(rng.choice([f"{name}送给{other}{k}{cl}。", f"{name}弄丢了{k}{cl}。",
                                             f"{name}用掉了{k}{cl}。"]))
                    think.append(f"少了{k}{cl}：{a}减{k}等于{c}。")
            think = think[:1 + len(traced)]
            story.append(f"{name}现在有几{cl}{thing}？")
            think.append(f"所以{name}现在有{traced[-1][3]}{cl}{thing}。")
        else:
            name, other = p[1], q[1]
            story = [f"{name} has {_count(x, item)}."]
            think = [f"{name} starts with {_count(x, item)}."]
            for kind, a, k, c in steps:
                if kind == "add":
                    story.append(rng.choice([f"{other} gives {name} {k} more.", f"{name} buys {k} more.",
                                             f"{name} finds {k} more on the way."]))
                    think.append(f"{k} more: {a} plus {k} is {c}.")
                else:
                    story.append(rng.choice([f"{name} gives {k} to {other}.", f"{name} loses {k}.",
                                             f"{name} uses {k}."]))
                    think.append(f"{k} fewer: {a} minus {k} is {c}.")
            think = think[:1 + len(traced)]
            story.append(f"How many {item[3]} does {name} have now?")
            think.append(f"So {name} has {_count(traced[-1][3], item)} now.")
        answer = f"<think>\n{chr(10).join(think)}\n</think>\n<answer>\n{traced[-1][3]}\n</answer>"
        return {"conversations": [{"role": "user", "content": JOIN[lang].join(story)},
                                  {"role": "assistant", "content": answer}]}

    def reasoning(self, n_train=1500, n_eval=100, n_prompts=500, careless_share=CARELESS_SHARE):
        """Three disjoint sets of problems: eval first (so it does not move when n_train changes). The SFT traces
        come from an imperfect teacher: `careless_share` of them skip the last event (and answer wrong); the eval
        and GRPO prompt files keep the right answers, which the held-out metric and the reward check against."""
        seen, out = set(), {}
        for name, n in [("reason_eval", n_eval), ("reason_prompts", n_prompts), ("reason", n_train)]:
            rng, rows = self.rng(name), []
            while len(rows) < n:
                careless = name == "reason" and rng.random() < careless_share
                row = self.word_problem(rng, "zh" if rng.random() < 0.6 else "en", careless)
                question = row["conversations"][0]["content"]
                if question not in seen:
                    seen.add(question)
                    rows.append(row)
            out[name] = rows
        return out

    # ---------------------------------------------------------------------------------------- all files

    def files(self):
        """{file name: rows}, checked for leaks."""
        pretrain = self.pretrain()
        lora, lora_eval = self.medical()
        files = {"pretrain.jsonl": pretrain, "pretrain_eval.jsonl": self.pretrain_eval(pretrain),
                 "sft.jsonl": self.sft(), "sft_eval.jsonl": self.sft_eval(),
                 "sft_tools.jsonl": self.sft_tools(), "tools_eval.jsonl": self.tools_eval(),
                 "agent_rl.jsonl": self.agent_rl(), "kd.jsonl": self.kd(),
                 "kd_eval.jsonl": self.kd_eval(),
                 "dpo.jsonl": self.dpo(), "dpo_eval.jsonl": self.dpo_eval(),
                 "lora_medical.jsonl": lora, "lora_medical_eval.jsonl": lora_eval}
        reasoning = self.reasoning()
        files.update({f"{k}.jsonl": reasoning[k] for k in ["reason", "reason_eval", "reason_prompts"]})
        self.check(files)
        return files

    def check(self, files):
        """Held-out items never reach a training file; every held-out fact is stated in pretraining text."""
        pretrain = "\n".join(r["text"] for r in files["pretrain.jsonl"])
        chats = "\n".join(m["content"] for name in TRAIN_CHAT_FILES for r in files[name] for m in messages_of(r))
        for fact in self.held:
            for lang in LANGS:
                key = strip_end(fact.answer[lang])
                assert occurs(key, pretrain), f"held-out fact {fact.id} ({lang}) missing from pretraining text"
                assert not occurs(key, chats), f"held-out fact {fact.id} ({lang}) leaked into a training file"
                for question in fact.questions[lang]:
                    assert not occurs(question, pretrain), f"held-out question {question!r} asked in pretraining"
        for train, held in EVAL_OF.items():
            train_rows = {json.dumps(r, ensure_ascii=False) for r in files[train]}
            assert not any(json.dumps(r, ensure_ascii=False) in train_rows for r in files[held]), (train, held)
        trained = {(r["conversations"][i]["content"], r["conversations"][i + 2]["content"])
                   for r in files["sft_tools.jsonl"] for i, m in enumerate(r["conversations"]) if m.get("tool_calls")}
        assert not any((r["conversations"][-1]["content"], r["gt"][0]) in trained for r in files["tools_eval.jsonl"]), \
            "a held-out tool case is in the SFT data"
        rl_cases = {(r["conversations"][-1]["content"], r["gt"][0]) for r in files["agent_rl.jsonl"]}
        held_cases = {(r["conversations"][-1]["content"], r["gt"][0]) for r in files["tools_eval.jsonl"]}
        assert not rl_cases & held_cases, "a held-out tool case is in the agentic RL data"
        medical_questions = [r["conversations"][0]["content"] for r in files["lora_medical_eval.jsonl"]]
        assert not any(q in pretrain for q in medical_questions), "a held-out medical question is in pretraining"
        for held, trains in [("reason_eval.jsonl", ["reason.jsonl", "reason_prompts.jsonl"]),
                             ("lora_medical_eval.jsonl", ["lora_medical.jsonl"])]:
            asked = {r["conversations"][0]["content"] for name in trains for r in files[name]}
            assert not any(r["conversations"][0]["content"] in asked for r in files[held]), held


ITEMS = [  # zh noun, zh classifier, en singular, en plural
    ("苹果", "个", "apple", "apples"), ("铅笔", "支", "pencil", "pencils"), ("书", "本", "book", "books"),
    ("糖果", "颗", "candy", "candies"), ("气球", "个", "balloon", "balloons"), ("贴纸", "张", "sticker", "stickers"),
    ("鸡蛋", "个", "egg", "eggs"), ("花", "朵", "flower", "flowers"),
]


def _count(n, item):
    return f"{n} {item[2] if n == 1 else item[3]}"


# (department, symptoms, advice); no department name contains another
DEPARTMENTS = [
    ("呼吸内科", ["咳嗽", "咳痰", "喘不上气", "胸闷气短"], "平时注意保暖，多喝温水，少去人多的地方。"),
    ("消化内科", ["胃疼", "拉肚子", "恶心想吐", "反酸烧心"], "饮食要清淡，少吃辛辣油腻的食物。"),
    ("心血管内科", ["心慌", "心跳很快", "血压偏高", "心跳不规律"], "注意休息，不要熬夜，避免情绪激动。"),
    ("皮肤科", ["皮肤起红疹", "皮肤很痒", "脸上长痘", "手上脱皮"], "不要抓挠，保持皮肤清洁。"),
    ("眼科", ["眼睛干涩", "眼睛发红", "看东西模糊", "眼睛痒还流泪"], "少看手机，让眼睛多休息。"),
    ("耳鼻喉科", ["喉咙疼", "鼻塞流鼻涕", "耳朵疼", "耳鸣"], "多喝水，少吃刺激性的食物。"),
    ("口腔科", ["牙疼", "牙龈出血", "口腔溃疡", "牙齿松动"], "早晚认真刷牙，少吃甜食。"),
    ("骨科", ["腰疼", "膝盖疼", "脖子僵硬", "脚踝扭伤"], "避免剧烈运动，注意休息。"),
    ("神经内科", ["头疼", "头晕", "失眠", "手脚发麻"], "保持规律作息，适当放松。"),
    ("泌尿外科", ["尿频尿急", "小便疼", "排尿困难", "尿里有血"], "多喝水，不要憋尿。"),
]
MED_TEMPLATES = [
    "医生您好，{who}{dur}{sym}，应该挂什么科？",
    "请问{who}{sym}该去哪个科看？",
    "{who}{dur}一直{sym}，去医院要挂哪个科？",
    "{who}{sym}，{dur2}了还没好，看什么科比较好？",
    "{sym}挂什么科？",
    "{who}{dur}{sym}，需要去医院吗？挂哪个科？",
]
MED_PAIR_TEMPLATE = "{who}{dur}{sym}，还有点{sym2}，应该看哪个科？"
MED_WHO = ["我", "我妈妈", "我爸爸", "我爷爷", "我奶奶", "我朋友", "我同事"]
MED_DUR = ["最近", "这两天", "这一周", "这几个月", "从昨天开始"]
MED_DUR2 = ["好几天", "一个星期", "半个月"]
MED_ANSWER = "根据您的描述，建议您到{dept}就诊。{advice}（仅供参考，请以医生面诊为准。）"

TRAIN_CHAT_FILES = ["sft.jsonl", "sft_tools.jsonl", "kd.jsonl", "dpo.jsonl", "lora_medical.jsonl", "reason.jsonl",
                    "reason_prompts.jsonl"]
EVAL_OF = {"pretrain.jsonl": "pretrain_eval.jsonl", "sft.jsonl": "sft_eval.jsonl", "sft_tools.jsonl": "tools_eval.jsonl", "kd.jsonl": "kd_eval.jsonl",
           "dpo.jsonl": "dpo_eval.jsonl",
           "lora_medical.jsonl": "lora_medical_eval.jsonl", "reason.jsonl": "reason_eval.jsonl"}


def messages_of(row):
    """Every message of a chat row (both sides of a DPO pair)."""
    if "conversations" in row:
        return row["conversations"]
    return row["chosen"] + row["rejected"]


def _alnum(ch):
    return ch.isascii() and ch.isalnum()


def occurs(key, text):
    """`key` in `text`, where a key that starts (ends) with an ASCII letter or digit must not be glued to another one
    before (after) it: "1加2等于3" is not inside "11加2等于13", "Paris" is not inside "Parisian"."""
    start = text.find(key)
    while start >= 0:
        end = start + len(key)
        glued_before = start > 0 and _alnum(key[0]) and _alnum(text[start - 1])
        glued_after = end < len(text) and _alnum(key[-1]) and _alnum(text[end])
        if not (glued_before or glued_after):
            return True
        start = text.find(key, start + 1)
    return False


# ----------------------------------------------------------------------------------------------------- output

def to_jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def render(seed=DEFAULT_SEED):
    """{file name: bytes} for every file of demo/data/, README.md included."""
    curriculum = Curriculum(seed)
    out = {name: to_jsonl(rows) for name, rows in curriculum.files().items()}
    out["README.md"] = readme(out, seed, curriculum.sizes())
    return out


def write(out_dir=DEFAULT_OUT_DIR, seed=DEFAULT_SEED):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rendered = render(seed)
    for name, data in rendered.items():
        path = out_dir / name
        if not path.exists() or path.read_bytes() != data:  # unchanged files keep their mtime (and token caches)
            path.write_bytes(data)
    return rendered


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out_dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args()
    rendered = write(args.out_dir, args.seed)
    for name, data in rendered.items():
        lines = data.count(b"\n")
        print(f"{name:28s} {lines:6d} lines {len(data) / 1024:8.1f} KiB")
    print(f"total {sum(len(d) for d in rendered.values()) / 1024 / 1024:.2f} MiB in {args.out_dir}")


if __name__ == "__main__":
    main()
