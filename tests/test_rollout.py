"""Issue 33 without a vLLM server: the rollout engine's refusals (bad URL, old or misconfigured server, another
tokenizer, a server that never answers, a start that fails), its importance correction, MiniMind's reward set and
remote-code reward model, SFT's system-prompt injection, PPO's mini-batches and KL early stop."""

import http.server
import json
import threading
import time
import types

import pytest
import torch
from helpers import ROOT, load_script, make_model, tiny_args, write_jsonl

from trainer import rollout
from trainer.agent import tool_count_reward
from trainer.rewards import (expand_rewards, length_reward, load_reward_model, repetition_penalty, think_closed_reward,
                             think_length_reward)
from trainer.rl import Rollouts, policy_loss

reason = load_script("6-reason.py")
rlhf = load_script("4-RLHF.py")
sft = load_script("2-sft.py")
DEMO = ROOT / "demo" / "data"


# ---------------------------------------------------------------------------------------------------------------------
# the vLLM engine's refusals, against fake servers

class FakeVLLM(http.server.ThreadingHTTPServer):
    """Answers like a vLLM server, with `answers` replacing some of its replies (a status code or JSON); `delay`
    seconds before every answer."""

    def __init__(self, tokenizer, answers=None, delay=0.0):
        self.tokenizer, self.answers, self.delay = tokenizer, answers or {}, delay
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        pass  # a client that gave up (the timeout test) closed the socket the answer was written to

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reply(self, path, body):
        path = path.split("?")[0].strip("/")
        if path in self.answers:
            return self.answers[path]
        if path == "tokenize":
            return {"tokens": self.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]}
        return {"version": {"version": "0.32.0"}, "is_paused": {"is_paused": False},
                "v1/models": {"data": [{"id": "policy"}]},
                "server_info": {"vllm_config": {"model_config": {"logprobs_mode": "processed_logprobs"}}}}[path]


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, body=None):
        time.sleep(self.server.delay)
        out = self.server.reply(self.path, body)
        if isinstance(out, int):
            self.send_error(out)
            return
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer()

    def do_POST(self):
        self.answer(json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}"))


def _engine(tokenizer, tmp_path, model="tiny", **overrides):
    args = reason.build_parser().parse_args(["--method", "grpo", "--rollout_engine", "vllm"])
    vars(args).update(overrides)
    return rollout.VLLMEngine(args, rollout.standalone(tokenizer, tmp_path), make_model(model))


@pytest.mark.parametrize("answers, error", [
    ({"version": {"version": "0.10.2"}}, r"version 0\.10\.2; the rollout engine needs vLLM >= 0\.32"),
    ({"is_paused": 404}, "VLLM_SERVER_DEV_MODE=1"),
    ({"v1/models": {"data": []}}, "serves no model"),
    ({"tokenize": {"tokens": [1, 2, 3]}}, "another tokenizer"),
    ({"server_info": {"vllm_config": {"logprobs_mode": "raw_logprobs"}}}, "--logprobs-mode processed_logprobs"),
])
def test_a_server_that_cannot_serve_the_rollouts_is_refused_with_what_to_do(tokenizer, tmp_path, answers, error):
    server = FakeVLLM(tokenizer, answers)
    with pytest.raises(SystemExit, match=error):
        _engine(tokenizer, tmp_path, rollout_url=server.url)
    server.shutdown()


def test_the_fake_server_passes_the_checks_so_the_refusals_above_are_each_its_own(tokenizer, tmp_path):
    server = FakeVLLM(tokenizer)
    assert _engine(tokenizer, tmp_path, rollout_url=server.url).model_name == "policy"
    server.shutdown()


def test_a_bad_url_or_a_server_that_never_answers_stops_the_run_instead_of_hanging(tokenizer, tmp_path):
    with pytest.raises(SystemExit, match=r"version failed .*is it running"):
        _engine(tokenizer, tmp_path, rollout_url="http://127.0.0.1:1")  # nothing listens on port 1
    server = FakeVLLM(tokenizer, delay=30)
    t0 = time.time()
    with pytest.raises(SystemExit, match="timed out"):
        _engine(tokenizer, tmp_path, rollout_url=server.url, rollout_timeout=1)
    assert time.time() - t0 < 10  # --rollout_timeout bounds every request, the checks' too
    server.shutdown()


@pytest.mark.e2e
def test_a_server_that_cannot_start_says_why_and_how_to_install_vllm(tokenizer, tmp_path):
    import sys

    with pytest.raises(SystemExit, match=r"exited with code 1 while starting; install vLLM with scripts/setup_vllm"):
        _engine(tokenizer, tmp_path, vllm_python=sys.executable)  # this environment has no vllm
    assert (tmp_path / "vllm_model" / "config.json").exists()  # the policy was exported for it
    with pytest.raises(SystemExit, match="shared experts"):
        _engine(tokenizer, tmp_path, model="tiny-moe")


# ---------------------------------------------------------------------------------------------------------------------
# the engine/trainer correction

def test_truncated_importance_weights_and_the_logged_gap_equal_hand_computations():
    ro = types.SimpleNamespace(args=types.SimpleNamespace(tis_cap=2.0))
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    engine = torch.tensor([[-1.5, -0.5, -3.0], [-1.0, -2.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    c = Rollouts.correction(ro, old, engine, mask)
    expected = torch.tensor([[0.5, -1.5, 0.0], [0.0, 1.0, 0.0]]).exp().clamp(max=2.0) * mask
    torch.testing.assert_close(c["tis"], expected)  # exp(0.5), exp(-1.5), 1 | 1, capped e -> 2, masked
    torch.testing.assert_close(c["gap"], torch.tensor([2.0 / 3, 0.5]))
    assert Rollouts.correction(ro, old, None, mask) == {"tis": None, "gap": None}  # the local engine: none
    ro.args.tis_cap = 0
    assert Rollouts.correction(ro, old, engine, mask)["tis"] is None  # --tis_cap 0: no correction, gap still logged


def test_importance_weights_scale_each_tokens_policy_term_and_leave_the_kl_alone():
    torch.manual_seed(0)
    logps, old, ref = (torch.randn(2, 3) for _ in range(3))
    adv, mask = torch.tensor([1.0, -0.5]), torch.ones(2, 3)
    w = torch.tensor([[2.0, 1.0, 0.5], [1.0, 1.0, 1.0]])
    for loss_type in ("grpo", "cispo"):
        plain, _, _ = policy_loss(logps, old, None, adv, mask, loss_type)
        weighted, _, _ = policy_loss(logps, old, None, adv, mask, loss_type, weights=w)
        with_kl, _, _ = policy_loss(logps, old, ref, adv, mask, loss_type, beta=0.1, weights=w)
        kl_only = policy_loss(logps, old, ref, torch.zeros(2), mask, loss_type, beta=0.1)[0]
        assert not torch.allclose(plain[0], weighted[0])
        torch.testing.assert_close(with_kl, weighted + kl_only)  # the KL term is not weighted
        torch.testing.assert_close(weighted[1], plain[1])  # row 1's weights are 1


# ---------------------------------------------------------------------------------------------------------------------
# MiniMind's reward set

def test_minimind_shaping_rewards_equal_their_rules():
    think = "<think>\n" + "想" * 25 + "\n</think>\n"
    assert length_reward("x" * 19) == -0.5 and length_reward("  " + "x" * 20 + "  ") == 0.5
    assert length_reward("x" * 801) == -0.5
    assert think_length_reward("no think block") == 0.0
    assert think_length_reward(think + "answer") == 1.0
    assert think_length_reward("<think>\nshort\n</think>\nanswer") == -0.5
    assert think_length_reward("<think>" + "a" * 301 + "</think>") == -0.5
    assert think_closed_reward("no block") == 0.0 and think_closed_reward(think + "ok") == 0.25
    assert think_closed_reward(think + "</think> again") == -0.25
    assert repetition_penalty("the cat sat on the mat") == 0.0
    # 12 trigrams of "a b c a b c a b c a b c a b": 3 distinct -> 11 repeated... capped at 0.5
    assert repetition_penalty("a b c " * 5) == -0.5
    # Chinese is counted per character: 我爱你我爱你 has trigrams 我爱你 爱你我 你我爱 我爱你: one repeat of 4
    assert repetition_penalty("我爱你我爱你") == pytest.approx(-0.5 * 2 * 1 / 4)
    assert repetition_penalty(think + "no repeats here at all") == 0.0  # the think block is not the answer
    assert expand_rewards("format, minimind") == ["format", "length", "think_length", "think_closed", "repetition"]


def test_grpo_runs_on_minimind_rewards_and_reports_each_one(tmp_path, start):
    summary = reason.main(tiny_args(tmp_path, DEMO / "reason_prompts.jsonl", "--method", "grpo", "--from", start,
                                    "--reward", "minimind", "--max_steps", 1, "--batch_size", 2,
                                    "--num_generations", 2, "--max_new_tokens", 8))
    m = summary["metric_history"][0][1]
    names = ("length", "think_length", "think_closed", "repetition")
    assert m["reward"] == pytest.approx(sum(m[f"reward_{n}"] for n in names), abs=1e-5)
    assert m["reward_length"] in (-0.5, 0.5) or -0.5 < m["reward_length"] < 0.5


def test_tool_count_reward_is_minimind_s_gap_rule():
    assert tool_count_reward(2, 0, ["a", "b"], 0.5) == 0.5
    assert tool_count_reward(1, 0, ["a", "b"], 0.5) == -0.5  # one call short
    assert tool_count_reward(2, 1, ["a", "b"], 0.5) == -0.5  # a failed call on top
    assert tool_count_reward(0, 0, ["a"], 0.5) == -0.5
    assert tool_count_reward(3, 0, "a", 0.5) == -1.0  # a single gt: one call expected


REMOTE_CONFIG = """from transformers import PretrainedConfig


class ToyRewardConfig(PretrainedConfig):
    model_type = "toy_reward"

    def __init__(self, scale=1.0, **kwargs):
        self.scale = scale
        super().__init__(**kwargs)
"""
REMOTE_MODEL = """import torch
from transformers import PreTrainedModel

from .configuration_toy import ToyRewardConfig


class ToyRewardModel(PreTrainedModel):
    config_class = ToyRewardConfig

    def __init__(self, config):
        super().__init__(config)
        self.w = torch.nn.Parameter(torch.tensor([config.scale]))
        self.post_init()

    def _init_weights(self, module):
        pass

    def get_score(self, tokenizer, conversation):
        # internlm2-reward's interface: a whole conversation in, one float out
        n = len(tokenizer(conversation[-1]["content"], add_special_tokens=False)["input_ids"])
        return float(self.w * n) - 2.0
"""


@pytest.fixture
def remote_reward_model(tmp_path, tokenizer):
    """A remote-code reward model of the internlm2-reward kind: its own classes via auto_map, get_score()."""
    folder = tmp_path / "toy_rm"
    folder.mkdir()
    (folder / "configuration_toy.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_toy.py").write_text(REMOTE_MODEL)
    config = {"model_type": "toy_reward", "scale": 0.5, "architectures": ["ToyRewardModel"],
              "auto_map": {"AutoConfig": "configuration_toy.ToyRewardConfig",
                           "AutoModel": "modeling_toy.ToyRewardModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([0.5])}, folder / "model.safetensors")
    tokenizer.save_pretrained(folder)
    return folder


def test_a_remote_code_reward_model_scores_with_get_score_clipped_and_only_with_trust_remote_code(
        remote_reward_model, tokenizer):
    with pytest.raises(SystemExit, match="--trust_remote_code"):
        load_reward_model(remote_reward_model)
    rm = load_reward_model(remote_reward_model, trust_remote_code=True, clip=3.0)
    prompt = [{"role": "user", "content": "hi"}]
    short, long = "ok", "a much longer reply " * 8
    n = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert rm.score([prompt], [short]) == [pytest.approx(0.5 * n(short) - 2.0)]
    assert rm.score([prompt], [long]) == [3.0]  # 0.5 x many tokens - 2, clipped like MiniMind
    # the reader's view: a think block is not scored
    assert rm.score([prompt], ["<think>\n" + "x " * 40 + "\n</think>\n" + short]) == rm.score([prompt], [short])


def test_grpo_trains_with_a_remote_code_reward_model(remote_reward_model, tmp_path, start):
    common = ("--method", "grpo", "--from", start, "--reward", "format", "--reward_model", remote_reward_model,
              "--max_steps", 1, "--batch_size", 2, "--num_generations", 2, "--max_new_tokens", 8)
    with pytest.raises(SystemExit, match="--trust_remote_code"):
        reason.main(tiny_args(tmp_path, DEMO / "reason_prompts.jsonl", *common))
    summary = reason.main(tiny_args(tmp_path, DEMO / "reason_prompts.jsonl", *common, "--trust_remote_code",
                                    "--reward_clip", 1.0))
    m = summary["metric_history"][0][1]
    assert -1.0 <= m["reward_model"] <= 1.0 and m["reward_model"] != 0.0


# ---------------------------------------------------------------------------------------------------------------------
# SFT's system-prompt injection

def test_system_prompts_are_injected_into_that_share_of_rows_and_never_trained(tmp_path, tokenizer):
    from dataset import SFTDataset
    from dataset.chat import SYSTEM_PROMPTS

    rows = [{"conversations": [{"role": "user", "content": f"question {i}"},
                               {"role": "assistant", "content": f"answer {i}"}]} for i in range(200)]
    rows[0]["conversations"].insert(0, {"role": "system", "content": "own system"})
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    data = SFTDataset(path, tokenizer, 128, system_prompt_ratio=0.3)
    again = SFTDataset(path, tokenizer, 128, system_prompt_ratio=0.3)
    plain = SFTDataset(path, tokenizer, 128)
    injected = [i for i in range(200) if data.messages(i)[0][0]["role"] == "system" and i > 0]
    assert 40 <= len(injected) <= 80  # ~30% of 199
    assert all(data.messages(i)[0][0]["content"] in SYSTEM_PROMPTS for i in injected)
    assert [again.messages(i) for i in range(20)] == [data.messages(i) for i in range(20)]  # a fixed pick per row
    assert data.messages(0)[0][0]["content"] == "own system"  # a chat with its own system message keeps it
    assert all(plain.messages(i)[0][0]["role"] == "user" for i in range(1, 200))  # off by default
    i = injected[0]
    item, base = data[i], plain[i]
    trained = tokenizer.decode(item["input_ids"][item["labels"] != -100])
    assert trained == tokenizer.decode(base["input_ids"][base["labels"] != -100])  # only the reply is trained
    assert len(item["input_ids"]) > len(base["input_ids"])


def test_sft_stage_takes_the_system_prompt_flag(tmp_path, start):
    summary = sft.main(tiny_args(tmp_path, DEMO / "sft.jsonl", "--from", start,
                                 "--max_steps", 1, "--batch_size", 2, "--system_prompt_ratio", 0.5))
    assert summary["steps"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# PPO's mini-batches and KL early stop



def _ppo(tmp_path, start, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    # the reward names the rollout: each prompt scores its question's length, so a step's mean reward says which
    # prompts it trained on
    (tmp_path / "which.py").write_text("def which(prompt, completion, reference):\n"
                                       "    return float(len(prompt[-1]['content']))\n")
    return rlhf.main(tiny_args(tmp_path, DEMO / "reason_prompts.jsonl", "--method", "ppo", "--from", start,
                               "--batch_size", 2, "--accumulation_steps", 2, "--max_new_tokens", 6,
                               "--reward", f"{tmp_path / 'which.py'}:which", "--learning_rate", 1e-2, *extra))


def test_ppo_mini_batches_take_a_step_per_part_and_kl_early_stop_skips_the_later_passes(tmp_path, start):
    """accumulation 2 x mini_batches 2 x ppo_epochs 2: 4 steps per rollout batch, the two parts alternating (each
    part's rewards repeat every other step). With a KL threshold every batch exceeds, each batch stops after its first
    pass: 2 steps per batch, so 4 steps see 2 batches."""
    full = _ppo(tmp_path / "full", start, "--mini_batches", 2, "--ppo_epochs", 2, "--max_steps", 4)
    r = [m["reward"] for _, m in full["metric_history"]]
    assert r[0] == r[2] and r[1] == r[3] and r[0] != r[1], r  # part 1, part 2, part 1, part 2 of one batch
    early = _ppo(tmp_path / "early", start, "--mini_batches", 2, "--ppo_epochs", 2, "--max_steps", 4,
                 "--early_stop_kl", 1e-12)
    e = [m["reward"] for _, m in early["metric_history"]]
    assert early["early_stops"] == 2 and e[:2] == r[:2] and e[2:] != r[2:], (e, r)  # a new batch after 2 steps
    never = _ppo(tmp_path / "never", start, "--mini_batches", 2, "--ppo_epochs", 2, "--max_steps", 4,
                 "--early_stop_kl", 1e6)
    assert never["early_stops"] == 0 and [m["reward"] for _, m in never["metric_history"]] == r
    with pytest.raises(SystemExit, match="must divide 2"):
        _ppo(tmp_path / "bad", start, "--mini_batches", 3, "--max_steps", 1)
