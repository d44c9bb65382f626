"""scripts/eval_bench.py: lm-evaluation-harness runs our model on local tasks that the test writes (a multiple-choice
and a generation task), and the scores it reports equal the model's own log-likelihood comparison and greedy output
computed here without lm-eval; missing task data offline ends with the commands that fetch it; perplexity against
context length equals a direct computation; the scores land in the report card."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, load_script, make_model, write_jsonl

pytest.importorskip("lm_eval")
bench = load_script("scripts/eval_bench.py")

QUESTIONS = ["北京是中国的首都吗？", "The cat sat on the", "1+1=", "Paris is in", "小明喜欢", "Water is",
             "今天天气", "A dog can"]
CHOICES = [["是的", "不是，在上海", "不知道吧"], ["mat", "moon tonight", "sofa"], ["2", "3 or 4", "11"],
           ["France", "Germany", "the sea"], ["吃鱼", "跑步和游泳", "读书"], ["wet", "dry and hot", "blue"],
           ["很好", "下雨了吗", "不错"], ["bark", "fly high", "swim"]]


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    model = make_model("tiny", seed=5, tie_word_embeddings=False).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _task(folder, name, data, body):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        + body, encoding="utf-8")


def _choice_logprob(model, tokenizer, context, continuation):
    """log p(continuation | context) as lm-eval defines the split: encode the whole, the context's tokens first."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0].float(), -1)
    return sum(logp[p - 1, whole[p]].item() for p in range(len(ctx), len(whole)))


@pytest.mark.e2e
def test_reported_scores_equal_the_models_own_likelihoods_and_greedy_output(tmp_path, model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    import model as _registers  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    mc = [{"question": q, "choices": c, "answer": i % 3} for i, (q, c) in enumerate(zip(QUESTIONS, CHOICES))]
    expected_acc = expected_norm = 0
    for doc in mc:
        lps = [_choice_logprob(model, tokenizer, doc["question"], " " + c) for c in doc["choices"]]
        norm = [lp / len(c) for lp, c in zip(lps, doc["choices"])]  # lm-eval's acc_norm: per character of the choice
        expected_acc += max(range(3), key=lambda k: lps[k]) == doc["answer"]
        expected_norm += max(range(3), key=lambda k: norm[k]) == doc["answer"]
    # generation: what transformers' own generate() writes greedily, as the answer for half of the questions
    written = []
    for q in QUESTIONS:
        ids = tokenizer(q, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.size(1):]
        written.append(tokenizer.decode(out, skip_special_tokens=True).split("\n")[0])
    gen = [{"question": q, "answer": w if i % 2 == 0 else "no such answer"}
           for i, (q, w) in enumerate(zip(QUESTIONS, written))]
    tasks = tmp_path / "tasks"
    _task(tasks, "toy_mc", write_jsonl(tmp_path / "mc.jsonl", mc),
          "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
          "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    _task(tasks, "toy_gen", write_jsonl(tmp_path / "gen.jsonl", gen),
          "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
          "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
          "metric_list:\n  - metric: exact_match\n")
    result = bench.main(["--model_path", str(model_dir), "--device", "cpu", "--dtype", "float32",
                         "--tasks", "toy_mc,toy_gen", "--include_path", str(tasks), "--batch_size", "3",
                         "--out_dir", str(tmp_path / "out"), "--json", str(tmp_path / "bench.json")])
    mc_scores = result["results"]["toy_mc"]["all"]
    assert mc_scores["acc,none"] == pytest.approx(expected_acc / len(mc))
    assert mc_scores["acc_norm,none"] == pytest.approx(expected_norm / len(mc))
    assert result["results"]["toy_mc"]["metric"] == "acc_norm"
    assert result["results"]["toy_gen"]["score"] == pytest.approx(0.5)  # exactly the half whose answer it wrote
    assert json.loads((tmp_path / "bench.json").read_text())["results"].keys() == {"toy_mc", "toy_gen"}
    # and request by request: the wrapper's log-likelihoods (batched, right-padded) equal the one-row computation
    from inference import Engine

    lm = bench.make_lm(Engine(model, tokenizer), batch_size=5, max_length=64)
    pairs = [(d["question"], " " + c) for d in mc for c in d["choices"]]
    got = lm._loglikelihood_tokens([(p, *lm._encode_pair(*p)) for p in pairs])
    for (context, continuation), (lp, _) in zip(pairs, got):
        assert lp == pytest.approx(_choice_logprob(model, tokenizer, context, continuation), abs=1e-4)
    card = json.loads((tmp_path / "out" / "report.json").read_text())
    assert card[-1]["kind"] == "benchmark" and card[-1]["scores"]["toy_gen"] == pytest.approx(0.5)
    assert "| toy_mc |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.e2e
def test_missing_task_data_offline_says_how_to_fetch_it(tmp_path, model_dir):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: nobody-here/no_such_dataset\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{c}}\"\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # the script itself goes offline
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/eval_bench.py"), "--model_path", str(model_dir),
                           "--device", "cpu", "--tasks", "hub_task", "--include_path", str(tasks),
                           "--out_dir", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()
    assert not any(line.startswith("Traceback") for line in message), proc.stderr[-2000:]
    text = proc.stderr
    assert "nobody-here/no_such_dataset" in text and "--download" in text and "HF_ENDPOINT" in text
    assert "modelscope download" in text


def test_perplexity_against_length_equals_a_direct_computation(tmp_path, model_dir, tokenizer):
    text = " ".join(["The cat sat on the mat and looked at the dog."] * 60 + ["小明每天学习，喜欢读书。"] * 40)
    (tmp_path / "held.txt").write_text(text, encoding="utf-8")
    image = tmp_path / "ppl.png"
    result = bench.main(["--model_path", str(model_dir), "--device", "cpu", "--dtype", "float32",
                         "--ppl_vs_len", str(tmp_path / "held.txt"), "--lengths", "16,32,64", "--trained_len", "32",
                         "--windows", "3", "--image", str(image), "--json", str(tmp_path / "ppl.json")])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(tokens[:3 * 32]).view(3, 32)
    with torch.no_grad():
        nll = F.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size).float(),
                              ids[:, 1:].reshape(-1))
    row = next(r for r in result["rows"] if r["length"] == 32)
    assert row["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-4) and row["tokens"] == 3 * 31
    assert result["yarn_factor"] == 2.0 and all(r["ppl_yarn"] is not None for r in result["rows"])
    assert row["ppl_yarn"] != pytest.approx(row["ppl"], rel=1e-6)  # YaRN really changed the positions
    assert image.exists() and image.stat().st_size > 5000
