"""What the tests share: tiny models and stand-ins, data they write, ways to run a stage script (in-process, as 2
gloo ranks). Fixtures live in conftest.py; test files import these helpers, never each other."""

import os
import random
import sys
import threading
import time
import types
from pathlib import Path

import torch

from model import MicroLMConfig, MicroLMForCausalLM

ROOT = Path(__file__).resolve().parents[2]  # the repository (this is tests/helpers/__init__.py)
# processes the tests start import this tree, not another checkout installed with `pip install -e .` (the mutation
# check runs the suite in a copy)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def make_model(preset="tiny", seed=0, **overrides) -> MicroLMForCausalLM:
    torch.manual_seed(seed)
    return MicroLMForCausalLM(MicroLMConfig.from_preset(preset, **overrides)).eval()


def save_random_adapter(folder, base_path, seed=0, std=0.1):
    """A rank-4 LoRA adapter on the tiny preset (seed `seed`) with random B (a fresh one changes nothing), saved
    with `base_path` as its base; returns the folder."""
    from model.lora import apply_lora, save_adapter

    tuned = make_model("tiny", seed=seed)
    apply_lora(tuned, r=4, alpha=8)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return save_adapter(tuned, folder, base_model_name_or_path=str(base_path))


def random_ids(batch, length, seed=0, vocab=6400):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)  # skip the special ids 0-2


def load_script(filename):
    """Import a stage script such as 1-pretrain.py (not a valid module name) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(filename.replace("-", "_").removesuffix(".py"), ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path, rows):
    import json

    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def barely_trained(tmp):
    """A tiny model pretrained one step on the demo text (out/pretrain under tmp): where the RL tests start."""
    load_script("1-pretrain.py").main(tiny_args(tmp, ROOT / "demo" / "data" / "pretrain_eval.jsonl", "--max_steps", 1,
                                                "--max_seq_len", 32, "--batch_size", 2))
    return tmp / "out" / "pretrain"


# the stage runs' precision: fp32 (any CPU); TEST_DTYPE=bfloat16 reruns the learning tests in bf16 where a CPU computes it
TEST_DTYPE = os.environ.get("TEST_DTYPE", "float32")


def tiny_args(tmp_path, data_path, *extra):
    """Command-line flags for a fast, deterministic CPU run of a stage script."""
    return ["--data_path", str(data_path), "--out_dir", str(tmp_path / "out"), "--preset", "tiny",
            "--image_dir", str(tmp_path / "images"), "--num_workers", "0", "--dtype", TEST_DTYPE,
            "--log_interval", "1", *map(str, extra)]


def torchrun_2(script, argv):
    """Run a stage script as 2 gloo ranks: `torchrun --standalone --nproc_per_node 2 <script> <argv>`."""
    import os
    import subprocess

    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / script), *map(str, argv)],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300)


def max_weight_diff(folder_a, folder_b) -> float:
    from safetensors.torch import load_file

    a, b = load_file(Path(folder_a) / "model.safetensors"), load_file(Path(folder_b) / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


class ScriptedLM(torch.nn.Module):
    """Stands in for a trained causal LM under the inference core's decode loop: at each prefill every (left-padded)
    prompt gets its reply from `script(prompt text) -> reply`; the reply, then eos, then junk that must be ignored,
    come out one token per step with certainty (at any temperature). It records the prompts, can sleep per step,
    and counts how many prefills were ever in progress at once (a reply is in progress until its eos)."""

    def __init__(self, tokenizer, script, delay=0.0):
        super().__init__()
        self.config = make_model("tiny").config
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device and dtype to report
        self.tokenizer, self.script, self.delay = tokenizer, script, delay
        self.prompts, self.rows, self.k, self.in_progress, self.most_at_once = [], [], 0, 0, 0
        self.guard = threading.Lock()
        self.eval()  # a caller that measures must not leave it in training mode (asserted below)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        assert not self.training
        eos = self.tokenizer.eos_token_id
        with self.guard:
            if input_ids.size(1) > 1:  # a prefill: new replies start
                mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
                assert mask[:, -1].all(), "prompts must be left-padded"
                self.rows, self.k = [], 0
                for ids, m in zip(input_ids, mask):
                    prompt = self.tokenizer.decode(ids[m.bool()], skip_special_tokens=False)
                    self.prompts.append(prompt)
                    reply = self.tokenizer(self.script(prompt), add_special_tokens=False)["input_ids"]
                    self.rows.append(reply + [eos] + reply)
                self.in_progress += 1
                self.most_at_once = max(self.most_at_once, self.in_progress)
            else:
                self.k += 1
            tokens = [row[min(self.k, len(row) - 1)] for row in self.rows]
            if self.k == max(row.index(eos) for row in self.rows):  # the last row ends now
                self.in_progress -= 1
        if self.delay:
            time.sleep(self.delay)
        logits = torch.full((input_ids.size(0), 1, self.config.vocab_size), float("-inf"))
        logits[torch.arange(len(tokens)), 0, torch.tensor(tokens)] = 0.0
        return types.SimpleNamespace(logits=logits)


def last_turn(prompt: str) -> str:
    """The text of a rendered prompt's last user or tool turn (tool results without their tags)."""
    turn = prompt.rsplit("<|im_start|>", 2)[-2].split("<|im_end|>")[0]
    body = turn.split("\n", 1)[1] if "\n" in turn else ""
    return body.replace("<tool_response>\n", "").replace("\n</tool_response>", "").strip()


def held_out_mean_reward(path, tokenizer, reward, n=16) -> float:
    """Mean `reward(reply, None)` of 4 replies each to the first n held-out demo word problems, sampled with a fixed
    seed by transformers' generate() (not the inference core the RL stages sample with) from the checkpoint `path`."""
    from dataset import read_jsonl
    from demo import metrics

    held_out = [metrics.split_item(x)[0] for x in read_jsonl(ROOT / "demo/data/reason_eval.jsonl")[:n]]
    model = MicroLMForCausalLM.from_pretrained(path).eval()
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in held_out]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, max_new_tokens=32, num_return_sequences=4, top_k=0,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    replies = tokenizer.batch_decode(out[:, enc["input_ids"].size(1):], skip_special_tokens=True)
    return sum(reward(r, None) for r in replies) / len(replies)


def pretrain_rows(n=300, seed=0):
    rng = random.Random(seed)
    subjects = ["北京", "巴黎", "The cat", "The dog", "小明", "Alice"]
    facts = ["是一个城市。", "喜欢吃鱼。", " likes to sleep.", " runs fast.", "每天学习。", " reads books."]
    return [{"text": "".join(rng.choice(subjects) + rng.choice(facts) for _ in range(rng.randint(2, 12)))}
            for _ in range(n)]


def sft_rows(n=64, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        conv = [{"role": "user", "content": f"{a}加{b}等于多少？"},
                {"role": "assistant", "content": f"{a}加{b}等于{a + b}。" + "好的。" * rng.randint(0, 6)}]
        if rng.random() < 0.3:
            conv += [{"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "不客气！"}]
        rows.append({"conversations": conv})
    return rows


# a tiny stock transformers config (the import/export tests)
STOCK_TINY = dict(vocab_size=6400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)


def stock_model(family, **overrides):
    """A small random stock transformers model of `family`, norms and biases away from their init so that a part
    left out of the import would show in the logits."""
    import transformers

    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe"}
    kwargs = {**STOCK_TINY, **{"qwen3": dict(head_dim=32),  # explicit head_dim != hidden / heads
                         "llama": dict(tie_word_embeddings=True,
                                       rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                                            original_max_position_embeddings=32)),
                         "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
                         "qwen3_moe": dict(moe_intermediate_size=48, num_experts=4, num_experts_per_tok=1,
                                           norm_topk_prob=False)}.get(family, {}), **overrides}
    config = getattr(transformers, f"{names[family]}Config")(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, f"{names[family]}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def assert_same_model(ours, reference, atol=1e-4, length=48):
    """Logits within atol on sequences past YaRN's original length, and the same greedy continuation."""
    ids = random_ids(2, length, seed=3)
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() <= atol
        greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids[:, :6], **greedy), reference.generate(ids[:, :6], **greedy))
