"""scripts/bench.py measures what it says: baseline rows are one padded document each, ours are packed full rows from
the same length mix; FLOPs per token count every matmul weight once; a training measurement runs end to end."""

import torch
from helpers import load_script, make_model

bench = load_script("scripts/bench.py")


def test_baseline_pads_one_document_per_row_and_ours_packs_full_rows():
    lo, hi = bench.DOC_TOKENS
    base = bench.make_batches("baseline", 4, 8, 512, 6400)
    ours = bench.make_batches("ours", 4, 8, 512, 6400)
    assert all(b["input_ids"].shape == (8, 512) for b in base + ours)
    per_row = torch.cat([(b["labels"] != -100).sum(1) for b in base])
    assert ((per_row >= lo) & (per_row <= hi)).all()  # one document, the rest padding
    assert (per_row.float().mean() / 512 - (lo + hi) / 2 / 512).abs() < 0.05
    assert all((b["labels"] != -100).all() for b in ours)  # packed: no padding at all
    starts = sum(int((b["input_ids"] == 1).sum()) for b in ours)
    assert 4 * 8 * 512 / hi <= starts <= 4 * 8 * 512 / lo + 1  # documents of the same mix, end to end


def test_flops_per_token_counts_each_matmul_weight_once():
    for preset, tied in [("tiny", True), ("tiny", False), ("tiny-moe", True)]:
        model = make_model(preset, tie_word_embeddings=tied)
        c = model.config
        linears = sum(m.weight.numel() for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and ".experts." not in name and not name.endswith("mlp.gate"))
        if c.use_moe:  # only the routed experts a token goes through, plus the router
            expert = sum(p.numel() for p in model.model.layers[0].mlp.experts[0].parameters())
            linears += c.num_hidden_layers * (c.num_experts_per_tok * expert + c.hidden_size * c.num_experts)
        norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
        attention = 12 * c.num_hidden_layers * c.hidden_size * 128
        # norms are counted as weights (negligible), the embedding lookup is not
        assert model.flops_per_token(128) == 6 * (linears + norms) + attention


def test_a_training_measurement_runs_and_reports_consistent_figures():
    spec = {"preset": "tiny", "mode": "ours", "device": "cpu", "batch_size": 2, "seq_len": 64, "steps": 2}
    ours = bench.train_child(spec)
    base = bench.train_child({**spec, "mode": "baseline", "seq_len": 512})
    assert ours["useful_fraction"] == 1.0 and 0.4 < base["useful_fraction"] < 0.8
    assert base["useful_tokens_per_s"] < base["raw_tokens_per_s"]
    assert ours["raw_tokens_per_s"] == 2 * 64 / ours["step_s"]
    assert all(torch.isfinite(torch.tensor(r["loss_last"])) for r in (ours, base))


def test_grad_checkpoint_mode_trains_the_same_steps():
    spec = {"preset": "tiny", "mode": "ours", "device": "cpu", "batch_size": 2, "seq_len": 64, "steps": 2}
    ours, ckpt = bench.train_child(spec), bench.train_child({**spec, "mode": "ckpt"})
    assert abs(ours["loss_first"] - ckpt["loss_first"]) < 1e-5 and abs(ours["loss_last"] - ckpt["loss_last"]) < 1e-4


def test_decode_measurements_report_the_weight_read_floor_and_int8_tokens():
    spec = {"preset": "tiny", "device": "cpu", "batch_size": 2, "prompt_tokens": 8, "new_tokens": 6, "runs": 1}
    ours, int8 = bench.decode_child({**spec, "mode": "ours"}), bench.decode_child({**spec, "mode": "int8"})
    for r in (ours, int8):
        assert len(r["tokens"]) == 2 and all(len(t) == 6 for t in r["tokens"])
        assert r["weight_read_ms"] > 0 and r["tokens_per_s"] == 12 / r["seconds"]
    model = make_model("tiny")
    n = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    calls = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape))
    bench.weight_read_ms(model, torch.device("cpu"), runs=1)
    assert len(calls) == 2 * n and all(s[0] == 1 for s in calls)  # every weight once per sweep, one row


def test_rollout_mode_samples_through_the_inference_core():
    """`--decode_modes rollout` is the RL rollout path: the same decode loop, sampled at temperature 1 (so its tokens
    are not the greedy ones), every row running the full length."""
    spec = {"preset": "tiny", "device": "cpu", "batch_size": 2, "prompt_tokens": 8, "new_tokens": 12, "runs": 1}
    greedy, sampled = (bench.decode_child({**spec, "mode": mode}) for mode in ("ours", "rollout"))
    assert len(sampled["tokens"]) == 2 and all(len(row) == 12 for row in sampled["tokens"])
    assert sampled["tokens"] != greedy["tokens"] and sampled["tokens_per_s"] > 0
