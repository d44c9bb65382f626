"""Chat with any stage's checkpoint, streamed token by token.

    python eval_model.py                         # out/sft, interactive; /clear forgets the history, /quit ends
    python eval_model.py --stage reason          # the think part is shown dimmed; --hide_think hides it
    python eval_model.py --stage lora            # base + the adapter in out/lora
    python eval_model.py --model_path some/hf_folder --adapter out/lora
    python eval_model.py --stage pretrain        # a pretrained model continues raw text (no chat template)
    python eval_model.py --auto                  # answer the built-in test questions and exit
    python eval_model.py --prompts questions.txt --temperature 0 --show_speed

Sampling: --temperature (0 = greedy) --top_p --top_k --repetition_penalty --max_new_tokens --seed.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import model as _registers_microlm  # noqa: F401  (AutoModelForCausalLM must know our model type)
from model import TOKENIZER_DIR
from model.lora import from_adapter, is_adapter_dir, load_adapter
from trainer.checkpoint import STAGE_SCRIPTS, resolve_checkpoint
from trainer.distributed import fast_dtype

TEST_PROMPTS = ["你好，请介绍一下你自己。", "中国的首都是哪里？", "3加5等于几？", "What color is the sky?",
                "小明有3个苹果，又买了4个，现在有几个？", "我最近一直咳嗽，应该挂什么科？"]
DIM, RESET = "\033[2m", "\033[0m"


def compile_decoding(model):
    """Decode with a torch.compile'd step on a pre-allocated (static) KV cache: transformers' generate() compiles the
    forward once it is handed a static cache (decode_cache) and a compile config. The first reply of each cache size
    pays for compilation (tens of seconds)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    model.generation_config.compile_config = config
    return model


def decode_cache(model, n_tokens: int, bucket: int = 256) -> dict:
    """generate() kwargs: after compile_decoding, a StaticCache rounded up to a multiple of `bucket` positions, so the
    compiled step is reused across prompt lengths (sized exactly, every new length would recompile); else nothing."""
    if model.generation_config.compile_config is None:
        return {}
    from transformers import StaticCache

    size = min(-(-n_tokens // bucket) * bucket, model.config.max_position_embeddings)
    return {"cache": StaticCache(config=model.config, max_cache_len=size)}


def load(args):
    """(model, tokenizer, folder) for --stage / --model_path, with --adapter on top; a clear error if missing."""
    dtype = fast_dtype(args.device) if args.dtype == "auto" else \
        {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    path = Path(args.model_path or Path(args.out_dir) / args.stage)
    adapter = args.adapter
    if is_adapter_dir(path):  # out/lora holds only an adapter: its config names the base
        adapter, model = path, from_adapter(path, dtype=dtype)
    else:
        try:
            path = resolve_checkpoint(args.model_path or args.stage, args.out_dir)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if adapter:
            load_adapter(model, adapter)
    tok_dir = path if (Path(path) / "tokenizer_config.json").exists() else TOKENIZER_DIR
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = model.to(args.device).eval()
    if getattr(args, "compile", False):
        compile_decoding(model)
    return model, tokenizer, path


class Printer(TextStreamer):
    """Streams decoded text to `out`; the <think> part dimmed (or hidden); records time to first token."""

    def __init__(self, tokenizer, out, hide_think=False, color=True):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False)
        self.out, self.hide_think, self.color = out, hide_think, color
        self.text, self.thinking, self.first_token_time, self.n_tokens = "", False, None, 0

    def put(self, value):
        if not self.next_tokens_are_prompt:  # the first call carries the prompt
            self.n_tokens += value.numel()
            if self.first_token_time is None:
                self.first_token_time = time.perf_counter()
        super().put(value)

    def on_finalized_text(self, text, stream_end=False):
        text = text.replace(self.tokenizer.eos_token, "")
        self.text += text
        for piece in _split_tags(text):
            if piece == "<think>":
                self.thinking = True
            if not (self.thinking and self.hide_think):
                dim = self.thinking and self.color
                self.out.write(f"{DIM}{piece}{RESET}" if dim else piece)
            if piece == "</think>":
                self.thinking = False
        self.out.flush()


def _split_tags(text):
    for tag in ("<think>", "</think>"):
        if tag in text:
            before, _, after = text.partition(tag)
            return [*_split_tags(before), tag, *_split_tags(after)]
    return [text] if text else []


class Chat:
    """Conversation state: the last `history` turns (user + assistant pairs) go into each prompt."""

    def __init__(self, model, tokenizer, args, raw_text: bool, out=sys.stdout):
        self.model, self.tokenizer, self.args, self.raw_text, self.out = model, tokenizer, args, raw_text, out
        self.messages = []
        self.context = getattr(model.config, "max_position_embeddings", 2048)

    def clear(self):
        self.messages = []

    def prompt_ids(self, user_text):
        if self.raw_text:  # a pretrained model continues text: bos + text, no chat template
            ids = [self.tokenizer.bos_token_id] + self.tokenizer(user_text, add_special_tokens=False)["input_ids"]
        else:
            turns = self.messages[-2 * self.args.history:] if self.args.history > 0 else []
            text = self.tokenizer.apply_chat_template(turns + [{"role": "user", "content": user_text}],
                                                      tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = self.context - self.args.max_new_tokens
        if len(ids) > room:
            self.out.write(f"[prompt of {len(ids)} tokens cut from the left to {room} to leave room for "
                           f"{self.args.max_new_tokens} new tokens in a {self.context}-token context]\n")
            ids = ids[-room:]
        return ids

    def reply(self, user_text) -> str:
        args, device = self.args, self.model.device
        ids = torch.tensor([self.prompt_ids(user_text)], device=device)
        printer = Printer(self.tokenizer, self.out, args.hide_think, color=self.out.isatty())
        sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) \
            if args.temperature > 0 else dict(do_sample=False)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        start = time.perf_counter()
        with torch.no_grad():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                repetition_penalty=args.repetition_penalty, streamer=printer,
                                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                                **sampling, **decode_cache(self.model, ids.size(1) + args.max_new_tokens))
        end = time.perf_counter()
        self.out.write("\n")
        if args.show_speed and printer.first_token_time:
            prefill = printer.first_token_time - start
            decode = end - printer.first_token_time
            self.out.write(f"[prompt {ids.size(1)} tokens at {ids.size(1) / prefill:,.0f} tok/s; "
                           f"{printer.n_tokens} new tokens at {(printer.n_tokens - 1) / max(decode, 1e-9):,.1f} tok/s]\n")
        answer = printer.text.strip()
        if not self.raw_text:
            self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer


def add_model_args(parser):
    """Which checkpoint to load, and where: shared with scripts/serve_openai_api.py."""
    parser.add_argument("--stage", default="sft", choices=sorted(STAGE_SCRIPTS), help="out/<stage> to load")
    parser.add_argument("--model_path", default=None, help="a checkpoint or HF folder instead of --stage")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder to put on top")
    parser.add_argument("--out_dir", default="out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bf16 where the device has it natively (CUDA, recent CPUs), else fp32")
    parser.add_argument("--compile", action="store_true",
                        help="static KV cache + compiled decode step: faster tokens after a slow first reply")
    return parser


def build_parser():
    parser = add_model_args(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.85)
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--history", type=int, default=4, help="earlier turns kept in the prompt (0 = none)")
    parser.add_argument("--hide_think", action="store_true", help="do not print the <think> part")
    parser.add_argument("--show_speed", action="store_true", help="print prompt and decode tokens/s")
    parser.add_argument("--auto", action="store_true", help="answer the built-in test questions and exit")
    parser.add_argument("--prompts", default=None, help="a file of prompts, one per line: answer them and exit")
    parser.add_argument("--raw", action="store_true", help="continue raw text (default for --stage pretrain)")
    return parser


def main(argv=None, stdin=None, out=None):
    args = build_parser().parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    model, tokenizer, path = load(args)
    raw = args.raw or (args.model_path is None and args.stage == "pretrain")
    chat = Chat(model, tokenizer, args, raw, out)
    out.write(f"[{path}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {args.device}, "
              f"{'raw text' if raw else 'chat'}]\n")
    if args.auto or args.prompts:
        prompts = TEST_PROMPTS if args.auto else [
            line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
        answers = []
        for p in prompts:
            out.write(f"\n> {p}\n")
            answers.append(chat.reply(p))
            chat.clear()  # independent questions
        return answers
    out.write("/clear forgets the conversation, /quit (or Ctrl-D) ends it\n")
    while True:
        out.write("\n> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return chat.messages
        if line.strip() == "/clear":
            chat.clear()
            out.write("[history cleared]\n")
        elif line.strip():
            chat.reply(line.strip())


if __name__ == "__main__":
    main()
