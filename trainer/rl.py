"""What the RL methods share (grpo.py, agent.py, ppo.py): the policy losses, log-probs at the sampling temperature,
rewards (rule functions and reward models, weighted), the Rollouts base whose `generate_and_score` is the engine's
prepare_window hook, and GAE for PPO."""

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.rewards import call_reward, expand_rewards, load_reward, load_reward_model
from inference import Sampling

from . import rollout as rollout_engines
from .rollout import completion_mask, unwrap  # noqa: F401 (the RL methods import them from here)

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "cispo")


def policy_loss(logps, old_logps, ref_logps, advantages, mask, loss_type: str = "grpo", clip_eps: float = 0.2,
                clip_eps_high: float | None = None, cispo_max: float = 5.0, beta: float = 0.0,
                max_new_tokens: int | None = None, weights=None):
    """Per-sequence loss terms (to be summed), per-sequence KL and per-sequence share of clipped tokens.

    Per token, with r = p / p_old (the sampling policy's probability) and A the sequence's advantage:
      grpo, dr_grpo, dapo  -min(r·A, clip(r, 1 - eps, 1 + eps_high)·A)          (PPO's clipped surrogate)
      cispo                -sg(min(r, cispo_max))·A·log p                     (CISPO: the importance weight clipped
                                                                                and detached; every token keeps a
                                                                                gradient)
    times `weights` (N, T) when given (the rollout engine's truncated importance weights, trainer/rollout.py),
    plus beta x the k3 estimate of KL(policy || reference), exp(ref - logp) - (ref - logp) - 1 (>= 0).
    Reduction over a sequence's tokens: grpo their mean; dr_grpo their sum / max_new_tokens (a constant: no length
    bias); dapo, cispo their sum (the caller divides by the tokens of the whole batch: token-level).
    logps, old_logps, ref_logps (or None), mask: (N, T); advantages: (N,)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if loss_type == "cispo":
        per_token = -ratio.clamp(max=cispo_max).detach() * adv * logps
        clipped = ratio > cispo_max
    else:
        per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + high) * adv)
        clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    if weights is not None:
        per_token = per_token * weights
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    n = mask.sum(1)
    summed = (per_token * mask).sum(1)
    per_seq = (summed / n.clamp(min=1) if loss_type == "grpo" else
               summed / max_new_tokens if loss_type == "dr_grpo" else summed)
    return per_seq, (kl * mask).sum(1) / n.clamp(min=1), (clipped.float() * mask).sum(1) / n.clamp(min=1)


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """(reward - group mean) / (group std + 1e-4): a group where every reply scores the same teaches nothing.
    scale=False keeps reward - group mean (Dr. GRPO: dividing by the std favours groups that are nearly all right or
    all wrong)."""
    r = rewards.view(-1, group)
    centred = r - r.mean(1, keepdim=True)
    return (centred / (r.std(1, keepdim=True) + 1e-4) if scale else centred).flatten()


def token_logps(model, input_ids, attention_mask, n_completion: int, temperature: float = 1.0):
    """(log-probabilities of the last n_completion tokens at the sampling temperature, the MoE balance loss). The
    temperature divides the logits as it did when sampling, so the ratio compares the distributions sampled from.
    Positions the attention mask leaves out (a reply's padding after its eos) get 0: every user masks them."""
    if temperature == 1.0 and n_completion > 0:  # the model's loss path: logits only at reply tokens (not padding)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-n_completion] = -100
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, reduction="none")
        return -out.loss[:, -n_completion:], getattr(out, "aux_loss", None)  # 0 where the attention mask is
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=n_completion + 1)
    logits = out.logits[:, :-1].float() / temperature
    logps = torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, -n_completion:, None]).squeeze(2)
    return logps, getattr(out, "aux_loss", None)


def score_rewards(rewards, weights, prompts, texts, refs) -> torch.Tensor:
    """(N, len(rewards)) weighted scores. A reward model scores the batch at once; a reward that needs a reference
    scores 0 where a row has none (prompt-only rows)."""
    columns = []
    for fn, w in zip(rewards, weights):
        if hasattr(fn, "score"):
            values = fn.score(prompts, texts)
        else:
            values = [0.0 if ref is None and getattr(fn, "needs_reference", False) else call_reward(fn, p, t, ref)
                      for p, t, ref in zip(prompts, texts, refs)]
        columns.append(torch.tensor(values, dtype=torch.float32) * w)
    return torch.stack(columns, 1)


class Rollouts:
    """What the RL methods share. `generate_and_score` is the engine's prepare_window hook: once per window of
    micro-batches it puts each batch's rollout (`rollout`, each method's own) into the batch and fixes each step's
    token normaliser; `count` (the engine's count_fn) reads the rollout's size. `sample` generates through the
    inference core and times it; `score` decodes the replies and scores them; `summarize` reports rollout speed."""

    def __init__(self, args, trainer, policy, rewards, weights, names, token_level: bool):
        self.args, self.trainer, self.policy, self.tokenizer = args, trainer, policy, trainer.tokenizer
        self.rewards, self.weights, self.names = rewards, weights, names
        self.sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        self.token_level = token_level
        self.mini_batches = 1
        self.rollout_tokens, self.rollout_seconds = 0, 0.0
        self.engine = rollout_engines.build(args, trainer, policy)

    def generate_and_score(self, micro: list):
        """Sample and score the window's rollouts, then set each one's loss scale: a token-level loss is normalised
        by the completion tokens of the whole step (all micro-batches and ranks); the engine divides by sequences,
        so the scale is sequences / tokens (1 for a per-sequence loss)."""
        for batch in micro:
            batch["rollout"] = self.rollout(batch)
        size = len(micro) // self.mini_batches  # each optimizer step (PPO's mini-batch) is normalised on its own
        for k in range(0, len(micro), size):
            rollouts = [b["rollout"] for b in micro[k:k + size]]
            totals = torch.tensor([[r["n"], float(r["mask"].sum())] for r in rollouts]).sum(0).to(self.trainer.device)
            if self.trainer.env.world_size > 1:
                dist.all_reduce(totals)
            scale = float(totals[0] / totals[1].clamp(min=1)) if self.token_level else 1.0
            for r in rollouts:
                r["scale"] = scale

    @staticmethod
    def count(batch):
        return batch["rollout"]["n"]

    def rollout(self, batch) -> dict:
        raise NotImplementedError

    def sample(self, prompt_ids, prompt_mask):
        """(completion, mask, engine log-probs or None): the policy's replies from the rollout engine (the inference
        core's decode loop, or vLLM); mask 1 up to and including each reply's eos."""
        t0 = time.time()
        completion, mask, engine_logps = self.engine.sample(self.policy, prompt_ids, prompt_mask, self.sampling)
        self.rollout_seconds += time.time() - t0
        self.rollout_tokens += int(mask.sum())
        return completion, mask, engine_logps

    def correction(self, old, engine_logps, mask) -> dict:
        """The engine/trainer mismatch of a rollout sampled by another engine: per token the truncated importance
        weight min(exp(old - engine), --tis_cap) (none with cap 0) and per sequence the mean |old - engine|."""
        if engine_logps is None:
            return {"tis": None, "gap": None}
        delta = (old - engine_logps) * mask
        tis = delta.exp().clamp(max=self.args.tis_cap) * mask if self.args.tis_cap > 0 else None
        return {"tis": tis, "gap": delta.abs().sum(1) / mask.sum(1).clamp(min=1)}

    @property
    def recompute_old(self) -> bool:
        """Whether a rollout keeps the trainer's log-probs of the sampling policy: needed when several steps share it
        (the ratio's denominator) or when another engine sampled it (its own log-probs round differently)."""
        return self.engine.name != "local" or getattr(self.args, "num_iterations", 1) > 1

    def score(self, batch, completion, mask, group: int = 1) -> torch.Tensor:
        """(N, rewards) weighted scores of the replies; each prompt of the batch answered `group` times in a row. A
        prompt that opened the think block (thinking on) has its reply scored with that opening, as the chat shows it."""
        def each(values):
            return [v for v in values for _ in range(group)]

        texts = self.tokenizer.batch_decode([c[:int(m.sum())] for c, m in zip(completion, mask)],
                                            skip_special_tokens=True)
        texts = [("<think>\n" if opened else "") + t for t, opened in zip(texts, each(batch["opened"]))]
        refs = each([r if r is not None else gt for r, gt in zip(batch["references"], batch["gt"])])
        return score_rewards(self.rewards, self.weights, each(batch["messages"]), texts, refs).to(completion.device)

    def reward_metrics(self, rollout) -> dict:
        metrics = {"reward": rollout["reward"].sum()}
        for i, name in enumerate(self.names):
            metrics[f"reward_{name}"] = rollout["scores"][:, i].sum()
        return metrics

    def summarize(self, summary: dict) -> dict:
        summary["rollout_tokens_per_s"] = self.rollout_tokens / max(self.rollout_seconds, 1e-9)
        summary["rollout_engine"] = self.engine.name
        self.trainer.log(f"rollouts ({self.engine.name}): {self.rollout_tokens:,} tokens in "
                         f"{self.rollout_seconds:.1f} s ({summary['rollout_tokens_per_s']:,.0f} tokens/s)")
        if hasattr(self.engine, "summary"):
            summary.update(self.engine.summary())
            self.trainer.log(f"weight syncs: {summary['weight_syncs']} in {summary['weight_sync_seconds']:.1f} s")
        self.engine.close()
        return summary


def refuse_held_out_loss(args, method: str):
    """--eval_data / --eval_split mean a held-out loss; an RL stage has none (its rollouts are sampled)."""
    if args.eval_data or args.eval_split:
        raise SystemExit(f"--eval_data / --eval_split: {method} has no held-out loss (its rollouts are sampled); "
                         f"score held-out prompts with scripts/eval_tools.py or the demo metrics instead")


def add_reward_args(group, default: str):
    """The reward and rollout-engine flags GRPO and PPO share."""
    rollout_engines.add_args(group)
    a = group.add_argument
    a("--reward", default=default,
      help="comma-separated rule rewards: builtin names (format, correctness, length, think_length, think_closed, "
           "repetition; minimind = the last four), module:function or file.py:function")
    a("--reward_model", default=None,
      help="a reward model folder, added to the rule rewards: a sequence classifier, or a remote-code model with "
           "get_score(tokenizer, messages) like internlm2-1_8b-reward (needs --trust_remote_code)")
    a("--trust_remote_code", action="store_true", help="run the --reward_model's own code (its auto_map)")
    a("--reward_clip", type=float, default=3.0, help="reward model scores clipped to +-this (MiniMind's 3; 0: no clip)")
    a("--reward_weights", default=None,
      help="comma-separated weights: one per --reward, then the reward model's (default: all 1)")
    a("--reward_device", default=None, help="device of the reward model (default: the training one)")
    a("--reward_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a("--ref_device", default=None, help="device of the frozen reference model (default: the training one)")


def check_rewards(trainer, data, rewards, names):
    """Say which rewards score prompt-only rows (those without a reference); stop if none would."""
    sample = [data[i] for i in range(min(len(data), 256))]
    without = sum(x["reference"] is None and x["gt"] is None for x in sample)
    if not without:
        return
    need = [n for fn, n in zip(rewards, names) if getattr(fn, "needs_reference", False)]
    apply = [n for n in names if n not in need]
    if not apply and without == len(sample):
        raise SystemExit(f"{trainer.args.data_path}: the rows have no reference answer (prompt-only, like "
                         f"rlaif.jsonl) and every reward ({', '.join(names)}) needs one; add one that does not, e.g. "
                         f"--reward format or --reward_model PATH")
    trainer.log(f"{without} of the first {len(sample)} rows have no reference: on them only "
                f"{', '.join(apply) or 'no reward'} score" + (f" ({', '.join(need)} need a reference)" if need else ""))


def build_reward_model(args, trainer):
    return load_reward_model(args.reward_model, args.reward_device or trainer.device, args.reward_dtype,
                             args.trust_remote_code, args.reward_clip or None)


def build_rewards(args, trainer):
    """(reward functions, weights, names): --reward's rule rewards, then --reward_model; --reward_weights."""
    specs = expand_rewards(args.reward)
    rewards = [load_reward(spec) for spec in specs]
    names = [spec.rsplit(":", 1)[-1] for spec in specs]
    if args.reward_model:
        rewards.append(build_reward_model(args, trainer))
        names.append("model")
    weights = [1.0] * len(rewards)
    if args.reward_weights:
        weights = [float(w) for w in args.reward_weights.split(",")]
        if len(weights) != len(rewards):
            raise SystemExit(f"--reward_weights has {len(weights)} weights for {len(rewards)} rewards "
                             f"({', '.join(names)})")
    if not rewards:
        raise SystemExit("no reward: give --reward and/or --reward_model")
    return rewards, weights, names


def gae(rewards, values, mask, gamma: float, lam: float):
    """(advantages, returns) by generalised advantage estimation over each row's tokens: delta_t = r_t +
    gamma V_{t+1} - V_t (V = 0 after the last token), A_t = delta_t + gamma lam A_{t+1}, returns = A + V.
    rewards, values, mask: (N, T); masked positions are outside the episode."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


def whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the unmasked entries."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask
