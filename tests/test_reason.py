"""Stage 6, 6-reason.py: tag weights sit exactly on the tags inside replies (whatever the tokenizer does with them),
the weighted loss is the SFT loss when the weight is 1, GRPO's loss and advantages match hand-computed values, rewards
load by name or path, and GRPO raises the held-out reward."""

import math

import pytest
import torch
from helpers import ROOT, held_out_mean_reward, load_script, make_model, max_weight_diff, tiny_args, write_jsonl
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dataset import REASON_TAGS, PromptDataset, ReasonDataset, SFTDataset, pad_collate, prompt_collate, read_jsonl
from trainer.rewards import load_reward
from trainer import count_label_tokens, lm_loss, rl

reason = load_script("6-reason.py")
pretrain = load_script("1-pretrain.py")
DEMO = ROOT / "demo" / "data"

REPLY = "<think>\n3加4等于7。\n</think>\n<answer>\n7\n</answer>"
ROWS = [{"conversations": [
    {"role": "system", "content": "Answer with <think> and <answer> tags."},  # tags outside a reply: weight 0
    {"role": "user", "content": "3加4等于几？ use <think> please"},
    {"role": "assistant", "content": REPLY}]}]


def weighted_text(tokenizer, item, weight):
    return tokenizer.decode(item["input_ids"][item["weights"] == weight])


def piecewise_tokenizer(tmp_path, template):
    """A byte-level BPE that knows nothing of the tags: <think> comes out as several pieces (MiniMind's case)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    tok.train_from_iterator(["plain words and 3加4等于7 and think answer"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = template
    return fast


@pytest.mark.parametrize("kind", ["ours", "pieces"])
def test_tag_weight_is_exactly_on_the_tags_inside_replies(tmp_path, tokenizer, kind):
    tok = tokenizer if kind == "ours" else piecewise_tokenizer(tmp_path, tokenizer.chat_template)
    data = ReasonDataset(write_jsonl(tmp_path / "r.jsonl", ROWS), tok, max_seq_len=512, tag_weight=10)
    item = data[0]
    tagged = [int(t) for t, w in zip(item["input_ids"], item["weights"]) if w == 10]
    n_tag_tokens = sum(len(tok(tag, add_special_tokens=False)["input_ids"]) for tag in REASON_TAGS)
    if kind == "ours":
        assert len(tagged) == 4  # each tag is one token
    else:
        assert len(tagged) >= n_tag_tokens > 4  # each tag is several pieces, all weighted
    assert weighted_text(tok, item, 10).replace("\n", "") == "".join(REASON_TAGS)
    # weight 1 on the rest of the reply and its <|im_end|>, 0 on the system/user turns (which also say "<think>")
    labels = item["labels"]
    assert ((labels != -100) == (item["weights"] > 0)).all()
    assert weighted_text(tok, item, 1.0).replace("\n", "") == "3加4等于7。7<|im_end|>"
    assert len(tok.decode(item["input_ids"][item["weights"] == 0])) > len("Answer with <think> and <answer> tags.")


def test_weighted_loss_with_weight_1_is_the_sft_loss_and_weights_count_in_the_mean(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "r.jsonl", ROWS * 2)
    model = make_model("tiny")
    plain = pad_collate([SFTDataset(path, tokenizer)[0], SFTDataset(path, tokenizer)[1]])
    ones = pad_collate([ReasonDataset(path, tokenizer, tag_weight=1)[i] for i in range(2)])
    tens = pad_collate([ReasonDataset(path, tokenizer, tag_weight=10)[i] for i in range(2)])
    with torch.no_grad():
        sft_sum, _ = lm_loss(model, plain)
        one_sum, _ = lm_loss(model, ones)
        ten_sum, _ = lm_loss(model, tens)
        ce = torch.nn.functional.cross_entropy(model(tens["input_ids"]).logits[:, :-1].transpose(1, 2),
                                               tens["labels"][:, 1:], reduction="none")
    torch.testing.assert_close(one_sum, sft_sum)
    assert count_label_tokens(ones) == (plain["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(ten_sum, (ce * tens["weights"][:, 1:]).sum())
    assert count_label_tokens(tens) == count_label_tokens(ones) + 9 * 4 * 2  # 4 tags x 2 rows, 9 extra each


# ---------------------------------------------------------------------------------------------------------- GRPO

LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, -1.0]])
OLD = torch.tensor([[-1.2, -2.0, -0.5], [-0.2, -2.0, -1.0]])
REF = torch.tensor([[-1.0, -1.5, -9.0], [-0.1, -3.0, -1.0]])
ADV = torch.tensor([1.0, -0.5])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0's third token is after its eos


def k3(lp, rf):
    return math.exp(rf - lp) - (rf - lp) - 1


def test_clipped_losses_equal_hand_computed_values():
    loss, kl, clipped = rl.policy_loss(LOGPS, OLD, REF, ADV, MASK, "grpo", clip_eps=0.2, beta=0.1)
    # row 0: ratios e^0.2 = 1.2214 (clipped to 1.2 for A > 0), e^0 = 1
    r0 = [-min(math.exp(0.2) * 1, 1.2 * 1) + 0.1 * k3(-1.0, -1.0), -1.0 + 0.1 * k3(-2.0, -1.5)]
    # row 1: ratios 1, e^-1 = 0.3679 (A < 0: min(-0.5 r, -0.5 clip(r)) = -0.5 * 0.8 = -0.4 -> loss 0.4), 1
    r1 = [0.5 + 0.1 * k3(-0.2, -0.1), -min(math.exp(-1) * -0.5, 0.8 * -0.5) + 0.1 * k3(-3.0, -3.0),
          0.5 + 0.1 * k3(-1.0, -1.0)]
    torch.testing.assert_close(loss, torch.tensor([sum(r0) / 2, sum(r1) / 3]))  # grpo: each sequence's mean
    torch.testing.assert_close(kl, torch.tensor([(k3(-1, -1) + k3(-2, -1.5)) / 2, k3(-0.2, -0.1) / 3]))
    torch.testing.assert_close(clipped, torch.tensor([1 / 2, 1 / 3]))
    dr, _, _ = rl.policy_loss(LOGPS, OLD, REF, ADV, MASK, "dr_grpo", clip_eps=0.2, beta=0.1, max_new_tokens=8)
    torch.testing.assert_close(dr, torch.tensor([sum(r0) / 8, sum(r1) / 8]))  # a constant divisor: no length bias
    # dapo: token sums (the caller divides by the batch's tokens) and clip-higher: 1.2214 < 1 + 0.28 is not clipped
    dapo, _, clipped = rl.policy_loss(LOGPS, OLD, REF, ADV, MASK, "dapo", clip_eps=0.2, clip_eps_high=0.28,
                                          beta=0.1)
    torch.testing.assert_close(dapo, torch.tensor([sum(r0) + 1.2 - math.exp(0.2), sum(r1)]))
    torch.testing.assert_close(clipped, torch.tensor([0.0, 1 / 3]))


def test_cispo_clips_the_detached_weight_and_keeps_every_tokens_gradient():
    logps = LOGPS.clone().requires_grad_()
    loss, _, clipped = rl.policy_loss(logps, OLD, REF, ADV, MASK, "cispo", cispo_max=1.1, beta=0.1)
    w = [[min(math.exp(0.2), 1.1), 1.0], [1.0, math.exp(-1), 1.0]]  # row 0 token 0: e^0.2 = 1.22 capped at 1.1
    lp = LOGPS.tolist()
    r0 = [-w[0][0] * 1.0 * lp[0][0] + 0.1 * k3(-1.0, -1.0), -w[0][1] * 1.0 * lp[0][1] + 0.1 * k3(-2.0, -1.5)]
    r1 = [-w[1][j] * -0.5 * lp[1][j] + 0.1 * k3(lp[1][j], REF[1, j].item()) for j in range(3)]
    torch.testing.assert_close(loss, torch.tensor([sum(r0), sum(r1)]))  # token sums: cispo is token-level
    torch.testing.assert_close(clipped, torch.tensor([1 / 2, 0.0]))
    loss.sum().backward()
    # d/dlogp = -w·A + beta·(1 - exp(ref - logp)): the capped token still learns (at weight 1.1), unlike a PPO clip
    expected = [[-w[0][0] + 0.1 * (1 - math.exp(0.0)), -1.0 + 0.1 * (1 - math.exp(0.5)), 0.0],
                [-w[1][j] * -0.5 + 0.1 * (1 - math.exp(REF[1, j].item() - lp[1][j])) for j in range(3)]]
    torch.testing.assert_close(logps.grad, torch.tensor(expected))


def test_log_probs_are_taken_at_the_sampling_temperature():
    model = make_model("tiny", seed=3)
    ids = torch.randint(3, 6400, (2, 12))
    mask = torch.ones_like(ids)
    logps, _ = rl.token_logps(model, ids, mask, 5, temperature=0.7)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -6:-1].float() / 0.7
    torch.testing.assert_close(logps.detach(), torch.log_softmax(logits, -1).gather(2, ids[:, -5:, None]).squeeze(2))


def test_group_advantages_and_completion_mask():
    adv = rl.group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0]), group=4)
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std()
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (std + 1e-4))
    assert adv[4:].abs().max() == 0  # every reply scored the same: no signal
    unscaled = rl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 1.0, 1.0]), group=4, scale=False)
    assert unscaled.tolist() == [0.75, -0.25, -0.25, -0.25, 1.5, -0.5, -0.5, -0.5]  # Dr. GRPO: no std division
    mask = rl.completion_mask(torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 0, 0]]), eos_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_rewards_load_by_name_module_or_file(tmp_path):
    good = "<think>\n1加2等于3。\n</think>\n<answer>\n3\n</answer>"
    assert load_reward("format")(good, "<answer>3</answer>") == 1.0
    assert load_reward("correctness")(good, "<answer>3</answer>") == 1.0
    assert load_reward("correctness")(good, "<answer>4</answer>") == 0.0
    assert load_reward("trainer.rewards:correctness_reward")(good, "3") == 1.0
    (tmp_path / "mine.py").write_text("def short(completion, reference):\n    return -len(completion) / 100\n")
    assert load_reward(f"{tmp_path / 'mine.py'}:short")("abcd", None) == pytest.approx(-0.04)
    with pytest.raises(ValueError, match="unknown reward 'fromat'"):
        load_reward("fromat")
    with pytest.raises(ValueError, match="no function 'nope'"):
        load_reward(f"{tmp_path / 'mine.py'}:nope")


def test_prompts_are_left_padded_and_end_with_the_generation_prompt(tmp_path, tokenizer):
    rows = read_jsonl(DEMO / "reason_prompts.jsonl")[:2]
    data = PromptDataset(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer)
    batch = prompt_collate([data[0], data[1]], pad_id=tokenizer.pad_token_id)
    assert batch["references"] == [r["conversations"][-1]["content"] for r in rows]
    for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"]):
        text = tokenizer.decode(ids[mask.bool()])
        assert text.endswith("<|im_start|>assistant\n") and "<think>" not in text
        assert mask.tolist() == sorted(mask.tolist())  # zeros (padding) first


@pytest.mark.slow
def test_grpo_raises_the_mean_reward_on_held_out_prompts(tmp_path, tokenizer):
    """GRPO optimises whatever reward it is given: here a plug-in reward from a file (the share of digits in the
    reply), measured on held-out prompts by sampling with a fixed seed before and after."""
    (tmp_path / "digits.py").write_text(
        "def share(completion, reference):\n"
        "    return sum(c.isdigit() for c in completion) / max(len(completion), 1)\n")
    reward = load_reward(f"{tmp_path / 'digits.py'}:share")
    pretrain.main(tiny_args(tmp_path, DEMO / "pretrain_eval.jsonl", "--max_steps", 1, "--max_seq_len", 32,
                            "--batch_size", 2))
    reason.main(tiny_args(tmp_path, DEMO / "reason.jsonl", "--from", tmp_path / "out/pretrain", "--max_steps", 20,
                          "--batch_size", 8, "--learning_rate", 1e-2, "--max_seq_len", 160))
    def mean_reward(path):
        return held_out_mean_reward(path, tokenizer, reward)

    before = mean_reward(tmp_path / "out/reason")
    summary = reason.main(tiny_args(tmp_path, DEMO / "reason_prompts.jsonl", "--method", "grpo", "--max_steps", 12,
                                    "--batch_size", 4, "--num_generations", 4, "--max_new_tokens", 32,
                                    "--learning_rate", 5e-3, "--reward", f"{tmp_path / 'digits.py'}:share",
                                    "--log_interval", 3))
    after = mean_reward(tmp_path / "out/grpo")
    assert after >= before + 0.1, (before, after)
    rewards = [m["reward"] for _, m in summary["metric_history"]]
    assert rewards[-1] > rewards[0], rewards
    assert (tmp_path / "images" / "grpo_reward.png").exists()


def test_grpo_resumed_mid_run_samples_and_ends_exactly_like_an_uninterrupted_run(tmp_path):
    """GRPO samples its rollouts from the global RNG: stopped at step 2 and resumed, every step's reward and the
    final weights equal the uninterrupted run's (nothing may draw from that RNG in between)."""
    pretrain.main(tiny_args(tmp_path / "init", DEMO / "pretrain_eval.jsonl", "--max_steps", 1, "--max_seq_len", 32,
                            "--batch_size", 2))
    common = ("--method", "grpo", "--from", tmp_path / "init/out/pretrain", "--max_steps", 4, "--batch_size", 2,
              "--num_generations", 2, "--max_new_tokens", 8, "--learning_rate", 1e-2, "--save_interval", 100)
    full = reason.main(tiny_args(tmp_path / "a", DEMO / "reason_prompts.jsonl", *common))
    reason.main(tiny_args(tmp_path / "b", DEMO / "reason_prompts.jsonl", *common, "--stop_at_step", 2))
    resumed = reason.main(tiny_args(tmp_path / "b", DEMO / "reason_prompts.jsonl", *common, "--resume"))
    assert [m for _, m in resumed["metric_history"]] == [m for _, m in full["metric_history"]]
    assert max_weight_diff(tmp_path / "a/out/grpo", tmp_path / "b/out/grpo") == 0.0
