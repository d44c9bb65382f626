"""Stage 5 -- LoRA fine-tuning on a domain, e.g. medical dialogues; the base model stays frozen.

    python 5-LoRA.py --data_path dataset/lora_medical.jsonl
    python 5-LoRA.py --data_path dataset/lora_medical.jsonl --from sft --merge
    torchrun --nproc_per_node 4 5-LoRA.py --data_path dataset/lora_medical.jsonl

Writes only the adapter to out/lora/ (adapter_config.json + adapter_model.safetensors, PEFT's format, with the
base checkpoint's path inside); --merge also writes the merged full model to out/lora/merged/. Only the adapter
tensors are in the optimizer; under torchrun DDP keeps them in sync across ranks.
"""

import argparse
import copy
from pathlib import Path

from common.cli import HelpFormatter
from dataset import SFTDataset
from model.lora import DEFAULT_TARGETS, apply_lora, count_trainable, mark_only_lora_trainable, remove_lora, save_adapter
from trainer import add_train_args, stage_main
from common.resolve import resolve_checkpoint
from trainer.checkpoint import save_pretrained_atomic


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_train_args(parser, epochs=10, batch_size=32, learning_rate=1e-4, max_seq_len=512,
                   data_path="dataset/lora_medical.jsonl", init_from="dpo", pack=True)
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--lora_alpha", type=float, default=32, help="the update is scaled by alpha / rank (2 here)")
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated names of the linear layers that get an adapter")
    parser.add_argument("--merge", action="store_true", help="also write the merged full model to out/lora/merged/")
    return parser


def run(trainer, args):
    model = trainer.build_model()
    base_path = resolve_checkpoint(args.init_from, args.out_dir).resolve() if args.init_from else None
    apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets.split(","))
    mark_only_lora_trainable(model)
    model.to(trainer.device)
    trainable, total = count_trainable(model)
    trainer.log(f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha}: {trainable / 1e6:.3f}M trainable of "
                f"{total / 1e6:.2f}M parameters ({trainable / total:.2%})")

    def save_fn(model, folder):
        save_adapter(model, folder, str(base_path) if base_path else None,
                     base_preset=args.preset if base_path and base_path.is_file() else None)
        trainer.tokenizer.save_pretrained(folder)

    data, held = trainer.split_chat(SFTDataset)
    summary = trainer.fit(model, data, collate_fn=trainer.chat_collate(), save_fn=save_fn, eval_dataset=held)
    if args.merge and trainer.env.is_main:
        merged = copy.deepcopy(model).cpu()
        remove_lora(merged, merge=True)
        save_pretrained_atomic(merged, trainer.tokenizer, Path(trainer.stage_dir) / "merged")
        trainer.log(f"merged model: {Path(trainer.stage_dir) / 'merged'}")
    return summary


def main(argv=None):
    return stage_main("lora", build_parser, run, argv)


if __name__ == "__main__":
    main()
