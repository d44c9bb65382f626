"""Stage 6 -- the reasoning model: replies `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`.

--method sft (default): SFT on reasoning chats -- today's sft_t2t rows, whose replies carry `reasoning_content`
(rendered as <think>...</think>), or the seed's r1_mix_1024 rows with the tags in the content -- with the loss on the
tokens of the tags inside the replies weighted --tag_weight times (MiniMind's trick to make the format stick), found as whole strings so it is
right whatever the tokenizer does with the tags.
    python 6-reason.py --data_path dataset/sft_t2t_mini.jsonl
    torchrun --nproc_per_node 4 6-reason.py --data_path dataset/sft_t2t_mini.jsonl

--method grpo: online RL with rule rewards (GRPO, arXiv 2402.03300). Per prompt it samples --num_generations
replies with the KV cache, scores each with the --reward functions (summed), normalises the rewards within the
group into advantages, and maximises the clipped ratio objective minus --beta x KL(policy || reference), where the
reference is the frozen starting model. Rows: chats whose last assistant reply is the reference answer (the seed's),
rlaif.jsonl's prompt-only rows (no reference: only rewards that need none score), or agent_rl rows with "gt".
    python 6-reason.py --method grpo --data_path dataset/rlaif.jsonl           # starts from out/reason
    python 6-reason.py --method grpo --reward format,my_rewards.py:length_penalty
A reward is any function (completion: str, reference: str) -> float; see dataset/rewards.py.
"""

import argparse
import copy
from functools import partial

import torch
import torch.nn.functional as F

from dataset import PromptDataset, ReasonDataset, pad_collate, prompt_collate
from dataset.rewards import load_reward
from inference import Sampling, generate
from trainer import add_train_args, stage_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, epochs=1, batch_size=8, learning_rate=1e-6, max_seq_len=1024,
                   data_path="dataset/sft_t2t_mini.jsonl", init_from="dpo")
    parser.add_argument("--method", choices=["sft", "grpo"], default="sft")
    parser.add_argument("--tag_weight", type=float, default=10.0, help="sft: loss weight of the tag tokens")
    g = parser.add_argument_group("grpo (--batch_size counts prompts; --from defaults to reason)")
    g.add_argument("--num_generations", type=int, default=8, help="replies sampled per prompt (the group)")
    g.add_argument("--max_new_tokens", type=int, default=256)
    g.add_argument("--max_prompt_len", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--beta", type=float, default=0.04, help="weight of KL(policy || reference)")
    g.add_argument("--clip_eps", type=float, default=0.2, help="PPO-style clip of the policy ratio")
    g.add_argument("--reward", default="format,correctness",
                   help="comma-separated rewards, summed: builtin names, module:function or file.py:function")
    return parser


# ----------------------------------------------------------------------------------------------------------- GRPO

def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps: float, beta: float):
    """Per-sequence GRPO loss and KL: each token's -min(r·A, clip(r, 1±eps)·A) + beta·KL, where r = p/p_old and KL
    is the k3 estimate exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0), averaged over the sequence's tokens.
    logps, old_logps, ref_logps, mask: (N, T); advantages: (N,)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    delta = ref_logps - logps
    kl = torch.exp(delta) - delta - 1
    per_token = -surrogate + beta * kl
    n = mask.sum(1).clamp(min=1)
    return (per_token * mask).sum(1) / n, (kl * mask).sum(1) / n


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(reward - group mean) / (group std + 1e-4): a group where every reply scores the same teaches nothing."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including each row's first eos (what the reply is), 0 after it (padding)."""
    is_eos = completion == eos_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_eos).float()


def token_logps(model, input_ids, attention_mask, n_completion: int) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -n_completion - 1:-1].float()
    return torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, -n_completion:, None]).squeeze(2)


def unwrap(net):
    net = getattr(net, "_orig_mod", net)  # torch.compile
    return getattr(net, "module", net)  # DDP


def make_grpo_loss(args, tokenizer, reference, rewards):
    G, eos, pad = args.num_generations, tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature)

    def loss_fn(net, batch):
        policy = unwrap(net)
        prompt_ids = batch["prompt_ids"].repeat_interleave(G, 0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(G, 0)
        with torch.no_grad():
            training = policy.training
            policy.eval()
            # rollouts through the inference core's decode loop (the one chat, server and evaluation use)
            completion = generate(policy, prompt_ids, prompt_mask, sampling, eos_id=eos, pad_id=pad)
            policy.train(training)
        mask = completion_mask(completion, eos)
        texts = tokenizer.batch_decode([c[:int(m.sum())] for c, m in zip(completion, mask)],
                                       skip_special_tokens=True)
        refs = [r if r is not None else gt for r, gt in zip(batch["references"], batch["gt"]) for _ in range(G)]
        scores = torch.tensor([[fn(t, ref) for fn in rewards] for t, ref in zip(texts, refs)],
                              dtype=torch.float32, device=completion.device)
        reward = scores.sum(1)
        advantages = group_advantages(reward, G)

        input_ids = torch.cat([prompt_ids, completion], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        logps = token_logps(net, input_ids, attention_mask, completion.size(1))
        with torch.no_grad():
            ref_logps = (token_logps(reference, input_ids, attention_mask, completion.size(1))
                         if reference is not None else logps.detach())
        # one update per batch of samples, so the sampling policy is this one: ratio 1, gradient A·∇log p
        per_seq, kl = grpo_loss(logps, logps.detach(), ref_logps, advantages, mask, args.clip_eps, args.beta)
        metrics = {"reward": reward.sum(), "kl": kl.sum().detach(), "completion_tokens": mask.sum()}
        for i, spec in enumerate(args.reward.split(",")):
            metrics[f"reward_{spec.rsplit(':', 1)[-1]}"] = scores[:, i].sum()
        return per_seq.sum(), metrics

    return loss_fn


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
    rewards = [load_reward(spec.strip()) for spec in args.reward.split(",") if spec.strip()]
    reference = copy.deepcopy(model).eval().requires_grad_(False) if args.beta > 0 else None
    data = PromptDataset(args.data_path, trainer.tokenizer, args.max_prompt_len, strict=args.strict)
    return trainer.fit(model, data, collate_fn=partial(prompt_collate, pad_id=pad_id),
                       loss_fn=make_grpo_loss(args, trainer.tokenizer, reference, rewards),
                       count_fn=lambda batch: len(batch["references"]) * args.num_generations, curve="reward")


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
