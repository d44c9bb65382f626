"""Stage 6 -- the reasoning model: replies `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`.

--method sft (default): SFT on reasoning chats -- today's sft_t2t rows, whose replies carry `reasoning_content`
(rendered as <think>...</think>), or the seed's r1_mix_1024 rows with the tags in the content -- with the loss on the
tokens of the tags inside the replies weighted --tag_weight times (MiniMind's trick to make the format stick), found as whole strings so it is
right whatever the tokenizer does with the tags.
    python 6-reason.py --data_path dataset/sft_t2t_mini.jsonl
    torchrun --nproc_per_node 4 6-reason.py --data_path dataset/sft_t2t_mini.jsonl

--method grpo: online RL (GRPO, arXiv 2402.03300). Per prompt it samples --num_generations replies through the
inference core, scores each with the --reward functions and/or a --reward_model (weighted sum), normalises the rewards
within the group into advantages, and takes --num_iterations optimizer steps on that batch with the --loss_type
objective (cispo, grpo, dr_grpo, dapo; see policy_loss) plus --beta x KL(policy || reference), the reference being
the frozen starting model. Log-probs are taken at the sampling temperature. Rows: chats whose last assistant reply is
the reference answer (the seed's), rlaif.jsonl's prompt-only rows (no reference: only rewards that need none score,
and the run says which), or agent_rl rows with "gt".
    python 6-reason.py --method grpo --data_path dataset/rlaif.jsonl           # starts from out/reason
    python 6-reason.py --method grpo --reward format,my_rewards.py:length_penalty --num_iterations 2
    python 6-reason.py --method grpo --reward format --reward_model path/to/reward-model --reward_weights 0.5,1
A reward is any function (prompt, completion, reference) -> float (or the older (completion, reference)); see
dataset/rewards.py.
"""

import argparse
import copy
import time
from functools import partial

import torch

from dataset import PromptDataset, ReasonDataset, pad_collate, prompt_collate
from inference import Sampling, generate
from trainer import add_train_args, stage_main
from trainer.rl import (LOSS_TYPES, RolloutWindow, add_reward_args, build_rewards, check_rewards,  # noqa: F401
                        completion_mask, group_advantages, policy_loss, score_rewards, token_logps, unwrap)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, epochs=1, batch_size=8, learning_rate=1e-6, max_seq_len=1024,
                   data_path="dataset/sft_t2t_mini.jsonl", init_from="dpo")
    parser.add_argument("--method", choices=["sft", "grpo"], default="sft")
    parser.add_argument("--tag_weight", type=float, default=10.0, help="sft: loss weight of the tag tokens")
    g = parser.add_argument_group("grpo (--batch_size counts prompts; --from defaults to reason)")
    g.add_argument("--num_generations", type=int, default=8, help="replies sampled per prompt (the group, >= 2)")
    g.add_argument("--num_iterations", type=int, default=1,
                   help="mu: optimizer steps on each batch of rollouts (> 1: the ratio to the sampling policy leaves 1 "
                        "and the clip acts)")
    g.add_argument("--loss_type", choices=LOSS_TYPES, default="cispo",
                   help="cispo (MiniMind's default): clipped, detached importance weight on log p, token-level; grpo: "
                        "clipped surrogate, per-sequence mean; dr_grpo: sum / max_new_tokens; dapo: token-level")
    g.add_argument("--max_new_tokens", type=int, default=256)
    g.add_argument("--max_prompt_len", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use it too)")
    g.add_argument("--beta", type=float, default=0.04, help="weight of KL(policy || reference); 0: no reference")
    g.add_argument("--clip_eps", type=float, default=0.2, help="clip of the ratio: [1 - eps, 1 + eps_high]")
    g.add_argument("--clip_eps_high", type=float, default=None, help="upper clip (DAPO's clip-higher; default clip_eps)")
    g.add_argument("--cispo_max", type=float, default=5.0, help="cispo: cap of the importance weight")
    g.add_argument("--thinking_ratio", type=float, default=None,
                   help="share of prompts rendered with thinking on (MiniMind's 0.9); default: the template's own")
    add_reward_args(g, default="format,correctness")
    return parser


# ----------------------------------------------------------------------------------------------------------- GRPO

class GRPO:
    """The engine's count_fn samples a window's rollouts (once per window of micro-batches) and keeps the sampling
    policy's and the reference's log-probs; loss_fn is the policy loss, taken --num_iterations times on them."""

    def __init__(self, args, trainer, policy, reference, rewards, weights, reward_names):
        self.args, self.trainer, self.policy, self.reference = args, trainer, policy, reference
        self.rewards, self.weights, self.reward_names = rewards, weights, reward_names
        self.tokenizer = trainer.tokenizer
        self.sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        self.window = RolloutWindow(trainer, token_level=args.loss_type in ("dapo", "cispo"))
        self.rollout_tokens, self.rollout_seconds = 0, 0.0

    def count(self, batch):
        batch["rollout"] = self.rollout(batch)
        return self.window.add(batch["rollout"])

    @torch.no_grad()
    def rollout(self, batch) -> dict:
        args, G, tok = self.args, self.args.num_generations, self.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id
        prompt_ids = batch["prompt_ids"].repeat_interleave(G, 0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(G, 0)
        training = self.policy.training
        self.policy.eval()
        t0 = time.time()
        # rollouts through the inference core's decode loop (the one chat, server and evaluation use)
        completion = generate(self.policy, prompt_ids, prompt_mask, self.sampling, eos_id=eos, pad_id=pad)
        self.policy.train(training)
        mask = completion_mask(completion, eos)
        self.rollout_seconds += time.time() - t0
        self.rollout_tokens += int(mask.sum())
        texts = tok.batch_decode([c[:int(m.sum())] for c, m in zip(completion, mask)], skip_special_tokens=True)
        # a prompt that opened the think block: the reply is scored with that opening, as the chat shows it
        texts = [("<think>\n" if opened else "") + t
                 for t, opened in zip(texts, [o for o in batch["opened"] for _ in range(G)])]
        refs = [r if r is not None else gt for r, gt in zip(batch["references"], batch["gt"]) for _ in range(G)]
        prompts = [m for m in batch["messages"] for _ in range(G)]
        scores = score_rewards(self.rewards, self.weights, prompts, texts, refs).to(completion.device)
        reward = scores.sum(1)
        input_ids = torch.cat([prompt_ids, completion], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        n = completion.size(1)
        with self.trainer.autocast:
            # the sampling policy's log-probs: the ratio's denominator in every later iteration
            old = (token_logps(self.policy, input_ids, attention_mask, n, args.temperature)[0]
                   if args.num_iterations > 1 else None)
        ref = None
        if self.reference is not None:
            dev = next(self.reference.parameters()).device
            ref = token_logps(self.reference, input_ids.to(dev), attention_mask.to(dev), n,
                              args.temperature)[0].to(completion.device)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mask": mask, "n_completion": n,
                "advantages": group_advantages(reward, G), "reward": reward, "scores": scores, "old": old,
                "ref": ref, "n": len(texts)}

    def loss(self, net, batch):
        args, r = self.args, batch["rollout"]
        scale = self.window.scale(r)  # dapo / cispo: per token of the whole step
        logps, aux = token_logps(net, r["input_ids"], r["attention_mask"], r["n_completion"], args.temperature)
        old = r["old"] if r["old"] is not None else logps.detach()  # one iteration: the sampling policy is this one
        per_seq, kl, clipped = policy_loss(logps, old, r["ref"], r["advantages"], r["mask"], args.loss_type,
                                           args.clip_eps, args.clip_eps_high, args.cispo_max, args.beta,
                                           args.max_new_tokens)
        loss = per_seq.sum() * scale
        if aux is not None and unwrap(net).config.use_moe:  # the routers keep their balance loss in RL too
            loss = loss + aux * r["n"]
        metrics = {"reward": r["reward"].sum(), "kl": kl.sum().detach(), "clip_ratio": clipped.sum(),
                   "completion_tokens": r["mask"].sum()}
        for i, name in enumerate(self.reward_names):
            metrics[f"reward_{name}"] = r["scores"][:, i].sum()
        return loss, metrics


# ----------------------------------------------------------------------------------------------------------- run

def run(trainer, args):
    model = trainer.build_model()
    pad_id = trainer.tokenizer.pad_token_id or 0
    if args.method == "sft":
        data, held = trainer.split(lambda path: ReasonDataset(path, trainer.tokenizer, args.max_seq_len, args.tag_weight,
                                                              strict=args.strict, seed=args.seed,
                                                              empty_think_ratio=args.empty_think_ratio))
        # the rows carry "weights": the engine's lm_loss / count_label_tokens weight each label by them
        return trainer.fit(model, data, collate_fn=partial(pad_collate, pad_id=pad_id), eval_dataset=held)
    if args.eval_data or args.eval_split:
        raise SystemExit("--eval_data / --eval_split: GRPO has no held-out loss (its rollouts are sampled); "
                         "score held-out prompts with scripts/eval_tools.py or the demo metrics instead")
    if args.num_generations < 2:
        raise SystemExit(f"--num_generations {args.num_generations}: GRPO's advantage is a reply's reward minus its "
                         f"group's mean, so a group of one has none and no step would teach anything; use 2 or more")
    rewards, weights, names = build_rewards(args, trainer)
    reference = None
    if args.beta > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False).to(args.ref_device or trainer.device)
    data = PromptDataset(args.data_path, trainer.tokenizer, args.max_prompt_len, strict=args.strict,
                         thinking_ratio=args.thinking_ratio, seed=args.seed)
    check_rewards(trainer, data, rewards, names)
    grpo = GRPO(args, trainer, model, reference, rewards, weights, names)
    summary = trainer.fit(model, data, collate_fn=partial(prompt_collate, pad_id=pad_id), loss_fn=grpo.loss,
                          count_fn=grpo.count, curve="reward", repeat=args.num_iterations)
    summary["rollout_tokens_per_s"] = grpo.rollout_tokens / max(grpo.rollout_seconds, 1e-9)
    trainer.log(f"rollouts: {grpo.rollout_tokens:,} tokens in {grpo.rollout_seconds:.1f} s "
                f"({summary['rollout_tokens_per_s']:,.0f} tokens/s)")
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.method == "grpo":  # GRPO starts from the reasoning model and reads prompts, unless told otherwise
        defaults = build_parser().parse_args([])
        if args.init_from == defaults.init_from:
            args.init_from = "reason"
        if args.data_path == defaults.data_path:
            args.data_path = "dataset/rlaif.jsonl"
    return stage_main("grpo" if args.method == "grpo" else "reason", build_parser, run, args)


if __name__ == "__main__":
    main()
