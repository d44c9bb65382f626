"""Stage 3 -- knowledge distillation into the SFT model (trainer/kd.py).

Black-box (no --teacher): SFT on dialogues a larger teacher wrote, e.g. MiniMind's sft_1024.jsonl.
    python 3-KD.py --data_path dataset/sft_t2t_mini.jsonl
White-box (--teacher DIR): also match the teacher's next-token distribution on the assistant tokens,
    loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)   at temperature T.
    python 3-KD.py --data_path dataset/sft_t2t_mini.jsonl --teacher out/sft_104m
    torchrun --nproc_per_node 4 3-KD.py --data_path dataset/sft_t2t_mini.jsonl --teacher out/sft_104m
"""

import argparse

from common.cli import HelpFormatter
from dataset import SFTDataset
from trainer import add_train_args, kd, stage_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_train_args(parser, epochs=2, batch_size=64, learning_rate=5e-5, max_seq_len=1024,
                   data_path="dataset/sft_t2t_mini.jsonl", init_from="sft", pack=True)
    kd.add_args(parser)
    return parser


def run(trainer, args):
    model = trainer.build_model()
    data, held = trainer.split_chat(SFTDataset)
    collate = trainer.chat_collate()
    if not args.teacher:  # black-box: plain SFT on the teacher's text
        return trainer.fit(model, data, collate_fn=collate, eval_dataset=held)
    return kd.train(trainer, args, model, data, held, collate)


def main(argv=None):
    return stage_main("kd", build_parser, run, argv)


if __name__ == "__main__":
    main()
