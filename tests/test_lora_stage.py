"""Stage 5, 5-LoRA.py: only the adapter trains and is saved, the base stays bit-identical, held-out domain loss falls,
--merge equals base + adapter, and 2 gloo ranks train the same adapter as one process."""

import json

import pytest
import torch
from helpers import ROOT, load_script, random_ids, tiny_args, torchrun_2
from safetensors.torch import load_file

from dataset import read_jsonl
from demo import metrics
from model import MicroLMForCausalLM
from model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, from_adapter

lora = load_script("5-LoRA.py")
pretrain = load_script("1-pretrain.py")
DEMO = ROOT / "demo" / "data"


@pytest.fixture
def base(tmp_path):
    pretrain.main(tiny_args(tmp_path, DEMO / "pretrain_eval.jsonl", "--max_steps", 2, "--max_seq_len", 32,
                            "--batch_size", 2))
    return tmp_path / "out" / "pretrain"


@pytest.mark.e2e
def test_lora_trains_only_the_adapter_and_leaves_the_base_bit_identical(tmp_path, base, tokenizer):
    held_out = read_jsonl(DEMO / "lora_medical_eval.jsonl")
    before = metrics.reply_loss(MicroLMForCausalLM.from_pretrained(base), tokenizer, held_out)["loss"]
    summary = lora.main(tiny_args(tmp_path, DEMO / "lora_medical.jsonl", "--from", base, "--max_steps", 30,
                                  "--batch_size", 16, "--learning_rate", 1e-2, "--lora_rank", 8, "--merge"))
    out = tmp_path / "out" / "lora"
    assert summary["last_loss"] < summary["first_loss"] - 0.5

    # the adapter file holds exactly the A/B matrices of 7 projections x 2 layers, nothing of the base
    tensors = load_file(out / ADAPTER_WEIGHTS)
    assert len(tensors) == 2 * 7 * 2
    assert all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    assert all(v.abs().sum() > 0 for k, v in tensors.items() if ".lora_B." in k)  # every B left its zero init
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (8, 32, "LORA")
    assert cfg["base_model_name_or_path"] == str(base.resolve())

    # the trained model's own base tensors (the engine's resume checkpoint holds all of them) equal the starting
    # checkpoint's bit for bit: only the adapter moved
    trained, start = load_file(out / "resume" / "model.safetensors"), load_file(base / "model.safetensors")
    tied = {"model.embed_tokens.weight": "lm_head.weight", "lm_head.weight": "model.embed_tokens.weight"}
    for k, v in start.items():  # a tied tensor may be stored under either of its names
        assert torch.equal(trained[k if k in trained else tied[k]], v), k
    assert len([k for k in trained if "lora_" not in k]) == len(start)

    # base + adapter, the base found through the adapter's own config
    tuned = from_adapter(out)

    # held-out medical questions: the reference replies got much more likely
    after = metrics.reply_loss(tuned, tokenizer, held_out)["loss"]
    assert after < before - 0.5, (before, after)

    # --merge wrote a plain checkpoint whose outputs equal base + adapter
    merged = MicroLMForCausalLM.from_pretrained(out / "merged").eval()
    x = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, tuned.eval()(x).logits, atol=1e-5, rtol=1e-4)


def test_missing_base_names_the_path_and_the_stage_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"out/dpo.*4-RLHF\.py"):
        lora.main(tiny_args(tmp_path, DEMO / "lora_medical.jsonl", "--max_steps", 1))


def test_adapter_without_its_base_is_a_clear_error(tmp_path, base):
    lora.main(tiny_args(tmp_path, DEMO / "lora_medical_eval.jsonl", "--from", base, "--max_steps", 1,
                        "--batch_size", 4))
    out = tmp_path / "out" / "lora"
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "moved")
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="moved"):
        from_adapter(out)
    assert from_adapter(out, base=base) is not None  # an explicit base still works


@pytest.mark.slow
def test_lora_under_two_gloo_ranks_matches_one_process(tmp_path, base):
    common = ["--from", base, "--max_steps", 3, "--learning_rate", 1e-2, "--max_seq_len", 64, "--save_interval", 100]
    torchrun_2("5-LoRA.py", tiny_args(tmp_path / "ddp", DEMO / "lora_medical_eval.jsonl", *common, "--batch_size", 2))
    lora.main(tiny_args(tmp_path / "one", DEMO / "lora_medical_eval.jsonl", *common, "--batch_size", 4))
    a = load_file(tmp_path / "ddp/out/lora" / ADAPTER_WEIGHTS)
    b = load_file(tmp_path / "one/out/lora" / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max(a[k].abs().max().item() for k in a if ".lora_B." in k) > 1e-3  # they did train


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [0, 1])
def test_resume_with_dropout_is_bit_identical_to_an_uninterrupted_run(tmp_path, base, workers):
    """LoRA dropout draws from the global RNG every step: a resumed run must restore that stream exactly and draw
    nothing extra for the DataLoader (iter(loader) once took a seed from it; issue: resume RNG drift)."""
    common = ("--from", base, "--max_steps", 6, "--batch_size", 4, "--max_seq_len", 64, "--learning_rate", 1e-2,
              "--lora_dropout", 0.3, "--save_interval", 100)

    def run(folder, *extra):  # the later --num_workers overrides tiny_args' 0
        return lora.main(tiny_args(tmp_path / folder, DEMO / "lora_medical_eval.jsonl", *common, *extra,
                                   "--num_workers", workers))

    full = run("a")
    run("b", "--stop_at_step", 3)
    resumed = run("b", "--resume")
    a = load_file(tmp_path / "a/out/lora" / ADAPTER_WEIGHTS)
    b = load_file(tmp_path / "b/out/lora" / ADAPTER_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    assert [v for _, v in resumed["history"]] == [v for _, v in full["history"]]
