"""DPO (4-RLHF.py, the default method), on {"chosen": [...], "rejected": [...]} pairs (Rafailov et al. 2023):

    loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])

where log pi(y) is the SUM of the reply's token log-probs (never a mean over padded length). The reference is the
starting model, frozen; --precompute_ref scores every pair with it once before training and keeps the scores in
out/dpo/ref_logps.pt, so the reference model does not stay in memory.
"""


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dataset import DPODataset, dpo_collate


def add_args(parser):
    parser.add_argument("--beta", type=float, default=0.1, help="dpo: strength of the pull towards the reference")
    parser.add_argument("--precompute_ref", action="store_true",
                        help="dpo: score all pairs with the reference once, then free it (saved in out/dpo/)")


def sequence_logps(model, input_ids, labels, with_aux: bool = False):
    """Summed log-probability of the labelled tokens of each row (labels shifted inside, -100 ignored): minus the
    model's per-position cross-entropy, which is chunked for a large vocabulary. with_aux: also the MoE balance loss."""
    out = model(input_ids=input_ids, labels=labels, reduction="none")
    logps = -out.loss.sum(-1)
    return (logps, out.aux_loss) if with_aux else logps


def dpo_terms(policy_logps, ref_logps, beta: float):
    """Per-pair loss and implicit rewards from [chosen; rejected] stacked log-probs."""
    pc, pr = policy_logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
    margin = chosen_reward - rejected_reward
    return -F.logsigmoid(margin), chosen_reward, rejected_reward, margin


@torch.no_grad()
def precompute_ref_logps(trainer, ref_model, dataset, collate) -> torch.Tensor:
    """(N, 2) reference log-probs of every pair's chosen and rejected reply; ranks share the work."""
    env = trainer.env
    table = torch.zeros(len(dataset), 2, dtype=torch.float64, device=trainer.device)
    shard = list(range(env.rank, len(dataset), env.world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=trainer.args.batch_size,
                        collate_fn=collate)
    for batch in loader:
        with trainer.autocast:
            logps = sequence_logps(ref_model, batch["input_ids"].to(trainer.device),
                                   batch["labels"].to(trainer.device))
        table[batch["index"].to(trainer.device)] = torch.stack(logps.double().chunk(2), dim=1)
    if env.distributed:
        dist.all_reduce(table)
    return table.float()


def train(trainer, args):
    model = trainer.build_model()
    if args.precompute_ref and args.eval_data:
        raise SystemExit("--precompute_ref keeps reference log-probs of the training file's rows only: use "
                         "--eval_split, or drop --precompute_ref, to evaluate held-out pairs")
    data, held = trainer.split_chat(DPODataset)
    collate = trainer.collate(dpo_collate)
    ref = trainer.frozen_copy(model)
    ref_table = None
    if args.precompute_ref:
        path = trainer.stage_dir / "ref_logps.pt"
        if args.resume and path.exists():
            ref_table = torch.load(path, weights_only=True).to(trainer.device)
        else:
            # every row of the file (held-out ones too: a batch's "index" is the row's index in the file)
            ref_table = precompute_ref_logps(trainer, ref, getattr(data, "dataset", data), collate)
            if trainer.env.is_main:
                torch.save(ref_table.cpu(), path)
        del ref  # the point of precomputing: no second model in memory while training

    def loss_fn(net, batch):
        policy, aux = sequence_logps(net, batch["input_ids"], batch["labels"], with_aux=True)
        if ref_table is not None:
            ref_logps = ref_table[batch["index"]].T.reshape(-1)  # [chosen...; rejected...]
        else:
            with torch.no_grad():
                ref_logps = sequence_logps(ref, batch["input_ids"], batch["labels"])
        losses, chosen, rejected, margin = dpo_terms(policy, ref_logps.to(policy.dtype), args.beta)
        loss = losses.sum()
        if model.config.use_moe:  # the routers keep their balance loss (per pair, as the engine normalises by pairs)
            loss = loss + aux * losses.numel()
        return loss, {"reward_chosen": chosen.detach().sum(), "reward_rejected": rejected.detach().sum(),
                              "reward_margin": margin.detach().sum(), "accuracy": (margin > 0).float().sum()}

    return trainer.fit(model, data, collate_fn=collate, loss_fn=loss_fn, count_fn=lambda b: b["index"].numel(),
                       eval_dataset=held)
