"""Generated everyday text: sentences from word pools and patterns, arithmetic, numbers and dates, facts, short chats
and code, in zh and en. Deterministic for a seed; written for this project (this repository's licence)."""

import itertools
import json
import random

from .sources import SEED

# Word pools (space separated) and sentence patterns for the generated modern zh/en text: everyday words, numbers
# and punctuation in running sentences, which manuals, game dialogue and old texts rarely give.
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


