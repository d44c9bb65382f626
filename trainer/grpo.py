"""GRPO (6-reason.py --method grpo, arXiv 2402.03300) and its loss variants CISPO, Dr. GRPO and DAPO.

Per prompt it samples --num_generations replies through the inference core, scores each with the --reward functions
and/or a --reward_model (weighted sum), normalises the rewards within the group into advantages, and takes
--num_iterations optimizer steps on that batch with the --loss_type objective (rl.policy_loss) plus
--beta x KL(policy || reference), the reference being the frozen starting model. Log-probs are taken at the sampling
temperature.
"""


import torch

from dataset import PromptDataset, prompt_collate

from .rl import (LOSS_TYPES, Rollouts, add_reward_args, build_rewards, check_rewards, group_advantages, policy_loss,
                 refuse_held_out_loss, token_logps, unwrap)


DEFAULT_REWARD = "format,correctness"


def add_args(parser):
    g = parser.add_argument_group("grpo (--batch_size counts prompts; --from defaults to reason)")
    g.add_argument("--num_generations", type=int, default=8, help="replies sampled per prompt (the group, >= 2)")
    g.add_argument("--num_iterations", type=int, default=1,
                   help="mu: optimizer steps on each batch of rollouts (> 1: the ratio to the sampling policy leaves 1 "
                        "and the clip acts)")
    g.add_argument("--loss_type", choices=LOSS_TYPES, default="cispo",
                   help="cispo (MiniMind's default): clipped, detached importance weight on log p, token-level; grpo: "
                        "clipped surrogate, per-sequence mean; dr_grpo: sum / max_new_tokens, advantages not "
                        "divided by the group's std; dapo: token-level")
    g.add_argument("--max_new_tokens", type=int, default=256)
    g.add_argument("--max_prompt_len", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use it too)")
    g.add_argument("--beta", type=float, default=0.04, help="weight of KL(policy || reference); 0: no reference")
    g.add_argument("--clip_eps", type=float, default=0.2, help="clip of the ratio: [1 - eps, 1 + eps_high]")
    g.add_argument("--clip_eps_high", type=float, default=None, help="upper clip (DAPO's clip-higher; default clip_eps)")
    g.add_argument("--cispo_max", type=float, default=5.0, help="cispo: cap of the importance weight")
    g.add_argument("--thinking_ratio", type=float, default=None,
                   help="share of prompts rendered with thinking on (MiniMind's 0.9); default: the template's own")
    add_reward_args(g, default=DEFAULT_REWARD)


class GRPO(Rollouts):
    """The engine's prepare_window hook samples a window's rollouts (once per window of micro-batches) and keeps the
    sampling policy's and the reference's log-probs; loss_fn is the policy loss, taken --num_iterations times on them."""

    def __init__(self, args, trainer, policy, reference, rewards, weights, names):
        super().__init__(args, trainer, policy, rewards, weights, names,
                         token_level=args.loss_type in ("dapo", "cispo"))
        self.reference = reference

    @torch.no_grad()
    def rollout(self, batch) -> dict:
        G = self.args.num_generations
        prompt_ids = batch["prompt_ids"].repeat_interleave(G, 0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(G, 0)
        completion, mask, engine_logps = self.sample(prompt_ids, prompt_mask)
        scores = self.score(batch, completion, mask, group=G)
        input_ids = torch.cat([prompt_ids, completion], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        return self.finish(input_ids, attention_mask, mask, completion.size(1), scores, engine_logps)

    def finish(self, input_ids, attention_mask, mask, n, scores, engine_logps=None) -> dict:
        """The rollout's record: group advantages of the summed scores, and the log-probs of its last n tokens under
        the sampling policy (kept when later iterations need them as the ratio's denominator, or when another
        engine sampled: `recompute_old`) and the reference; with the engine's log-probs, the correction."""
        args = self.args
        with self.trainer.autocast:
            old = (token_logps(self.policy, input_ids, attention_mask, n, args.temperature)[0].float()
                   if self.recompute_old else None)
        ref = None
        if self.reference is not None:
            dev = next(self.reference.parameters()).device
            ref = token_logps(self.reference, input_ids.to(dev), attention_mask.to(dev), n,
                              args.temperature)[0].to(input_ids.device)
        reward = scores.sum(1)
        advantages = group_advantages(reward, args.num_generations, scale=args.loss_type != "dr_grpo")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mask": mask, "n_completion": n,
                "advantages": advantages, "reward": reward, "scores": scores, "old": old, "ref": ref,
                "n": len(input_ids), **self.correction(old, engine_logps, mask)}

    def loss(self, net, batch):
        args, r = self.args, batch["rollout"]
        scale = r["scale"]  # dapo / cispo: per token of the whole step
        logps, aux = token_logps(net, r["input_ids"], r["attention_mask"], r["n_completion"], args.temperature)
        old = r["old"] if r["old"] is not None else logps.detach()  # one iteration: the sampling policy is this one
        per_seq, kl, clipped = policy_loss(logps, old, r["ref"], r["advantages"], r["mask"], args.loss_type,
                                           args.clip_eps, args.clip_eps_high, args.cispo_max, args.beta,
                                           args.max_new_tokens, r["tis"])
        loss = per_seq.sum() * scale
        if aux is not None and unwrap(net).config.use_moe:  # the routers keep their balance loss in RL too
            loss = loss + aux * r["n"]
        metrics = {**self.reward_metrics(r), "kl": kl.sum().detach(), "clip_ratio": clipped.sum(),
                   "completion_tokens": r["mask"].sum()}
        if r["gap"] is not None:  # log p_trainer - log p_engine, mean |.| per reply
            metrics["engine_gap"] = r["gap"].sum()
        return loss, metrics


def prepare(trainer, args, model):
    """(reference model or None, prompt dataset): what GRPO and agentic RL both start from."""
    refuse_held_out_loss(args, "GRPO")
    if args.num_generations < 2:
        raise SystemExit(f"--num_generations {args.num_generations}: GRPO's advantage is a reply's reward minus its "
                         f"group's mean, so a group of one has none and no step would teach anything; use 2 or more")
    reference = None
    if args.beta > 0:
        reference = trainer.frozen_copy(model, args.ref_device)
    data = PromptDataset(args.data_path, trainer.tokenizer, args.max_prompt_len, strict=args.strict,
                         thinking_ratio=args.thinking_ratio, seed=args.seed)
    return reference, data


def fit(trainer, args, model, data, grpo):
    """The engine's loop with GRPO's hooks: rollouts sampled per window, --num_iterations steps on each."""
    summary = trainer.fit(model, data, collate_fn=trainer.collate(prompt_collate), loss_fn=grpo.loss,
                          count_fn=grpo.count, prepare_window=grpo.generate_and_score, curve="reward",
                          repeat=args.num_iterations)
    return grpo.summarize(summary)


def train(trainer, args):
    model = trainer.build_model()
    reference, data = prepare(trainer, args, model)
    rewards, weights, names = build_rewards(args, trainer)
    check_rewards(trainer, data, rewards, names)
    return fit(trainer, args, model, data, GRPO(args, trainer, model, reference, rewards, weights, names))
