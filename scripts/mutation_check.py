"""Does the test suite catch what it claims? Break one behaviour at a time in a temporary copy of the repository and
run the tests that should fail; report which breaks they catch.

    python scripts/mutation_check.py                      # every break (a few minutes each on 2 CPU cores)
    python scripts/mutation_check.py --only rng,kd-t2     # some of them
    python scripts/mutation_check.py --list

Not part of CI. Each break is a single textual replacement that must match exactly once (so a refactoring that
moves the code makes the check say so instead of silently testing nothing); the copy holds the files git tracks.
When a bug is found that the suite missed, add its break here together with the test that catches it.
Exit status 1 if any break survives.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Break:
    name: str
    what: str  # the behaviour that breaks
    path: str
    old: str
    new: str
    tests: list  # pytest node ids / files, with -k expressions after "::-k "


BREAKS = [
    Break("rng", "resume draws a worker seed from the global RNG (dropout/sampling drift after --resume)",
          "trainer/engine.py", "persistent_workers=False, generator=loader_rng)", "persistent_workers=False)",
          ["tests/test_lora_stage.py::-k dropout", "tests/test_reason.py::-k resumed_mid_run"]),
    Break("ddp-scale", "DDP gradients halved (the loss is not multiplied back by the world size)",
          "trainer/engine.py", "loss = loss * W  #", "loss = loss * 1  #",
          ["tests/test_trainer.py::-k raw_gradients"]),
    Break("accum-norm", "accumulation normalises each micro-batch by its own token count",
          "trainer/engine.py", "loss = loss_sum / total.clamp(min=1)", "loss = loss_sum / torch.as_tensor(run.count_fn(b)).clamp(min=1)",
          ["tests/test_trainer.py::-k raw_gradients"]),
    Break("clip", "gradient clipping ignores --grad_clip",
          "trainer/engine.py", 'args.grad_clip or float("inf")', 'float("inf")',
          ["tests/test_trainer.py::-k 'raw_gradients and pretrain'"]),
    Break("scaler-resume", "--resume does not restore the fp16 GradScaler's state",
          "trainer/checkpoint.py", 'if scaler is not None and (Path(path) / "scaler.pt").exists():',
          "if False:", ["tests/test_trainer.py::-k 'mixed_precision and float16'"]),
    Break("decay-groups", "weight decay also applied to embeddings",
          "trainer/engine.py", "p.dim() >= 2 and id(p) not in embeddings", "p.dim() >= 2",
          ["tests/test_trainer.py::-k weight_decay", "tests/test_trainer.py::-k 'raw_gradients and pretrain'"]),
    Break("kd-direction", "KD uses KL(student || teacher)",
          "trainer/kd.py", "kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()",
          "kl = (student_logp.exp() * (student_logp - teacher_logp)).sum()",
          ["tests/test_kd.py::-k reference"]),
    Break("kd-t2", "KD drops the T^2 factor", "trainer/kd.py", "(1 - alpha) * t * t * kl, ce, kl", "(1 - alpha) * kl, ce, kl",
          ["tests/test_kd.py::-k reference"]),
    Break("kd-vocab", "KD cuts a larger teacher vocabulary at the wrong end (ids no longer line up)",
          "trainer/kd.py", "use_cache=False).logits[..., :vocab]", "use_cache=False).logits[..., -vocab:]",
          ["tests/test_kd.py::-k larger"]),
    Break("moe-balance", "MoE balance loss counts each token's k slots k times",
          "model/model.py", "float().mean(dim=(0, 1))", "float().sum(dim=1).mean(dim=0)",
          ["tests/test_model.py::-k hand"]),
    Break("packing-tail", "packing drops the partial last block",
          "dataset/pretrain.py", "math.ceil(len(self.tokens) / max_seq_len)", "len(self.tokens) // max_seq_len",
          ["tests/test_datasets.py::-k partial"]),
    Break("swap", "the checkpoint swap deletes the previous folder before the new one is in place",
          "trainer/checkpoint.py", "        os.replace(final, old)\n", "        shutil.rmtree(final)\n",
          ["tests/test_reliability.py::-k fault_inside"]),
    Break("marker", "a resume folder is used without its completeness marker",
          "trainer/checkpoint.py", "if (path / COMPLETE).exists():", "if path.exists():",
          ["tests/test_reliability.py::-k completeness_marker"]),
    Break("medical-shuffle", "data_process medical ignores --seed (rows keep one fixed order)",
          "data_process.py", "random.Random(seed).shuffle(rows)", "rows.reverse()",
          ["tests/test_data_process.py::-k length_filter"]),
    Break("medical-length", "data_process medical drops rows exactly at --min_len / --max_len",
          "data_process.py", "not min_len <= len(ask) + len(answer) <= max_len",
          "not min_len < len(ask) + len(answer) < max_len", ["tests/test_data_process.py::-k length_filter"]),
    Break("server-lock", "the server lets two non-streamed requests into the engine at once",
          "scripts/serve_openai_api.py", "        with self.lock:\n            return self.engine.reply(",
          "        if True:\n            return self.engine.reply(", ["tests/test_server.py::-k lock_lets"]),
    Break("server-leak", "the server keeps a tensor of every request",
          "scripts/serve_openai_api.py", "        with self.lock:\n            return self.engine.reply(",
          "        with self.lock:\n            self.__dict__.setdefault('kept', []).append(__import__('torch').ones(8))\n"
          "            return self.engine.reply(", ["tests/test_server.py::-k no_tensors"]),
    Break("chat-header", "chat labels include the template's role header",
          "dataset/chat.py", "start = len(_common_prefix(turn, self.header))", "start = 0",
          ["tests/test_chat_format.py"]),
    Break("layers", "a model module imports the trainer (an upward import, hidden inside a function)",
          "model/families.py", "\ndef is_checkpoint(", "\ndef _upward():\n    from trainer import engine  # noqa: F401\n\n\ndef is_checkpoint(",
          ["tests/test_layers.py::-k higher_layer"]),
    Break("method-defaults", "GRPO starts from the SFT model instead of the reasoning model",
          "6-reason.py", '"grpo": {"init_from": "reason"', '"grpo": {"init_from": "sft"',
          ["tests/test_layers.py::-k resolves"]),
    Break("prepare-window", "the engine never calls the RL hook (no rollouts are sampled into the batches)",
          "trainer/engine.py", "        if run.prepare_window is not None:\n            run.prepare_window(micro)\n",
          "", ["tests/test_trainer.py::-k prepare_window"]),
    Break("window-scale", "a token-level RL loss is normalised by the first micro-batch's tokens only",
          "trainer/rl.py", 'for r in rollouts]).sum(0)', 'for r in rollouts[:1]]).sum(0)',
          ["tests/test_trainer.py::-k rollout_loss_scale"]),
    Break("dpo-schema", "DPO rows are checked as SFT chats (every preference pair rejected)",
          "dataset/dpo.py", "check_row = staticmethod(check_preference)", "pass",
          ["tests/test_dpo.py::-k different_prompts"]),
    Break("corpus-held-out", "held-out corpus documents are trained on too",
          "dataset/corpus/build.py", "if not (natural and i % HELD_OUT_EVERY == 0)]", "]",
          ["tests/test_corpus.py::-k holds_documents_out"]),
    Break("help-defaults", "--help stops showing the defaults (docs/flags.md would silently lose them)",
          "common/cli.py", 'return f"{help} {_default_text(action)}"', "return help",
          ["tests/test_docs.py::-k flags_page or shows_its_default"]),
    Break("docs-flags", "the docs check accepts any flag in a documented command",
          "scripts/check_docs.py", 'and a.split("=")[0] not in known]', "and False]",
          ["tests/test_docs.py::-k checks_see"]),
    Break("docs-links", "the docs check accepts a dead link or a missing image",
          "scripts/check_docs.py", "if not (path.parent / target).exists():", "if False:",
          ["tests/test_docs.py::-k checks_see"]),
    Break("method-flag-given", "a written-out flag equal to the stage's default loses to the method's (--from dpo)",
          "trainer/engine.py", "        if name in unset:\n            setattr(args, name, value)",
          "        if True:\n            setattr(args, name, value)",
          ["tests/test_layers.py::-k user_gives"]),
    Break("save-as-name", "--from NAME does not find a --save_as NAME run under out/",
          "common/resolve.py", " or (Path(out_root) / path).exists())", ")",
          ["tests/test_trainer.py::-k starts_from_pretrain"]),
    Break("recipe-chain", "the recipe starts a stage whose starting checkpoint nothing makes",
          "scripts/recipe.sh", '[ ! -e "$OUT/$from" ]; then', "false; then",
          ["tests/test_docs.py::-k refuses"]),
    Break("stats-tokens", "data_process stats counts the sample's tokens as the file's",
          "data_process.py", '"tokens_estimate": round(n_lines *', '"tokens_estimate": round(len(rows) *',
          ["tests/test_data_process.py::-k percentiles"]),
    Break("dr-grpo-std", "Dr. GRPO's advantages are still divided by the group's std",
          "trainer/rl.py", "if scale else centred", "if True else centred",
          ["tests/test_reason.py::-k group_advantages"]),
    Break("agent-ignored-flags", "agentic RL silently ignores GRPO's --reward / --thinking_ratio",
          "trainer/agent.py", "    if ignored:\n        raise SystemExit(", "    if False:\n        raise SystemExit(",
          ["tests/test_rl.py::-k agent_stage_runs"]),
    Break("doc-mask", "packed documents attend across their boundaries (plain causal mask)",
          "model/model.py", "return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]",
          "return causal[None, None].expand(position_ids.shape[0], 1, T, T)",
          ["tests/test_packing.py"]),
    Break("pack-positions", "packed conversations' positions run on instead of restarting",
          "dataset/sft.py", 'row["position_ids"] = torch.cat([torch.arange(len(rows[i]["input_ids"])) for i in b])',
          'row["position_ids"] = torch.arange(sum(len(rows[i]["input_ids"]) for i in b))',
          ["tests/test_packing.py::-k 'alone or teacher'"]),
    Break("kd-teacher-packed", "white-box KD's teacher reads packed rows as one document",
          "trainer/kd.py", "teacher(input_ids=ids, position_ids=positions, use_cache=False)",
          "teacher(input_ids=ids, use_cache=False)", ["tests/test_kd.py::-k packed"]),
    Break("pretrain-doc-starts", "--doc_mask misses the document starts after eos",
          "dataset/pretrain.py", "starts[1:] = input_ids[:-1] == self.tokenizer.eos_token_id", "pass",
          ["tests/test_packing.py::-k doc_mask"]),
    Break("pack-empty-rows", "packed batches stop counting the conversations that teach nothing",
          "trainer/engine.py", "run.empty_rows += b[\"empty_rows\"]", "pass",
          ["tests/test_reliability.py::-k truncated_away"]),
    Break("pack-first-label", "a packed conversation's first label becomes the previous conversation's target",
          "dataset/sft.py", 'torch.cat([F.pad(rows[i]["labels"][1:], (1, 0), value=-100) for i in b])',
          'torch.cat([rows[i]["labels"] for i in b])', ["tests/test_packing.py::-k first_label"]),
    Break("rope-inference-tensor", "RoPE tables grown during a decode become inference tensors",
          "model/model.py", "with torch.inference_mode(False):  # buffers", "if True:  # buffers",
          ["tests/test_inference.py::-k rope_tables"]),
    Break("bpb-windows", "the quality benchmark's windows skip a token between them",
          "scripts/bench_quality.py", "len(ids) - 1, 1), seq_len - 1))", "len(ids) - 1, 1), seq_len))",
          ["tests/test_bench_quality.py::-k windows"]),
    Break("generate-inference-tensor", "generate() hands back an inference tensor that RL cannot train on",
          "inference/engine.py", "    return out.clone()  # an ordinary tensor", "    return out  # an ordinary tensor",
          ["tests/test_inference.py::-k trained_on"]),
    Break("template-fallback", "a field the chat template cannot render is dropped from training rows",
          "dataset/chat.py", "messages, tools = with_fallbacks(messages, tools, self.support)", "pass",
          ["tests/test_chat_format.py::-k 'fields or fallbacks'"]),
    Break("inference-fallback", "chat prompts drop what the template cannot render (unlike training)",
          "inference/engine.py",
          "messages, tools = with_fallbacks(messages, tools or None, self.support)",
          "tools = tools or None", ["tests/test_chat_format.py::-k fallbacks"]),
    Break("lost-fields", "reasoning a template drops on some turns is not counted",
          "dataset/chat.py", "reasoning += bool(r) and r not in text", "reasoning += 0",
          ["tests/test_chat_format.py::-k 'counted or rewrites'"]),
    Break("lost-named", "rows that lose a field are not named with their file:line",
          "dataset/sft.py", '    if lost is not None and any(lost):\n        warn_row(', '    if False:\n        warn_row(',
          ["tests/test_chat_format.py::-k counted_and_named"]),
    Break("lost-run-count", "the run's summary forgets the rows that lost a field",
          "trainer/engine.py", 'run.lost += b["lost"]', "pass", ["tests/test_trainer.py::-k real_tokens"]),
    Break("real-tokens", "tokens and tokens/s count padding",
          "trainer/engine.py", 'run.tokens += b["n_tokens"][0]', 'run.tokens += b["n_tokens"][1]',
          ["tests/test_trainer.py::-k real_tokens"]),
    Break("max-steps-epochs", "--max_steps beyond --epochs is silently capped",
          "trainer/engine.py", "if args.max_steps > epochs * per_epoch:", "if False:",
          ["tests/test_trainer.py::-k real_tokens"]),
    Break("autocast-applied", "the mixed-precision autocast is never entered (a run trains in fp32)",
          "trainer/engine.py", "else torch.autocast(self.device.type, dtype=self.dtype))", "else nullcontext())",
          ["tests/test_trainer.py::-k 'default_dtype or (mixed_precision and bfloat16)'"]),
    Break("auto-dtype", "--dtype auto trains in fp32 where the device has a fast dtype",
          "trainer/engine.py", "args.dtype = {v: k for k, v in DTYPES.items()}[fast_dtype(self.device)]",
          'args.dtype = "float32"', ["tests/test_trainer.py::-k default_dtype"]),
    Break("rl-prompt-pad", "RL prompts are right-padded while their mask says left",
          "dataset/reason.py", 'input_ids[i, n - len(r["prompt_ids"]):] = r["prompt_ids"]',
          'input_ids[i, :len(r["prompt_ids"])] = r["prompt_ids"]', ["tests/test_rl.py::-k padded_prompts"]),
    Break("rl-logps-mask", "RL log-probs ignore the prompts' padding mask",
          "trainer/rl.py", "out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep",
          "out = model(input_ids=input_ids, attention_mask=None, logits_to_keep",
          ["tests/test_rl.py::-k padded_prompts"]),
    Break("prompt-keeps-start", "an over-long RL prompt keeps its start and loses the question",
          "dataset/reason.py", "ids = ids[-self.max_prompt_len:]", "ids = ids[:self.max_prompt_len]",
          ["tests/test_rl.py::-k padded_prompts"]),
    Break("prompt-cut-silent", "an over-long RL prompt is cut without a word",
          "dataset/reason.py", 'warn_row("long prompts",', '(lambda *a: None)("long prompts",',
          ["tests/test_rl.py::-k padded_prompts"]),
    Break("server-context-cap", "the server lets max_tokens take the whole of a small model's context",
          "scripts/serve_openai_api.py", "max_tokens_cap = min(max_tokens_cap, engine.context // 2)",
          "max_tokens_cap = max_tokens_cap", ["tests/test_server.py::-k limits_follow"]),
    Break("sample-first-rows", "data_process stats samples the first rows of a file, not a uniform sample",
          "data_process.py", "j = rng.randrange(seen)", "j = n", ["tests/test_data_process.py::-k samplers"]),
    Break("corpus-sample-first", "the tokenizer corpus samples the first rows of a file",
          "dataset/corpus/jsonl_sample.py", "key = rng.random()  #", "key = index + 0 * rng.random()  #",
          ["tests/test_data_process.py::-k samplers"]),
    Break("penalty-negative", "the repetition penalty makes a seen token with a negative logit more likely",
          "inference/engine.py", "torch.where(logits < 0, logits * s.repetition_penalty, logits / s.repetition_penalty)",
          "logits / s.repetition_penalty", ["tests/test_inference.py::-k logit_processor"]),
    Break("top-k-short", "top-k keeps k - 1 tokens",
          "inference/engine.py", "dim=-1).values[:, -1:]", "dim=-1).values[:, -2:-1]",
          ["tests/test_inference.py::-k logit_processor"]),
    Break("temperature-ignored", "sampling ignores the temperature",
          "inference/engine.py", "logits = logits / s.temperature", "logits = logits",
          ["tests/test_inference.py::-k logit_processor"]),
    Break("stop-hold", "a stop string split over tokens leaks into the reply",
          "inference/engine.py", "hold = max((len(s) for s in stop), default=1) - 1", "hold = 0",
          ["tests/test_inference.py::-k stop_string"]),
    Break("top-p-keep-one", "top_p 0 leaves no token to sample (a 500 from the server)",
          "inference/engine.py", "        drop[:, -1] = False\n", "", ["tests/test_inference.py::-k logit_processor"]),
    Break("server-top-p", "the server validates top_p and then drops it",
          "scripts/serve_openai_api.py", 'top_p=req["top_p"] if req["temperature"] > 0 else 1.0', "top_p=1.0",
          ["tests/test_server.py::-k request_forms"]),
    Break("server-text-parts", "OpenAI's list-of-text-parts content becomes empty",
          "scripts/serve_openai_api.py", 'return "".join(p["text"] for p in content)', 'return ""',
          ["tests/test_server.py::-k request_forms"]),
    Break("server-max-completion", "max_completion_tokens (OpenAI's newer name) is ignored",
          "scripts/serve_openai_api.py", 'if req.get("max_completion_tokens") is not None:', "if False:",
          ["tests/test_server.py::-k request_forms"]),
    Break("calls-without-tools", "a <tool_call> written with no tools offered becomes a tool call",
          "inference/engine.py", "return self.OPEN if self.tools else self.OPEN[:3]", "return self.OPEN",
          ["tests/test_inference.py::-k no_tools_were_offered"]),
    Break("epoch-reshuffle", "every epoch replays the first epoch's order",
          "trainer/engine.py", "g = torch.Generator().manual_seed(self.seed + self.epoch)",
          "g = torch.Generator().manual_seed(self.seed)", ["tests/test_trainer.py::-k new_order"]),
    Break("group-by-length-unused", "--group_by_length is parsed but never reaches the sampler",
          "trainer/engine.py", 'lengths = getattr(dataset, "lengths", None) if args.group_by_length else None',
          "lengths = None", ["tests/test_trainer.py::-k group_by_length_is_opt_in"]),
    Break("min-lr-ratio", "--min_lr_ratio is ignored (the floor stays at the default)",
          "trainer/engine.py", "run.warmup, args.min_lr_ratio)", "run.warmup, 0.1)",
          ["tests/test_trainer.py::-k schedule_flags"]),
    Break("warmup-default", "the default warmup is 10% of the run, not 1%",
          "trainer/engine.py", "max(1, total_steps // 100)", "max(1, total_steps // 10)",
          ["tests/test_trainer.py::-k schedule_flags"]),
    Break("eval-both", "--eval_data with --eval_split silently drops the split",
          "trainer/engine.py", "        if args.eval_data and args.eval_split:\n            raise SystemExit(",
          "        if False:\n            raise SystemExit(", ["tests/test_trainer.py::-k refused"]),
    Break("token-cache-tokenizer", "a pretraining token cache is reused under another tokenizer",
          "dataset/pretrain.py", ":{tokenizer_fingerprint(tokenizer)}:v2", ":v2",
          ["tests/test_datasets.py::-k belongs_to_its_tokenizer"]),
    Break("dpo-stale-ref", "--precompute_ref reuses an earlier run's reference scores without --resume",
          "trainer/dpo.py", "if args.resume and path.exists():", "if path.exists():",
          ["tests/test_dpo.py::-k precomputed_reference"]),
    Break("lora-dropout", "--lora_dropout is ignored",
          "model/lora.py", "self.lora_dropout = nn.Dropout(dropout)", "self.lora_dropout = nn.Dropout(0.0)",
          ["tests/test_lora.py::-k lora_dropout"]),
    Break("chat-seed", "eval_model.py --seed does not make sampled replies repeat",
          "eval_model.py", "        if args.seed is not None:\n            torch.manual_seed(args.seed)",
          "        if False:\n            torch.manual_seed(args.seed)", ["tests/test_eval_model.py::-k seed"]),
    Break("chat-old-thinking", "the chat sends earlier turns' thinking back in every prompt",
          "eval_model.py", 'new[-1].pop("reasoning_content", None)', "pass", ["tests/test_eval_model.py::-k seed"]),
    Break("chat-history", "the chat fails on its second turn while fewer turns than --history were said",
          "eval_model.py", "starts[-min(self.args.history, len(starts))]", "starts[-self.args.history]",
          ["tests/test_eval_model.py::-k seed"]),
    Break("ddp-token-totals", "under DDP the token totals are rank 0's times the world size",
          "trainer/engine.py", "            dist.all_reduce(counts)\n", "",
          ["tests/test_trainer.py::-k ddp_two_ranks_match"]),
    Break("prompt-lost-silent", "an RL prompt whose template drops a field is not named",
          "dataset/reason.py", "report_lost(self.rows, i, lost_fields(messages, text))", "pass",
          ["tests/test_chat_format.py::-k rl_prompts_that_lose"]),
    Break("tool-results-merge", "consecutive tool results become separate user turns in the fallback",
          "dataset/chat.py", "if out and out[-1] is results:", "if False:",
          ["tests/test_chat_format.py::-k fallbacks"]),
    Break("tools-system-turn", "tools are dropped when a row has no system message to carry them",
          "dataset/chat.py", 'out.insert(0, {"role": "system", "content": tools_block(tools)})', "pass",
          ["tests/test_chat_format.py::-k fallbacks"]),
    Break("fsdp-eval-fill", "--fsdp's lockstep held-out fillers counted as real rows",
          "trainer/evaluation.py", "part = part * 0", "part = part * 1",
          ["tests/test_fsdp.py::-k two_sharded_ranks"]),
    Break("fsdp-stale-rollout", "--fsdp samples rollouts from the policy gathered before the last update",
          "trainer/engine.py", "            self.sampling_copy.invalidate()", "            pass",
          ["tests/test_fsdp.py::-k grpo"]),
    Break("fsdp-save-shards", "--fsdp saves the model folder from the shards instead of the gathered weights",
          "trainer/engine.py", "model = run.skeleton.build(weights) if self.env.is_main else None",
          "model = run.model if self.env.is_main else None", ["tests/test_fsdp.py::-k torn"]),
    Break("dcp-stale-tmp", "a sharded save keeps what a torn save left in resume.tmp/",
          "trainer/checkpoint.py", "if is_main and tmp.exists():", "if False:", ["tests/test_fsdp.py::-k torn"]),
    Break("plan-8bit", "the planner forgets the 8-bit moments' block scales",
          "trainer/optim.py", "return 2 * (numel + 4 * (numel // BLOCK_8BIT))", "return 2 * numel",
          ["tests/test_fsdp.py::-k lean_optimizers"]),
    Break("plan-attn", "the planner leaves the attention's saved output out of the activations",
          "scripts/plan_memory.py", "compute = 2 * h + 3 * q + 2 * kv", "compute = 2 * h + 2 * q + 2 * kv",
          ["tests/test_fsdp.py::-k planner"]),
    Break("vllm-sync-once", "the vLLM engine syncs the policy's weights only before the first rollout",
          "trainer/rollout.py", "if self.synced_at is not None and self.trainer.updates - self.synced_at < "
          "self.args.sync_every:", "if self.synced_at is not None:", ["tests/test_vllm.py::-k weights_equal"]),
    Break("vllm-untied-head", "a sync leaves out the tied lm_head (vLLM keeps the old one after an in-place reload)",
          "trainer/rollout.py", "for k, v in state.items()}", "for k, v in state.items() if k != 'lm_head.weight'}",
          ["tests/test_vllm.py::-k weights_equal"]),
    Break("tis-uncapped", "the engine/trainer importance weights are not truncated at --tis_cap",
          "trainer/rl.py", "delta.exp().clamp(max=self.args.tis_cap)", "delta.exp()",
          ["tests/test_rollout.py::-k truncated"]),
    Break("mini-batch-norm", "PPO's mini-batches are normalised by the tokens of the whole rollout batch",
          "trainer/rl.py", "size = len(micro) // self.mini_batches", "size = len(micro)",
          ["tests/test_trainer.py::-k rollout_loss_scale"]),
    Break("ppo-no-early-stop", "--early_stop_kl never stops a rollout batch's passes",
          "trainer/ppo.py", "stop = bool(drift[0] / drift[1].clamp(min=1) > self.args.early_stop_kl)", "stop = False",
          ["tests/test_rollout.py::-k ppo_mini"]),
    Break("sft-system-ignored", "--system_prompt_ratio injects no system prompt",
          "dataset/sft.py", 'if row_chooses(f"{self.seed}:system", i, self.system_prompt_ratio):', "if False:",
          ["tests/test_rollout.py::-k system_prompts"]),
    Break("repetition-words", "the repetition penalty reads a run of CJK characters as one word",
          "trainer/rewards.py", r'_UNIT = re.compile(r"[^\W\u3400-\u9fff]+|[\u3400-\u9fff]|[^\w\s]")',
          r'_UNIT = re.compile(r"\w+|[^\w\s]")', ["tests/test_rollout.py::-k minimind_shaping"]),
    Break("remote-rm-unclipped", "a get_score reward model's scores are not clipped to +-reward_clip",
          "trainer/rewards.py", "return [max(-self.clip, min(self.clip, s)) for s in scores] if self.clip else "
          "list(scores)", "return list(scores)", ["tests/test_rollout.py::-k remote_code_reward_model_scores"]),
    Break("rm-reads-think", "a reward model scores the think block along with the reply",
          "trainer/rewards.py", '{"role": "assistant", "content": split_think(c)[1]}]',
          '{"role": "assistant", "content": c}]',
          ["tests/test_rollout.py::-k remote_code_reward_model_scores"]),
    Break("careless-traces", "the demo's reasoning SFT traces never skip an event (GRPO's two habits are gone)",
          "demo/curriculum.py", "traced = steps[:-1] if careless else steps", "traced = steps",
          ["tests/test_demo_data.py::-k shipped_files_equal"]),
    Break("quiet-start", "transformers imports torchao at start-up again (its CUDA-kernel and pytree notices on stderr)",
          "model/quiet.py", "import_utils.is_torchao_available = transformers.utils.is_torchao_available = ",
          "_unused = ", ["tests/test_quiet_start.py"]),
    Break("sampler-zero", "the sampler can draw a token of probability 0 (a top-k / top-p cut one)",
          "inference/engine.py", "torch.searchsorted(cdf, target, right=True)", "torch.searchsorted(cdf, target)",
          ["tests/test_inference.py::-k never_lands"]),
    Break("rl-logps-shift", "RL log-probs at temperature 1 read the loss one position early",
          "trainer/rl.py", "return -out.loss[:, -n_completion:], ", "return -out.loss[:, -n_completion - 1:-1], ",
          ["tests/test_rl.py::-k loss_path"]),
    Break("ce-skip-align", "the loss of the labelled positions lands on the wrong positions",
          "model/model.py", "out.masked_scatter(keep, ", "out.masked_scatter(keep.roll(1), ",
          ["tests/test_model.py::-k skips_only_unlabelled"]),
]


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def pytest_args(spec: str) -> list:
    if "::-k " in spec:
        path, expr = spec.split("::-k ", 1)
        return [path, "-k", expr.strip("'")]
    return [spec]


def check(b: Break, timeout: int) -> tuple[str, float]:
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutation-{b.name}-") as tmp:
        tmp = Path(tmp)
        copy_repo(tmp)
        target = tmp / b.path
        text = target.read_text(encoding="utf-8")
        if text.count(b.old) != 1:
            return f"NOT APPLIED ({text.count(b.old)} matches: update this break)", time.time() - t0
        target.write_text(text.replace(b.old, b.new), encoding="utf-8")
        outcomes = []
        for spec in b.tests:  # one pytest run per spec: pytest keeps only the last -k of a command line
            try:
                run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                      *pytest_args(spec)], cwd=tmp, capture_output=True, text=True, timeout=timeout,
                                     env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
            except subprocess.TimeoutExpired:
                return "timeout", time.time() - t0
            if run.returncode == 1:
                return "caught", time.time() - t0
            outcomes.append((run.returncode, (run.stdout.strip().splitlines() or [""])[-1]))
        if all(rc == 0 for rc, _ in outcomes):
            return f"SURVIVED ({'; '.join(last for _, last in outcomes)})", time.time() - t0
        return f"error ({'; '.join(f'rc={rc} {last}' for rc, last in outcomes)})", time.time() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated break names")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per break")
    args = parser.parse_args(argv)
    chosen = [b for b in BREAKS if not args.only or b.name in args.only.split(",")]
    if args.list:
        for b in chosen:
            print(f"{b.name:14} {b.what}  [{b.path}]")
        return 0
    results = []
    for b in chosen:
        verdict, seconds = check(b, args.timeout)
        results.append((b, verdict))
        print(f"{b.name:14} {verdict:10} {seconds:5.0f} s  {b.what}", flush=True)
    caught = sum(v == "caught" for _, v in results)
    print(f"\n{caught} of {len(results)} breaks caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
