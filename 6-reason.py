"""Stage 6 -- the reasoning model: replies `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`.

--method sft (default): SFT on reasoning chats -- today's sft_t2t rows, whose replies carry `reasoning_content`
(rendered as <think>...</think>), or the seed's r1_mix_1024 rows with the tags in the content -- with the loss on the
tokens of the tags inside the replies weighted --tag_weight times (MiniMind's trick to make the format stick), found
as whole strings so it is right whatever the tokenizer does with the tags.
    python 6-reason.py --data_path dataset/sft_t2t_mini.jsonl
    torchrun --nproc_per_node 4 6-reason.py --data_path dataset/sft_t2t_mini.jsonl

--method grpo (trainer/grpo.py): online RL; --num_generations replies per prompt, scored by the --reward functions
and/or a --reward_model, group-normalised advantages, the --loss_type objective (cispo, grpo, dr_grpo, dapo) plus
--beta x KL to the frozen start. Rows: chats whose last reply is the reference answer, rlaif.jsonl's prompt-only
rows (only rewards that need no reference score, and the run says which), or agent_rl rows with "gt".
    python 6-reason.py --method grpo --data_path dataset/rlaif.jsonl           # starts from out/reason
    python 6-reason.py --method grpo --reward format,my_rewards.py:length_penalty --num_iterations 2
    python 6-reason.py --method grpo --reward format --reward_model path/to/reward-model --reward_weights 0.5,1
A reward is any function (prompt, completion, reference) -> float (or the older (completion, reference)); see
trainer/rewards.py.

--method agent (trainer/agent.py): agentic RL, GRPO over multi-turn tool use on agent_rl rows; trajectories run
through the inference core's tool loop and are rewarded for the answer against "gt", well-formed calls, and
penalised when unfinished; only what the assistant wrote is trained.
    python 6-reason.py --method agent --data_path dataset/agent_rl.jsonl --tools builtin,my_tools.py:search
"""

import argparse

from common.cli import HelpFormatter
from dataset import ReasonDataset
from trainer import add_train_args, agent, grpo, stage_main
from trainer.engine import apply_method_defaults, describe_method_defaults


def train_sft(trainer, args):
    model = trainer.build_model()
    data, held = trainer.split_chat(ReasonDataset, tag_weight=args.tag_weight)
    # the rows carry "weights": the engine's lm_loss / count_label_tokens weight each label by them
    return trainer.fit(model, data, collate_fn=trainer.chat_collate(), eval_dataset=held)


METHODS = {"sft": train_sft, "grpo": grpo.train, "agent": agent.train}
# GRPO starts from the reasoning model and reads prompts; agentic RL from the (tool-use SFT'd) chat model
METHOD_DEFAULTS = {"grpo": {"init_from": "reason", "data_path": "dataset/rlaif.jsonl"},
                   "agent": {"init_from": "sft", "data_path": "dataset/agent_rl.jsonl"}}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_train_args(parser, epochs=1, batch_size=8, learning_rate=1e-6, max_seq_len=1024,
                   data_path="dataset/sft_t2t_mini.jsonl", init_from="dpo", pack=True)
    parser.add_argument("--method", choices=list(METHODS), default="sft")
    parser.add_argument("--tag_weight", type=float, default=10.0, help="sft: loss weight of the tag tokens")
    grpo.add_args(parser)
    agent.add_args(parser)
    return describe_method_defaults(parser, METHOD_DEFAULTS)


def main(argv=None):
    args = apply_method_defaults(build_parser(), argv, METHOD_DEFAULTS)
    return stage_main({"sft": "reason"}.get(args.method, args.method), build_parser, METHODS[args.method], args)


if __name__ == "__main__":
    main()
