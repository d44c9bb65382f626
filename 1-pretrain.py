"""Stage 1 -- pretraining: next-token prediction on {"text": ...} jsonl.

    python 1-pretrain.py --data_path dataset/pretrain_t2t_mini.jsonl
    torchrun --nproc_per_node 4 1-pretrain.py --data_path dataset/pretrain_t2t_mini.jsonl
"""

import argparse

from common.cli import HelpFormatter
from dataset import PretrainDataset
from trainer import add_train_args, stage_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_train_args(parser, epochs=2, batch_size=32, learning_rate=5e-4, max_seq_len=512,
                   data_path="dataset/pretrain_t2t_mini.jsonl")
    parser.add_argument("--padded", action="store_true",
                        help="one document per row padded to max_seq_len (MiniMind's way) instead of packing")
    parser.add_argument("--doc_mask", action="store_true",
                        help="packed rows: each document attends only to itself, from position 0 (Llama 3's way); "
                             "without it a row is one stream across its documents' eos")
    return parser


def run(trainer, args):
    model = trainer.build_model()
    data, held = trainer.split(lambda path: PretrainDataset(path, trainer.tokenizer, args.max_seq_len,
                                                            packed=not args.padded, strict=args.strict,
                                                            doc_mask=args.doc_mask))
    return trainer.fit(model, data, eval_dataset=held)


def main(argv=None):
    return stage_main("pretrain", build_parser, run, argv)


if __name__ == "__main__":
    main()
