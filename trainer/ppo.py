"""PPO (4-RLHF.py --method ppo) on prompts (rlaif.jsonl, or rows with a reference / "gt"), with a value model.

Per prompt one reply is sampled through the inference core and scored (rule rewards and/or a reward model). Each
token's reward is -kl_coef x (log pi - log ref), plus the score on the last token; a value model (a value head on a
copy of the policy, or on --critic CHECKPOINT) gives V, GAE gives advantages (whitened) and returns, and --ppo_epochs
optimizer steps on the batch minimise the clipped policy loss + vf_coef x the clipped value loss (Ouyang et al.
2022; Schulman et al. 2017). The value model is saved beside the policy (critic.safetensors).
"""

import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from common.resolve import resolve_checkpoint
from dataset import PromptDataset, prompt_collate
from model.families import load_pretrained

from .checkpoint import save_pretrained_atomic
from .engine import param_groups
from .rl import (Rollouts, add_reward_args, build_rewards, check_rewards, gae, refuse_held_out_loss, token_logps,
                 whiten)


def add_args(parser):
    g = parser.add_argument_group("ppo (--batch_size counts prompts; --data_path defaults to dataset/rlaif.jsonl)")
    g.add_argument("--ppo_epochs", type=int, default=4, help="passes over each batch of rollouts")
    g.add_argument("--mini_batches", type=int, default=1,
                   help="optimizer steps per pass, each on an equal part of the rollout batch (must divide "
                        "--accumulation_steps)")
    g.add_argument("--early_stop_kl", type=float, default=0.0,
                   help="skip a rollout batch's remaining passes once the policy's mean KL from the one that sampled "
                        "it exceeds this (MiniMind's 0.25; 0: off)")
    g.add_argument("--clip_eps", type=float, default=0.2, help="clip of the policy ratio")
    g.add_argument("--vf_clip", type=float, default=0.2, help="clip of the value change from the rollout's values")
    g.add_argument("--vf_coef", type=float, default=0.1, help="weight of the value loss")
    g.add_argument("--kl_coef", type=float, default=0.05, help="per-token KL penalty in the reward")
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    g.add_argument("--critic", default="copy",
                   help="value model: copy (a value head on a copy of the policy) or a checkpoint for its body")
    g.add_argument("--critic_lr_scale", type=float, default=1.0, help="the value model's lr / --learning_rate")
    g.add_argument("--max_new_tokens", type=int, default=256)
    g.add_argument("--max_prompt_len", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use it too)")
    g.add_argument("--thinking_ratio", type=float, default=None, help="share of prompts with thinking on")
    add_reward_args(g, default="format,correctness")


class ValueModel(nn.Module):
    """V(s) at every position: a decoder body and a linear value head (zero at the start)."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.v_head = nn.Linear(body.config.hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask=None):
        hidden, aux = self.body(input_ids, attention_mask)
        return self.v_head(hidden).squeeze(-1).float(), aux


class ActorCritic(nn.Module):
    """Policy and value model as one module: one forward (so DDP syncs both), one optimizer (the value model's
    groups scaled by --critic_lr_scale)."""

    def __init__(self, policy, critic, critic_lr_scale: float = 1.0):
        super().__init__()
        self.policy, self.critic, self.critic_lr_scale = policy, critic, critic_lr_scale

    def forward(self, input_ids, attention_mask, n_completion: int, temperature: float):
        """(log-probs of the last n_completion tokens at the temperature, the values of the states they are sampled
        in, the MoE balance losses)."""
        logps, aux = token_logps(self.policy, input_ids, attention_mask, n_completion, temperature)
        values, critic_aux = self.critic(input_ids, attention_mask)
        aux = sum(a for a, m in ((aux, self.policy), (critic_aux, self.critic.body)) if m.config.use_moe)
        return logps, values[:, -n_completion - 1:-1], aux

    def activation_checkpointing_enable(self, **kwargs):  # --grad_checkpoint: both bodies recompute their blocks
        self.policy.activation_checkpointing_enable(**kwargs)
        self.critic.body.activation_checkpointing_enable(**kwargs)

    def param_groups(self, weight_decay):
        critic = param_groups(self.critic, weight_decay)
        for group in critic:
            group["lr_scale"] = self.critic_lr_scale
        return param_groups(self.policy, weight_decay) + critic


def ppo_losses(logps, values, rollout, clip_eps: float, vf_clip: float):
    """Per-token clipped policy loss -min(r A, clip(r) A) and clipped value loss 0.5 max((V - R)^2,
    (V_old + clip(V - V_old) - R)^2), and which tokens the policy clip bound."""
    adv, returns, old_values = rollout["advantages"], rollout["returns"], rollout["values"]
    ratio = torch.exp(logps - rollout["old"])
    pg = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    clipped_values = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    vf = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return pg, vf, clipped


class PPO(Rollouts):
    """prepare_window samples one reply per prompt and computes the advantages (once per window); loss_fn is the PPO
    loss, taken --ppo_epochs times on it."""

    def __init__(self, args, trainer, actor_critic, reference, rewards, weights, names):
        super().__init__(args, trainer, actor_critic.policy, rewards, weights, names, token_level=True)
        self.ac, self.reference = actor_critic, reference
        self.mini_batches = args.mini_batches
        self.drift = torch.zeros(2, device=trainer.device)  # this pass's summed KL estimates and its tokens
        self.early_stops = 0

    @torch.no_grad()
    def rollout(self, batch) -> dict:
        args = self.args
        completion, mask, engine_logps = self.sample(batch["prompt_ids"], batch["prompt_mask"])
        scores = self.score(batch, completion, mask)
        input_ids = torch.cat([batch["prompt_ids"], completion], 1)
        attention_mask = torch.cat([batch["prompt_mask"], mask.long()], 1)
        n = completion.size(1)
        with self.trainer.autocast:
            old, values, _ = self.ac(input_ids, attention_mask, n, args.temperature)
            dev = next(self.reference.parameters()).device
            ref = token_logps(self.reference, input_ids.to(dev), attention_mask.to(dev), n,
                              args.temperature)[0].to(completion.device)
        old, values = old.float(), values.float() * mask
        # per-token reward: the KL penalty everywhere, the reply's score on its last token
        kl = (old - ref) * mask
        token_rewards = -args.kl_coef * kl
        last = (mask.sum(1).long() - 1).clamp(min=0)
        token_rewards[torch.arange(len(scores)), last] += scores.sum(1)
        advantages, returns = gae(token_rewards, values, mask, args.gamma, args.lam)
        delta = ref - old
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mask": mask, "n_completion": n,
                "old": old, "values": values, "advantages": whiten(advantages, mask), "returns": returns,
                "reward": scores.sum(1), "scores": scores, "n": len(scores),
                "kl": ((torch.exp(delta) - delta - 1) * mask).sum(1) / mask.sum(1).clamp(min=1),
                **self.correction(old, engine_logps, mask)}

    def loss(self, net, batch):
        args, r = self.args, batch["rollout"]
        scale = r["scale"]  # token-level over the whole step
        logps, values, aux = net(r["input_ids"], r["attention_mask"], r["n_completion"], args.temperature)
        pg, vf, clipped = ppo_losses(logps.float(), values.float(), r, args.clip_eps, args.vf_clip)
        if r["tis"] is not None:  # sampled by another engine: truncated importance weights (trainer/rollout.py)
            pg = pg * r["tis"]
        mask = r["mask"]
        delta = logps.detach().float() - r["old"]  # k3 estimate of KL(old || policy) per token: >= 0
        self.drift += torch.stack([((delta.exp() - 1 - delta) * mask).sum(), mask.sum()])
        loss = ((pg + args.vf_coef * vf) * mask).sum() * scale
        if torch.is_tensor(aux):  # the routers keep their balance loss in RL too
            loss = loss + aux * r["n"]
        per_seq = mask.sum(1).clamp(min=1)
        metrics = {**self.reward_metrics(r), "kl": r["kl"].sum(), "value_loss": ((vf * mask).sum(1) / per_seq).sum(),
                   "policy_loss": ((pg * mask).sum(1) / per_seq).sum().detach(),
                   "clip_ratio": ((clipped.float() * mask).sum(1) / per_seq).sum(), "completion_tokens": mask.sum()}
        if r["gap"] is not None:
            metrics["engine_gap"] = r["gap"].sum()
        return loss, metrics


    def stop_repeat(self) -> bool:
        """After each pass: the mean over the pass's tokens (all ranks) of the k3 estimate of KL(old || policy),
        r - 1 - log r with r = p / p_old, measured in the pass's forwards (each before its own update); above
        --early_stop_kl the batch's later passes are skipped."""
        drift, self.drift = self.drift, torch.zeros_like(self.drift)
        if self.trainer.env.world_size > 1:
            dist.all_reduce(drift)
        stop = bool(drift[0] / drift[1].clamp(min=1) > self.args.early_stop_kl)
        self.early_stops += stop
        return stop


def build_critic(args, trainer, policy):
    """A value head on a copy of the policy's body (--critic copy) or on another checkpoint's (same tokenizer)."""
    if args.critic == "copy":
        body = copy.deepcopy(policy.model)
    else:
        path = resolve_checkpoint(args.critic, args.out_dir)
        body = load_pretrained(path).model
        if body.config.vocab_size < len(trainer.tokenizer):
            raise SystemExit(f"--critic {path}: vocab_size {body.config.vocab_size} is smaller than the tokenizer's "
                             f"{len(trainer.tokenizer)}: it was not trained with this tokenizer")
    return ValueModel(body)


def train(trainer, args):
    refuse_held_out_loss(args, "PPO")
    policy = trainer.build_model()
    rewards, weights, names = build_rewards(args, trainer)
    reference = trainer.frozen_copy(policy, args.ref_device)
    ac = ActorCritic(policy, build_critic(args, trainer, policy).to(trainer.device), args.critic_lr_scale)
    data = PromptDataset(args.data_path, trainer.tokenizer, args.max_prompt_len, strict=args.strict,
                         thinking_ratio=args.thinking_ratio, seed=args.seed)
    check_rewards(trainer, data, rewards, names)
    ppo = PPO(args, trainer, ac, reference, rewards, weights, names)

    def save_fn(model, folder):  # the policy as a checkpoint every script loads; the value model beside it
        save_pretrained_atomic(model.policy, trainer.tokenizer, folder)
        tmp = os.path.join(folder, "critic.safetensors.tmp")
        save_file({k: v.contiguous() for k, v in model.critic.state_dict().items()}, tmp)
        os.replace(tmp, os.path.join(folder, "critic.safetensors"))

    summary = trainer.fit(ac, data, collate_fn=trainer.collate(prompt_collate),
                          loss_fn=ppo.loss, count_fn=ppo.count, prepare_window=ppo.generate_and_score,
                          save_fn=save_fn, curve="reward", repeat=args.ppo_epochs, mini_batches=args.mini_batches,
                          stop_repeat=ppo.stop_repeat if args.early_stop_kl > 0 else None)
    if args.early_stop_kl > 0:
        trainer.log(f"--early_stop_kl {args.early_stop_kl}: {ppo.early_stops} rollout batches stopped early")
        summary["early_stops"] = ppo.early_stops
    return ppo.summarize(summary)
