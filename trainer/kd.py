"""Knowledge distillation (3-KD.py): white-box KD against a frozen teacher's next-token distribution.

    loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)   at temperature T, on the assistant tokens.

The teacher is any causal LM with the same tokenizer (our model of another preset, a released MiniMind / Qwen /
Llama checkpoint that model/families.py reads, or any other Hugging Face one); it is frozen, in eval mode, and runs
without gradients in the compute dtype. Without --teacher, 3-KD.py is black-box KD: plain SFT on the teacher's text.
"""

import torch
import torch.nn.functional as F

from common.resolve import resolve_checkpoint
from model.families import load_for_inference


def add_args(parser):
    parser.add_argument("--teacher", default=None, help="teacher checkpoint folder or stage name (white-box KD)")
    parser.add_argument("--teacher_preset", default=None, help="the architecture of a bare .pth teacher (MiniMind's)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the cross-entropy on the labels")
    parser.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the KL term")


def kd_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float):
    """Summed alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) over the labelled (assistant) positions."""
    logits, targets = student_logits[:, :-1].float(), labels[:, 1:]
    mask = targets != -100
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")
    t = temperature
    teacher_logp = F.log_softmax(teacher_logits[:, :-1].float()[mask] / t, dim=-1)
    student_logp = F.log_softmax(logits[mask] / t, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
    return alpha * ce + (1 - alpha) * t * t * kl, ce, kl


def load_teacher(trainer, name_or_path, student_vocab: int):
    path = resolve_checkpoint(name_or_path, trainer.args.out_dir)
    teacher, note = load_for_inference(path, trainer.args.teacher_preset)
    if note:
        trainer.log(f"teacher {path}: {note}")
    teacher = teacher.to(trainer.device).eval().requires_grad_(False)
    vocab = teacher.config.vocab_size
    if vocab < student_vocab:
        raise ValueError(f"teacher {path} has vocab_size {vocab} < the student's {student_vocab}: "
                         f"they do not share a tokenizer")
    if vocab > student_vocab:
        trainer.log(f"teacher vocab {vocab} > student vocab {student_vocab}: using the teacher's first "
                    f"{student_vocab} logits (the tokenizers must share those ids)")
    return teacher, vocab


def train(trainer, args, model, data, held, collate):
    """White-box KD of `model` on `data`, the teacher loaded from --teacher."""
    teacher, _ = load_teacher(trainer, args.teacher, model.config.vocab_size)
    vocab = model.config.vocab_size

    def loss_fn(net, batch):
        # packed rows carry position_ids; without a cache transformers models read them as packed documents too
        ids, positions = batch["input_ids"], batch.get("position_ids")
        out = net(input_ids=ids, position_ids=positions)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, position_ids=positions, use_cache=False).logits[..., :vocab]
        loss, ce, kl = kd_loss(out.logits, teacher_logits, batch["labels"], args.alpha, args.temperature)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss * (batch["labels"][:, 1:] != -100).sum()
        return loss, {"ce": ce.detach(), "kl": kl.detach()}

    return trainer.fit(model, data, collate_fn=collate, loss_fn=loss_fn, eval_dataset=held)
