"""data_process.py, offline: fixtures in the real formats (Magpie parquet, GB18030 medical CSVs), conversions that
load in the stage Datasets, validate finding exactly the planted bad lines, stats equal to a direct computation,
and download / tokenizer with ModelScope replaced at its boundary."""

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import load_script, write_jsonl

from dataset import DPODataset, SFTDataset
from model import TOKENIZER_DIR

dp = load_script("data_process.py")


def _chat(q, a):
    return [{"content": q, "role": "user"}, {"content": a, "role": "assistant"}]  # Magpie's key order


def test_magpie_parquet_becomes_dpo_jsonl_batch_by_batch(tmp_path, tokenizer):
    rows = [{"uuid": "1", "instruction": "写一首关于春天的诗", "chosen": _chat("写一首关于春天的诗", "春风吹绿了江南岸。"),
             "rejected": _chat("写一首关于春天的诗", "不会。")},
            {"uuid": "2", "instruction": "same", "chosen": _chat("q", "a"), "rejected": _chat("q", "a")},
            {"uuid": "3", "instruction": "empty", "chosen": _chat("q", " "), "rejected": _chat("q", "b")},
            {"uuid": "4", "instruction": "Hi", "chosen": _chat("Hi", "Hello! 你好"), "rejected": _chat("Hi", "Go away")}]
    schema = pa.schema([("uuid", pa.string()), ("instruction", pa.string()),
                        ("chosen", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                        ("rejected", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())])))])
    pq.write_table(pa.Table.from_pylist(rows[:3], schema), tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(rows[3:], schema), tmp_path / "b.parquet")
    out = tmp_path / "dpo.jsonl"
    counts = dp.magpie([tmp_path / "a.parquet", tmp_path / "b.parquet"], out, batch_size=2)
    assert counts == {"read": 4, "written": 2, "dropped: chosen == rejected": 1, "dropped: empty or malformed": 1}
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"chosen": [{"role": "user", "content": "写一首关于春天的诗"},
                                   {"role": "assistant", "content": "春风吹绿了江南岸。"}],
                        "rejected": [{"role": "user", "content": "写一首关于春天的诗"},
                                     {"role": "assistant", "content": "不会。"}]}
    data = DPODataset(out, tokenizer)
    assert len(data) == 2 and not data.rows.bad_lines
    labels = data[0]["chosen"]["labels"]
    assert tokenizer.decode(labels[labels != -100]) == "春风吹绿了江南岸。<|im_end|>"


def _medical_fixture(root):
    """Two department folders of GB18030 CSVs: Chinese text, an empty row, a duplicate, a bad byte."""
    header = "department,title,ask,answer\n"
    (root / "IM_内科").mkdir(parents=True)
    (root / "Pediatric_儿科").mkdir()
    im = header + ("内科,高血压,  高血压患者能吃党参吗？ ,高血压病人可以口服党参，但要注意剂量。\n"
                   "内科,空,,\n"
                   "内科,头晕,最近总是头晕怎么办,建议测量血压，必要时到神经内科就诊。\n"
                   "内科,头晕,最近总是头晕怎么办,建议测量血压，必要时到神经内科就诊。\n")
    (root / "IM_内科" / "内科5000-33000.csv").write_bytes(im.encode("gb18030"))
    kids = (header + "儿科,发烧,孩子发烧三十九度怎么办,先物理降温，超过三十八度五可以用退烧药。\n").encode("gb18030")
    kids += "儿科,乱码,坏字节".encode("gb18030") + b"\xff\xfe" + ",回答\n".encode("gb18030")
    (root / "Pediatric_儿科" / "儿科5-14000.csv").write_bytes(kids)


def test_medical_csvs_become_sft_jsonl_deduplicated_shuffled_and_split(tmp_path, tokenizer):
    _medical_fixture(tmp_path / "csv")
    out, val = tmp_path / "med.jsonl", tmp_path / "med_val.jsonl"
    counts = dp.medical(tmp_path / "csv", out, val_out=val, val_ratio=0.34, seed=1)
    assert counts["read"] == 6
    assert counts["dropped: empty"] == 1 and counts["dropped: duplicate"] == 1
    assert counts["dropped: undecodable bytes"] == 1
    assert counts["written"] + counts["validation"] == 3 and counts["validation"] == 1
    assert counts["department IM_内科"] == 2 and counts["department Pediatric_儿科"] == 1
    rows = [json.loads(x) for f in (out, val) for x in f.read_text(encoding="utf-8").splitlines()]
    pairs = {(r["conversations"][0]["content"], r["conversations"][1]["content"]) for r in rows}
    assert pairs == {("高血压患者能吃党参吗？", "高血压病人可以口服党参，但要注意剂量。"),
                     ("最近总是头晕怎么办", "建议测量血压，必要时到神经内科就诊。"),
                     ("孩子发烧三十九度怎么办", "先物理降温，超过三十八度五可以用退烧药。")}
    data = SFTDataset(out, tokenizer)
    item = data[0]
    assert tokenizer.decode(item["labels"][item["labels"] != -100]) in {a + "<|im_end|>" for _, a in pairs}
    # the same seed gives the same order; another seed another order (3 rows: compare whole files)
    again = tmp_path / "again.jsonl"
    dp.medical(tmp_path / "csv", again, val_out=tmp_path / "again_val.jsonl", val_ratio=0.34, seed=1)
    assert again.read_bytes() == out.read_bytes()


def test_medical_length_filter_bounds_are_inclusive_and_the_seed_sets_the_order(tmp_path):
    """min_len / max_len count question + answer characters, both bounds kept; 40 rows shuffled by the seed: the
    same seed gives the same order, another seed another one, and neither is the file order."""
    (tmp_path / "csv").mkdir()
    lines = ["department,title,ask,answer"]
    lines += [f"内科,t,问题{i:02d},答" for i in range(40)]  # 5 characters each
    lines += ["内科,t,短,答", "内科,t,问题很长很长很长,回答也很长很长很"]  # 2 and 16 characters
    (tmp_path / "csv" / "m.csv").write_bytes(("\n".join(lines) + "\n").encode("gb18030"))

    def run(name, **kw):
        counts = dp.medical(tmp_path / "csv", tmp_path / name, **kw)
        asks = [json.loads(x)["conversations"][0]["content"]
                for x in (tmp_path / name).read_text(encoding="utf-8").splitlines()]
        return counts, asks

    counts, asks = run("a.jsonl", seed=1, min_len=5, max_len=15)
    assert counts["dropped: length"] == 2 and sorted(asks) == [f"问题{i:02d}" for i in range(40)]
    counts, kept = run("b.jsonl", seed=1, min_len=2, max_len=16)  # both bounds inclusive
    assert counts["dropped: length"] == 0 and {"短", "问题很长很长很长"} <= set(kept)
    assert run("c.jsonl", seed=1, min_len=5, max_len=15)[1] == asks
    other = run("d.jsonl", seed=2, min_len=5, max_len=15)[1]
    assert other != asks and sorted(other) == sorted(asks)
    assert asks != [f"问题{i:02d}" for i in range(40)]


def test_validate_finds_exactly_the_planted_bad_lines(tmp_path, capsys):
    good = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    lines = [json.dumps(good, ensure_ascii=False)] * 3
    lines.insert(1, '{"conversations": [')  # 2: bad JSON
    lines.insert(3, json.dumps({"messages": []}))  # 4: missing key
    lines.insert(5, json.dumps({"conversations": good["conversations"][::-1]}, ensure_ascii=False))  # 6: role order
    lines.append(lines[0])
    lines.append(json.dumps({"conversations": [{"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "  "}]}))  # 8: empty content
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = dp.validate(path, "sft")
    assert (result["good"], result["bad"]) == (4, 4)
    assert [line for line, _ in result["first_bad"]] == [2, 4, 6, 8]
    reasons = [r for _, r in result["first_bad"]]
    assert "Expecting" in reasons[0] and "missing key" in reasons[1] and "roles" in reasons[2]
    assert "neither content nor tool calls" in reasons[3]
    with pytest.raises(SystemExit, match="4 bad line"):
        dp.main(["validate", str(path), "--stage", "sft"])
    assert f"{path}:6:" in capsys.readouterr().out
    assert dp.main(["validate", str(path), "--stage", "sft", "--max_bad", "4"])["bad"] == 4


def test_validate_reason_checks_the_think_answer_format(tmp_path):
    ok = {"conversations": [{"role": "user", "content": "1+1?"},
                            {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n<answer>\n2\n</answer>"}]}
    bad = {"conversations": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    path = write_jsonl(tmp_path / "r.jsonl", [ok, bad])
    result = dp.validate(path, "reason")
    assert (result["good"], result["bad"]) == (1, 1) and "think" in result["first_bad"][0][1]


def test_validate_and_stats_understand_todays_tool_reasoning_prompt_and_gt_rows(tmp_path, tokenizer):
    calc = {"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}
    tool_row = {"conversations": [
        {"role": "system", "content": "", "tools": json.dumps([calc]), "tool_calls": None},
        {"role": "user", "content": "3*4?", "reasoning_content": None},
        {"role": "assistant", "content": "", "tool_calls": '[{"name": "calc", "arguments": {"x": "3*4"}}]'},
        {"role": "tool", "content": "12"},
        {"role": "assistant", "content": "12", "reasoning_content": "the tool said 12"}]}
    rlaif = {"conversations": [{"role": "user", "content": "写诗"}, {"role": "assistant", "content": ""}]}
    agent = {"conversations": tool_row["conversations"][:2], "gt": ["12"]}
    sft = write_jsonl(tmp_path / "sft.jsonl", [tool_row, rlaif])
    result = dp.validate(sft, "sft")
    assert (result["good"], result["bad"]) == (1, 1) and result["first_bad"][0][0] == 2  # prompt-only: not for SFT
    assert result["rows_with"] == {"reasoning": 1, "tool_calls": 1, "tool_results": 1, "tools": 1}
    assert dp.validate(sft, "reason")["good"] == 1  # reasoning_content counts as reasoning
    prompts = write_jsonl(tmp_path / "rl.jsonl", [rlaif, agent, tool_row])
    result = dp.validate(prompts, "grpo")
    assert result["bad"] == 0 and result["rows_with"]["prompt_only"] == 2 and result["rows_with"]["gt"] == 1
    assert [line for line, _ in dp.validate(prompts, "agent")["first_bad"]] == [1, 3]  # no gt
    stats = dp.stats(prompts, tokenizer, sample=10)
    expected = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for r in (rlaif, agent, tool_row)
                for t in dp.render(r, tokenizer)]
    assert stats["unusable"] == 0 and stats["max"] == max(expected) and stats["rows_with"]["tools"] == 2
    assert '"name": "calc"' in dp.render(tool_row, tokenizer)[0]  # tools and calls are in what is counted


def test_row_samplers_pick_every_line_equally_often(tmp_path):
    """The reservoir sample behind `stats` and the budgeted sample behind the tokenizer corpus: over 2,000 fixed seeds
    each of 50 lines is picked with frequency 0.1 +- 0.03 (4.5 standard deviations of a fair draw), so neither keeps
    the first rows, the last ones or any other fixed part of a file."""
    from dataset.corpus import sample_jsonl

    rows = [{"text": f"row{i:02d}"} for i in range(50)]  # 5 characters each
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    held_first = write_jsonl(tmp_path / "held.jsonl", [{"text": "held"}] + rows)  # the corpus holds line 0 out
    for pick in (lambda seed: [r["text"] for r in dp.sample_rows(path, 5, seed)[0]],
                 lambda seed: sample_jsonl(held_first, 25, seed=seed, held_out_every=10 ** 6, progress=False)[0]):
        counts = Counter(text for seed in range(2000) for text in pick(seed))
        assert sum(counts.values()) == 2000 * 5
        assert all(abs(counts[f"row{i:02d}"] / 2000 - 0.1) < 0.03 for i in range(50)), counts.most_common(3)


def test_stats_percentiles_equal_a_direct_computation(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    rows = [{"text": "猫" * int(n) + " cat" * int(m)} for n, m in zip(rng.integers(1, 300, 200),
                                                                      rng.integers(0, 50, 200))]
    path = write_jsonl(tmp_path / "pretrain.jsonl", rows)
    result = dp.stats(path, tokenizer, sample=1000, image=tmp_path / "len.png")
    lengths = [len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert result["lines"] == result["sampled"] == 200
    for p in (50, 90, 95, 99):
        assert result[f"p{p}"] == pytest.approx(np.percentile(lengths, p))
    assert result["max_seq_len_95"] == int(np.ceil(np.percentile(lengths, 95)))
    assert result["mean"] == pytest.approx(np.mean(lengths)) and result["max"] == max(lengths)
    assert (tmp_path / "len.png").stat().st_size > 5000
    assert result["tokens_estimate"] == sum(lengths)  # every row sampled: the estimate is the file's token count
    # sampled: a reservoir of 50 rows out of 200, the same 50 for the same seed
    a, b = dp.stats(path, tokenizer, sample=50), dp.stats(path, tokenizer, sample=50)
    assert a["sampled"] == 50 and a["lines"] == 200 and a == b
    assert a["tokens_estimate"] == round(200 * a["mean"])  # scaled from the sample to the whole file


def _fake_remote(holds, calls):
    """A fetch that behaves like modelscope 1.40.2's dataset_file_download for a dataset holding `holds`."""

    def fetch(dataset_id, file_name, local_dir):
        calls.append(file_name)
        if file_name not in holds:
            _raise_as_modelscope_does(file_name)
        local_dir.mkdir(parents=True, exist_ok=True)
        (local_dir / file_name).write_text('{"text": "x"}\n')
        return local_dir / file_name

    return fetch


def _raise_as_modelscope_does(file_name):
    # modelscope_hub/compat/file_download.py: the hub's NotExistError (HTTP 404) re-raised as a requests HTTPError
    # with response=None, chained from it
    import requests
    from modelscope.hub.errors import NotExistError

    try:
        raise NotExistError(f"File {file_name} not found", status_code=404)
    except NotExistError as e:
        raise requests.exceptions.HTTPError(str(e), response=getattr(e, "response", None)) from e


def test_download_fetches_todays_files_skips_complete_ones_and_explains_offline(tmp_path):
    calls = []
    fetch = _fake_remote({"sft_t2t_mini.jsonl", "r1_mix_1024.jsonl", "dpo.jsonl"}, calls)
    (tmp_path / "dpo.jsonl").write_text("complete\n")
    done = dp.download(["sft", "dpo", "r1_mix_1024.jsonl"], tmp_path, fetch=fetch)
    assert calls == ["sft_t2t_mini.jsonl", "r1_mix_1024.jsonl"]
    assert done == {"downloaded": ["sft_t2t_mini.jsonl", "r1_mix_1024.jsonl"], "skipped": ["dpo.jsonl"],
                    "fallback": {}}
    assert (tmp_path / "dpo.jsonl").read_text() == "complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dpo.jsonl", "r1_mix_1024.jsonl", "sft_t2t_mini.jsonl"]
    # any *.jsonl name goes to the remote as it is, known to our stages or not
    calls.clear()
    with pytest.raises(SystemExit, match=r"new_thing\.jsonl is not on gongjy/minimind_dataset.*download --list"):
        dp.download(["new_thing.jsonl"], tmp_path, fetch=fetch)
    assert calls == ["new_thing.jsonl"] and not (tmp_path / ".new_thing.jsonl.part").exists()
    with pytest.raises(SystemExit, match=r"stage lora: .*holds none of lora_medical\.jsonl.*download --list.*medical"):
        dp.download(["lora"], tmp_path, fetch=fetch)
    with pytest.raises(SystemExit, match="unknown stage or file 'sfft'.*download --list"):
        dp.download(["sfft"], tmp_path, fetch=fetch)

    from modelscope.hub.errors import NetworkError

    def offline(dataset_id, file_name, local_dir):
        local_dir.mkdir(parents=True)  # as a real download starts writing before it gives up
        raise NetworkError("Max retries exceeded")

    with pytest.raises(SystemExit, match=r"could not reach ModelScope.*lora_medical\.jsonl.*modelscope\.cn/datasets"):
        dp.download(["lora"], tmp_path, fetch=offline)
    assert not (tmp_path / "lora_medical.jsonl").exists() and not (tmp_path / ".lora_medical.jsonl.part").exists()
    # only "missing" falls back: another HTTP error (here 403) is not taken for a missing file
    import requests

    def forbidden(dataset_id, file_name, local_dir):
        raise requests.exceptions.HTTPError("403", response=type("R", (), {"status_code": 403})())

    with pytest.raises(requests.exceptions.HTTPError):
        dp.download(["pretrain"], tmp_path, fetch=forbidden)


def test_download_falls_back_to_the_seeds_name_when_todays_is_missing(tmp_path, capsys):
    calls = []
    fetch = _fake_remote({"sft_mini_512.jsonl", "sft_1024.jsonl", "dpo.jsonl"}, calls)
    done = dp.download(["sft", "kd", "dpo"], tmp_path, fetch=fetch)
    assert calls == ["sft_t2t_mini.jsonl", "sft_mini_512.jsonl", "sft_1024.jsonl", "dpo.jsonl"]  # asked once
    assert done == {"downloaded": ["sft_mini_512.jsonl", "sft_1024.jsonl", "dpo.jsonl"], "skipped": [],
                    "fallback": {"sft": "sft_mini_512.jsonl", "kd": "sft_1024.jsonl"}}
    out = capsys.readouterr().out
    assert "sft_t2t_mini.jsonl: not on gongjy/minimind_dataset; sft falls back to the older sft_mini_512.jsonl" in out
    assert "kd falls back to the older sft_1024.jsonl" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dpo.jsonl", "sft_1024.jsonl", "sft_mini_512.jsonl"]
    # a plain HTTP 404 (an HTTPError with its response) counts as missing too
    import requests

    def not_found(dataset_id, file_name, local_dir):
        if file_name == "pretrain_hq.jsonl":
            return _fake_remote({file_name}, calls)(dataset_id, file_name, local_dir)
        raise requests.exceptions.HTTPError("404", response=type("R", (), {"status_code": 404})())

    assert dp.download(["pretrain"], tmp_path, fetch=not_found)["fallback"] == {"pretrain": "pretrain_hq.jsonl"}


def test_download_recognises_the_missing_file_error_of_the_installed_modelscope(tmp_path, monkeypatch):
    """The real modelscope.hub.file_download.dataset_file_download, with the hub below it answering 404."""
    import modelscope_hub.api
    from modelscope_hub.errors import NotExistError

    def no_such_file(self, repo_id, **kwargs):
        raise NotExistError(f"File {kwargs['file_path']} not found", status_code=404)

    def no_endpoint(self, *args, **kwargs):
        raise RuntimeError("offline test")

    monkeypatch.setattr(modelscope_hub.api.HubApi, "download_file", no_such_file)
    monkeypatch.setattr(modelscope_hub.api.HubApi, "resolve_endpoint_for_read", no_endpoint)
    with pytest.raises(Exception) as raised:
        dp.modelscope_dataset_file(dp.DATASET_ID, "pretrain_t2t_mini.jsonl", tmp_path / ".part")
    assert dp.is_missing(raised.value) and not isinstance(raised.value, dp._network_errors())
    with pytest.raises(SystemExit) as stop:
        dp.download(["pretrain"], tmp_path)
    message = str(stop.value)
    assert "stage pretrain" in message and "pretrain_t2t_mini.jsonl, pretrain_hq.jsonl" in message
    assert "download --list" in message and "download NAME.jsonl" in message and "--data_path" in message
    assert list(tmp_path.iterdir()) == []


def test_download_skips_files_already_here_under_either_name(tmp_path, capsys):
    calls = []
    fetch = _fake_remote({"sft_t2t_mini.jsonl", "pretrain_t2t_mini.jsonl", "sft_1024.jsonl"}, calls)
    (tmp_path / "sft_mini_512.jsonl").write_text("the seed's sft file\n")
    (tmp_path / "pretrain_t2t_mini.jsonl").write_text("today's pretrain file\n")
    done = dp.download(["sft", "pretrain"], tmp_path, fetch=fetch)
    assert calls == [] and done["skipped"] == ["sft_mini_512.jsonl", "pretrain_t2t_mini.jsonl"]
    assert "sft_mini_512.jsonl: already complete (the older name; today's is sft_t2t_mini.jsonl)" in \
        capsys.readouterr().out
    assert (tmp_path / "sft_mini_512.jsonl").read_text() == "the seed's sft file\n"
    # a file fetched for one stage serves the next stage that takes it
    done = dp.download(["kd", "reason"], tmp_path / "b", fetch=fetch)
    assert calls == ["sft_t2t_mini.jsonl"] and done["downloaded"] == ["sft_t2t_mini.jsonl"]


def test_all_is_every_stage_but_the_full_ones(tmp_path):
    wants = dp.resolve_files(["all"])
    assert wants == [("pretrain", ("pretrain_t2t_mini.jsonl", "pretrain_hq.jsonl")),
                     ("sft", ("sft_t2t_mini.jsonl", "sft_mini_512.jsonl")),
                     ("kd", ("sft_t2t_mini.jsonl", "sft_1024.jsonl")),
                     ("dpo", ("dpo.jsonl",)),
                     ("reason", ("sft_t2t_mini.jsonl", "r1_mix_1024.jsonl")),
                     ("grpo/ppo", ("rlaif.jsonl",)),
                     ("agent", ("agent_rl.jsonl",)), ("agent", ("agent_rl_math.jsonl",)),
                     ("lora", ("lora_medical.jsonl",))]
    assert dp.resolve_files(["sft_full", "pretrain_full"]) == [("sft_full", ("sft_t2t.jsonl",)),
                                                               ("pretrain_full", ("pretrain_t2t.jsonl",))]
    assert dp.resolve_files(["dpo", "dpo.jsonl", "all"])[0] == ("dpo/dpo.jsonl", ("dpo.jsonl",))
    today = {"pretrain_t2t_mini.jsonl", "sft_t2t_mini.jsonl", "dpo.jsonl", "rlaif.jsonl", "agent_rl.jsonl",
             "agent_rl_math.jsonl", "lora_medical.jsonl"}
    calls = []
    done = dp.download(["all"], tmp_path, fetch=_fake_remote(today, calls))
    assert calls == ["pretrain_t2t_mini.jsonl", "sft_t2t_mini.jsonl", "dpo.jsonl", "rlaif.jsonl", "agent_rl.jsonl",
                     "agent_rl_math.jsonl", "lora_medical.jsonl"]
    assert done["downloaded"] == calls and done["fallback"] == {}
    assert "pretrain_full" in dp.build_parser()._subparsers._group_actions[0].choices["download"].format_help()


_REMOTE = [("README.md", 9_000), ("agent_rl.jsonl", 86 * 10**6), ("agent_rl_math.jsonl", 18 * 10**6),
           ("dpo.jsonl", 53 * 10**6), ("pretrain_t2t.jsonl", 10 * 10**9), ("pretrain_t2t_mini.jsonl", 12 * 10**8),
           ("rlaif.jsonl", 24 * 10**6), ("sft_t2t.jsonl", 14 * 10**9), ("sft_t2t_mini.jsonl", 16 * 10**8),
           ("images/logo.png", 1234)]


def test_download_list_shows_the_remote_with_the_stages_that_use_each_file(monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(dp, "modelscope_dataset_listing", lambda dataset_id: asked.append(dataset_id) or _REMOTE)
    result = dp.main(["download", "--list"])
    assert asked == ["gongjy/minimind_dataset"]
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["sft_t2t_mini.jsonl"].split(None, 1)[1] == "1.6 GB  sft, kd, reason"
    assert lines["pretrain_t2t_mini.jsonl"].endswith("pretrain")
    assert lines["pretrain_t2t.jsonl"].split(None, 1)[1] == "10.0 GB  pretrain_full"
    assert lines["rlaif.jsonl"].endswith("24.0 MB  grpo, ppo")
    assert lines["agent_rl_math.jsonl"].endswith("agent") and lines["README.md"].endswith("9.0 kB  -")
    assert lines["images/logo.png"].endswith("-")
    assert "pretrain_hq.jsonl (pretrain (fallback))" in lines["not"]  # "not on the remote: ..."
    assert "lora_medical.jsonl (lora)" in lines["not"]
    assert result["files"] == 10 and result["absent"] == ["pretrain_hq.jsonl", "sft_mini_512.jsonl",
                                                          "sft_1024.jsonl", "r1_mix_1024.jsonl",
                                                          "lora_medical.jsonl"]
    assert dp.stage_marks()["sft_1024.jsonl"] == ["kd (fallback)"]

    from modelscope.hub.errors import NetworkError

    def offline(dataset_id):
        raise NetworkError("Max retries exceeded")

    monkeypatch.setattr(dp, "modelscope_dataset_listing", offline)
    with pytest.raises(SystemExit, match=r"could not reach ModelScope.*file list.*modelscope\.cn/datasets"):
        dp.main(["download", "--list"])
    with pytest.raises(SystemExit, match="--list"):
        dp.main(["download"])


def test_tokenizer_is_fetched_checked_and_refused_when_unusable(tmp_path):
    def fake_fetch(model_id, files, local_dir):
        assert model_id == "gongjy/MiniMind2" and files == ["tokenizer.json", "tokenizer_config.json"]
        shutil.copytree(TOKENIZER_DIR, local_dir)
        return local_dir

    out = dp.get_tokenizer(tmp_path / "tok", fetch=fake_fetch)
    assert (out / "tokenizer.json").exists() and dp.check_tokenizer(out) == []

    def no_template(model_id, files, local_dir):
        fake_fetch(model_id, files, local_dir)
        for name in ("chat_template.jinja",):
            (local_dir / name).unlink(missing_ok=True)
        cfg = json.loads((local_dir / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (local_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
        return local_dir

    with pytest.raises(SystemExit, match="no chat template"):
        dp.get_tokenizer(tmp_path / "tok2", fetch=no_template)
    assert not (tmp_path / "tok2").exists()
