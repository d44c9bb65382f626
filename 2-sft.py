"""Stage 2 -- supervised fine-tuning on {"conversations": [...]} jsonl; loss only on the assistant replies.

    python 2-sft.py --data_path dataset/sft_t2t_mini.jsonl
    torchrun --nproc_per_node 4 2-sft.py --data_path dataset/sft_t2t_mini.jsonl
"""

import argparse

from common.cli import HelpFormatter
from dataset import SFTDataset
from trainer import add_train_args, stage_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_train_args(parser, epochs=2, batch_size=32, learning_rate=5e-5, max_seq_len=512,
                   data_path="dataset/sft_t2t_mini.jsonl", init_from="pretrain", pack=True)
    parser.add_argument("--system_prompt_ratio", type=float, default=0.0,
                        help="share of rows without a system message that get a random one (MiniMind's 0.2)")
    return parser


def run(trainer, args):
    model = trainer.build_model()
    data, held = trainer.split_chat(SFTDataset, system_prompt_ratio=args.system_prompt_ratio)
    return trainer.fit(model, data, collate_fn=trainer.chat_collate(), eval_dataset=held)


def main(argv=None):
    return stage_main("sft", build_parser, run, argv)


if __name__ == "__main__":
    main()
