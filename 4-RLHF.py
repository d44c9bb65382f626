"""Stage 4 -- preference training: DPO on preference pairs (default, trainer/dpo.py), or PPO with a value model on
prompts (trainer/ppo.py).

--method dpo, on {"chosen": [...], "rejected": [...]} jsonl:
    python 4-RLHF.py --data_path dataset/dpo.jsonl
    torchrun --nproc_per_node 4 4-RLHF.py --data_path dataset/dpo.jsonl --precompute_ref
Loss (Rafailov et al. 2023): -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]),
log pi(y) summed over the reply's tokens; the reference is the frozen starting model.

--method ppo, on prompts (rlaif.jsonl, or rows with a reference / "gt"), writes out/ppo/:
    python 4-RLHF.py --method ppo --data_path dataset/rlaif.jsonl --reward_model path/to/reward-model
    python 4-RLHF.py --method ppo --reward format,correctness --ppo_epochs 4
One reply per prompt, a per-token KL penalty, GAE over a value model's V, clipped policy and value losses
(Ouyang et al. 2022; Schulman et al. 2017); the value model is saved beside the policy (critic.safetensors).
"""

import argparse

from common.cli import HelpFormatter
from trainer import add_train_args, dpo, ppo, stage_main
from trainer.engine import apply_method_defaults, describe_method_defaults

METHODS = {"dpo": dpo.train, "ppo": ppo.train}
METHOD_DEFAULTS = {"ppo": {"data_path": "dataset/rlaif.jsonl"}}  # PPO reads prompts


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_train_args(parser, epochs=1, batch_size=8, learning_rate=1e-6, max_seq_len=1024,
                   data_path="dataset/dpo.jsonl", init_from="sft")
    parser.add_argument("--method", choices=sorted(METHODS), default="dpo")
    dpo.add_args(parser)
    ppo.add_args(parser)
    return describe_method_defaults(parser, METHOD_DEFAULTS)


def main(argv=None):
    args = apply_method_defaults(build_parser(), argv, METHOD_DEFAULTS)
    return stage_main(args.method, build_parser, METHODS[args.method], args)


if __name__ == "__main__":
    main()
