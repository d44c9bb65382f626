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

--method agent: agentic RL (GRPO over multi-turn tool use) on agent_rl rows (tools in the system message, "gt", and
optionally "tool_results": the tools' scripted results in that chat). Each trajectory runs through the inference
core's tool loop (calls executed, results fed back, at most --max_tool_rounds rounds) and is rewarded for the final
answer against "gt", for well-formed calls, and penalised when unfinished; only what the assistant wrote is trained.
    python 6-reason.py --method agent --data_path dataset/agent_rl.jsonl --tools builtin,my_tools.py:search
"""

import argparse
import copy
import time
from functools import partial

import torch

from dataset import BadLineError, ChatEncoder, PromptDataset, ReasonDataset, pad_collate, prompt_collate
from dataset.rewards import RewardModel, agent_answer_correct
from inference import Engine, load_tools
from inference.tools import scripted_tool
from trainer import add_train_args, stage_main
from trainer.rl import (LOSS_TYPES, Rollouts, add_reward_args, build_rewards, check_rewards, group_advantages,
                        policy_loss, refuse_held_out_loss, token_logps, unwrap)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, epochs=1, batch_size=8, learning_rate=1e-6, max_seq_len=1024,
                   data_path="dataset/sft_t2t_mini.jsonl", init_from="dpo")
    parser.add_argument("--method", choices=["sft", "grpo", "agent"], default="sft")
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
    a = parser.add_argument_group("agent (GRPO's flags too; --from defaults to sft, --data_path to "
                                  "dataset/agent_rl.jsonl; --reward is not used: the rewards are the ones below)")
    a.add_argument("--max_tool_rounds", type=int, default=3, help="tool rounds per trajectory, then it must answer")
    a.add_argument("--tools", default="builtin",
                   help="what calls run in: builtin, built-in names, file.py:function or module:function (a row's "
                        "\"tool_results\" are its scripted tools on top)")
    a.add_argument("--call_reward", type=float, default=0.2, help="reward x the share of well-formed calls")
    a.add_argument("--unfinished_penalty", type=float, default=0.5,
                   help="subtracted when the trajectory is still calling after the last round or was cut off")
    return parser


# ----------------------------------------------------------------------------------------------------------- GRPO

class GRPO(Rollouts):
    """The engine's count_fn samples a window's rollouts (once per window of micro-batches) and keeps the sampling
    policy's and the reference's log-probs; loss_fn is the policy loss, taken --num_iterations times on them."""

    def __init__(self, args, trainer, policy, reference, rewards, weights, names):
        super().__init__(args, trainer, policy, rewards, weights, names,
                         token_level=args.loss_type in ("dapo", "cispo"))
        self.reference = reference

    @torch.no_grad()
    def rollout(self, batch) -> dict:
        G = self.args.num_generations
        prompt_ids = batch["prompt_ids"].repeat_interleave(G, 0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(G, 0)
        completion, mask = self.sample(prompt_ids, prompt_mask)
        scores = self.score(batch, completion, mask, group=G)
        input_ids = torch.cat([prompt_ids, completion], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        return self.finish(input_ids, attention_mask, mask, completion.size(1), scores)

    def finish(self, input_ids, attention_mask, mask, n, scores) -> dict:
        """The rollout's record: group advantages of the summed scores, and the log-probs of its last n tokens under
        the sampling policy (kept for the later iterations, where they are the ratio's denominator) and the
        reference."""
        args = self.args
        with self.trainer.autocast:
            old = (token_logps(self.policy, input_ids, attention_mask, n, args.temperature)[0]
                   if args.num_iterations > 1 else None)
        ref = None
        if self.reference is not None:
            dev = next(self.reference.parameters()).device
            ref = token_logps(self.reference, input_ids.to(dev), attention_mask.to(dev), n,
                              args.temperature)[0].to(input_ids.device)
        reward = scores.sum(1)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mask": mask, "n_completion": n,
                "advantages": group_advantages(reward, args.num_generations), "reward": reward, "scores": scores,
                "old": old, "ref": ref, "n": len(input_ids)}

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
        metrics = {**self.reward_metrics(r), "kl": kl.sum().detach(), "clip_ratio": clipped.sum(),
                   "completion_tokens": r["mask"].sum()}
        return loss, metrics


class AgentGRPO(GRPO):
    """--method agent: GRPO over multi-turn tool-use trajectories. Each rollout is the inference core's tool loop
    (Engine.run_tools_batch): the model's calls run, their results go back as tool messages, at most
    --max_tool_rounds rounds. The trajectory is trained as the chat template renders it, with labels on exactly what
    the assistant wrote (calls, replies, their eos: the SFT masking); the tool results and prompts are never trained.
    Rewards: the final answer against "gt" (1), well-formed calls (--call_reward x their share) and an unfinished
    trajectory (still calling after the last round, or cut at --max_new_tokens: -unfinished_penalty)."""

    def __init__(self, args, trainer, policy, reference, functions, reward_model=None):
        names = ["answer", "calls", "unfinished"] + (["model"] if reward_model is not None else [])
        super().__init__(args, trainer, policy, reference, [], [], names)
        self.functions, self.reward_model = functions, reward_model
        self.encoder = ChatEncoder(trainer.tokenizer)
        self.unmapped = 0

    def environment(self, scripted) -> dict:
        """The tools a chat's calls run in: the built-in / plug-in ones, and the row's scripted ones on top."""
        if not scripted:
            return self.functions
        return {**self.functions, **{name: scripted_tool(spec) for name, spec in scripted.items()}}

    def score(self, chat, new, first, last, gt) -> list:
        calls = sum(len(m.get("tool_calls") or []) for m in new if m["role"] == "assistant")
        failed = sum(m["role"] == "tool" and m["content"].startswith("error") for m in new)
        malformed = len(first.errors) + (len(last.errors) if last is not first else 0)
        well_formed = max(calls - failed, 0) / (calls + malformed) if calls else 0.0
        unfinished = bool(last.tool_calls) or last.finish_reason == "length"
        return [float(agent_answer_correct(last.content, gt)), self.args.call_reward * well_formed,
                -self.args.unfinished_penalty * unfinished]

    @torch.no_grad()
    def rollout(self, batch) -> dict:
        args, G, tok = self.args, self.args.num_generations, self.tokenizer
        rows = [i for i in range(len(batch["messages"])) for _ in range(G)]
        chats = [batch["messages"][i] for i in rows]
        tools = [batch["tools"][i] for i in rows]
        gts = [batch["gt"][i] if batch["gt"][i] is not None else batch["references"][i] for i in rows]
        envs = [self.environment(batch["tool_results"][i]) for i in rows]
        training = self.policy.training
        self.policy.eval()
        t0 = time.time()
        runs = Engine(self.policy, tok).run_tools_batch(chats, envs, tools=tools, max_rounds=args.max_tool_rounds,
                                                        sampling=self.sampling, batch_size=len(chats))
        self.policy.train(training)
        self.rollout_seconds += time.time() - t0
        scores, encoded = [], []
        for chat, tool, gt, (new, first, last) in zip(chats, tools, gts, runs):
            scores.append(self.score(chat, new, first, last, gt))
            try:
                encoded.append(self.encoder.encode(chat + new, tool, args.max_seq_len))
            except BadLineError:  # a trajectory the template cannot map: it scores, but trains nothing (counted)
                self.unmapped += 1
                text = self.encoder.render(chat + new, tool)
                ids = tok(text, add_special_tokens=False)["input_ids"][:args.max_seq_len]
                encoded.append({"input_ids": torch.tensor(ids), "labels": torch.full((len(ids),), -100)})
        if self.reward_model is not None:
            model_scores = self.reward_model.score(chats, [last.content for _, _, last in runs])
            scores = [s + [m] for s, m in zip(scores, model_scores)]
        device = batch["prompt_ids"].device
        width = max(len(e["input_ids"]) for e in encoded)
        input_ids = torch.full((len(encoded), width), tok.pad_token_id or 0, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):  # right-padded: the trajectories are scored whole, nothing generated here
            n = len(e["input_ids"])
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = e["input_ids"], e["labels"], 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        mask = (labels[:, 1:] != -100).float().to(device)
        self.rollout_tokens += int(mask.sum())
        scores = torch.tensor(scores, dtype=torch.float32, device=device)
        return self.finish(input_ids, attention_mask, mask, width - 1, scores)  # every position after the first


def check_tools(trainer, data, functions):
    """Say which tools the data declares that have no implementation here (their calls get an error result)."""
    declared, scripted = set(), set()
    for i in range(min(len(data), 256)):
        item = data[i]
        declared |= {t["function"]["name"] for t in item["tools"] or []}
        scripted |= set(item["tool_results"] or {})
    missing = sorted(declared - set(functions) - scripted)
    if missing:
        trainer.log(f"tools without an implementation (their calls return an error): {', '.join(missing)}; give "
                    f"them with --tools file.py:function or per row as \"tool_results\"")


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
    refuse_held_out_loss(args, "GRPO")
    if args.num_generations < 2:
        raise SystemExit(f"--num_generations {args.num_generations}: GRPO's advantage is a reply's reward minus its "
                         f"group's mean, so a group of one has none and no step would teach anything; use 2 or more")
    reference = None
    if args.beta > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False).to(args.ref_device or trainer.device)
    data = PromptDataset(args.data_path, trainer.tokenizer, args.max_prompt_len, strict=args.strict,
                         thinking_ratio=args.thinking_ratio, seed=args.seed)
    if args.method == "agent":
        functions = load_tools(args.tools)
        check_tools(trainer, data, functions)
        reward_model = (RewardModel(args.reward_model, args.reward_device or trainer.device, args.reward_dtype)
                        if args.reward_model else None)
        grpo = AgentGRPO(args, trainer, model, reference, functions, reward_model)
    else:
        rewards, weights, names = build_rewards(args, trainer)
        check_rewards(trainer, data, rewards, names)
        grpo = GRPO(args, trainer, model, reference, rewards, weights, names)
    summary = trainer.fit(model, data, collate_fn=partial(prompt_collate, pad_id=pad_id), loss_fn=grpo.loss,
                          count_fn=grpo.count, curve="reward", repeat=args.num_iterations)
    grpo.summarize(summary)
    if getattr(grpo, "unmapped", 0):
        trainer.log(f"{grpo.unmapped} trajectories could not be mapped to assistant tokens by the chat template: "
                    f"they were scored but trained nothing")
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    defaults = build_parser().parse_args([])
    # GRPO starts from the reasoning model and reads prompts; agentic RL from the chat model (tool-use SFT'd) on
    # agent_rl rows -- unless told otherwise
    start, data = {"grpo": ("reason", "dataset/rlaif.jsonl"), "agent": ("sft", "dataset/agent_rl.jsonl")}.get(
        args.method, (None, None))
    if start and args.init_from == defaults.init_from:
        args.init_from = start
    if data and args.data_path == defaults.data_path:
        args.data_path = data
    return stage_main({"sft": "reason"}.get(args.method, args.method), build_parser, run, args)


if __name__ == "__main__":
    main()
