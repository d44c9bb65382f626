"""Agentic RL (6-reason.py --method agent): GRPO over multi-turn tool-use trajectories, on agent_rl rows (tools in the
system message, "gt", and optionally "tool_results": the tools' scripted results in that chat).

Each trajectory runs through the inference core's tool loop (calls executed, results fed back, at most
--max_tool_rounds rounds) and is rewarded for the final answer against "gt", for well-formed calls, and penalised
when unfinished; only what the assistant wrote is trained (SFT's masking).
"""

import time

import torch

from dataset import BadLineError, ChatEncoder, pad_collate, pad_id_of
from inference import Engine, load_tools
from inference.tools import scripted_tool

from . import grpo
from .grpo import GRPO
from .rl import build_reward_model
from .rewards import agent_answer_correct


def add_args(parser):
    a = parser.add_argument_group("agent (GRPO's flags too; --from defaults to sft, --data_path to "
                                  "dataset/agent_rl.jsonl; --reward is not used: the rewards are the ones below)")
    a.add_argument("--max_tool_rounds", type=int, default=3, help="tool rounds per trajectory, then it must answer")
    a.add_argument("--tools", default="builtin",
                   help="what calls run in: builtin, built-in names, file.py:function or module:function (a row's "
                        "\"tool_results\" are its scripted tools on top)")
    a.add_argument("--call_reward", type=float, default=0.2, help="reward x the share of well-formed calls")
    a.add_argument("--unfinished_penalty", type=float, default=0.5,
                   help="subtracted when the trajectory is still calling after the last round or was cut off")
    a.add_argument("--tool_count_reward", type=float, default=0.0,
                   help="MiniMind's call-count reward (its 0.5): +this when the calls that ran equal the number of "
                        "\"gt\" answers and none failed, else -this x the gap (0: off)")


class AgentGRPO(GRPO):
    """--method agent: GRPO over multi-turn tool-use trajectories. Each rollout is the inference core's tool loop
    (Engine.run_tools_batch): the model's calls run, their results go back as tool messages, at most
    --max_tool_rounds rounds. The trajectory is trained as the chat template renders it, with labels on exactly what
    the assistant wrote (calls, replies, their eos: the SFT masking); the tool results and prompts are never trained.
    Rewards: the final answer against "gt" (1), well-formed calls (--call_reward x their share) and an unfinished
    trajectory (still calling after the last round, or cut at --max_new_tokens: -unfinished_penalty)."""

    def __init__(self, args, trainer, policy, reference, functions, reward_model=None):
        names = (["answer", "calls", "unfinished"] + (["tool_count"] if args.tool_count_reward else [])
                 + (["model"] if reward_model is not None else []))
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
        scores = [float(agent_answer_correct(last.content, gt)), self.args.call_reward * well_formed,
                  -self.args.unfinished_penalty * unfinished]
        if self.args.tool_count_reward:
            scores.append(tool_count_reward(calls - failed, failed + malformed, gt, self.args.tool_count_reward))
        return scores

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
        runs = Engine(self.trainer.sampling_model(self.policy), tok,
                      sampler=self.engine.tool_sampler(self.policy)).run_tools_batch(
            chats, envs, tools=tools, max_rounds=args.max_tool_rounds, sampling=self.sampling, batch_size=len(chats))
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
        # right-padded: the trajectories are scored whole, nothing generated here
        padded = pad_collate(encoded, pad_id_of(tok))
        input_ids, labels, width = padded["input_ids"], padded["labels"], padded["input_ids"].size(1)
        lengths = torch.tensor([len(e["input_ids"]) for e in encoded])
        attention_mask = (torch.arange(width) < lengths[:, None]).long()
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        mask = (labels[:, 1:] != -100).float().to(device)
        self.rollout_tokens += int(mask.sum())
        scores = torch.tensor(scores, dtype=torch.float32, device=device)
        return self.finish(input_ids, attention_mask, mask, width - 1, scores)  # every position after the first


def tool_count_reward(ran: int, bad: int, gt, weight: float) -> float:
    """MiniMind's call-count reward: the gap is |calls that ran - number of gt answers| + calls that failed or were
    malformed; +weight when it is 0, else -weight x gap (one call per expected answer, no wasted calls)."""
    expected = len(gt) if isinstance(gt, list) else int(gt is not None)
    gap = abs(ran - expected) + bad
    return weight if gap == 0 else -weight * gap


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


def train(trainer, args):
    # agentic RL scores trajectories with its own rewards: GRPO's reward flags would be ignored without a word
    ignored = [f"--{name}" for name, default in (("reward", grpo.DEFAULT_REWARD), ("reward_weights", None),
                                                 ("thinking_ratio", None)) if getattr(args, name) != default]
    if ignored:
        raise SystemExit(f"--method agent rewards the answer against gt, well-formed calls (--call_reward) and "
                         f"finished trajectories (--unfinished_penalty), plus --reward_model if given; "
                         f"{', '.join(ignored)} would be ignored: leave {'them' if len(ignored) > 1 else 'it'} out")
    model = trainer.build_model()
    reference, data = grpo.prepare(trainer, args, model)
    functions = load_tools(args.tools)
    check_tools(trainer, data, functions)
    reward_model = build_reward_model(args, trainer) if args.reward_model else None
    agent = AgentGRPO(args, trainer, model, reference, functions, reward_model)
    summary = grpo.fit(trainer, args, model, data, agent)
    if agent.unmapped:
        trainer.log(f"{agent.unmapped} trajectories could not be mapped to assistant tokens by the chat template: "
                    f"they were scored but trained nothing")
    return summary
