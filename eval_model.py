"""Chat with any stage's checkpoint, streamed token by token, through the inference core (inference/).

    python eval_model.py                         # out/sft, interactive; /clear forgets the history, /quit ends
    python eval_model.py --stage reason          # the think part is shown dimmed; --hide_think hides it
    python eval_model.py --stage lora            # base + the adapter in out/lora
    python eval_model.py --model_path some/hf_folder --adapter out/lora
    python eval_model.py --stage pretrain        # a pretrained model continues raw text (no chat template)
    python eval_model.py --auto                  # answer the built-in test questions and exit
    python eval_model.py --prompts questions.txt --temperature 0 --show_speed
    python eval_model.py --stage tools --tools builtin          # the model may call calculator / time / units
    python eval_model.py --tools builtin,my_tools.py:lookup     # plus a function of yours (schema from its signature)
    python eval_model.py --stage reason --no_think              # --think / --no_think: the template's switch

Sampling: --temperature (0 = greedy) --top_p --top_k --repetition_penalty --max_new_tokens --seed.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from common.cli import HelpFormatter
from inference import Sampling, TextStream, load_tools, tool_schema
from inference.engine import drain
from inference.load import TEST_PROMPTS, add_model_args, load, load_engine  # noqa: F401  (the scripts' shared loading)

DIM, RESET = "\033[2m", "\033[0m"


class Printer:
    """Writes a reply's events as they stream: the think part dimmed (or hidden), each tool call and its result
    dimmed on a line of their own, the answer plain; records the time to the first token."""

    def __init__(self, out, hide_think=False, color=True):
        self.out, self.hide_think, self.color = out, hide_think, color
        self.first_token_time, self.field = None, "content"

    def dim(self, text):
        return f"{DIM}{text}{RESET}" if self.color else text

    def __call__(self, field, value):
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if field == "reasoning_content":
            if not self.hide_think:
                self.out.write(self.dim(("[think] " if self.field != field else "") + value))
        elif field == "content":
            if self.field == "reasoning_content" and not self.hide_think:
                self.out.write("\n")
            self.out.write(value)
        elif field == "tool_call":
            fn = value["function"]
            self.out.write(self.dim(f"\n[tool call] {fn['name']}({fn['arguments']})\n"))
        elif field == "tool_result":
            self.out.write(self.dim(f"[tool result] {value['content']}\n"))
        self.field = field
        self.out.flush()


class Chat:
    """Conversation state: the last `history` user turns (with the replies and tool calls after them) go into each
    prompt; with tools, each reply's calls run and the model continues (at most --max_tool_rounds rounds)."""

    def __init__(self, engine, args, raw_text: bool, out=sys.stdout, tools=None):
        self.engine, self.args, self.raw_text, self.out, self.tools = engine, args, raw_text, out, tools
        self.tokenizer = engine.tokenizer
        self.messages = []

    def clear(self):
        self.messages = []

    def sampling(self):
        a = self.args
        return Sampling(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                        repetition_penalty=a.repetition_penalty)

    def history(self):
        if self.args.history <= 0:
            return []
        starts = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        return self.messages[starts[-min(self.args.history, len(starts))]:] if starts else []

    def prompt_ids(self, user_text):
        if self.raw_text:  # a pretrained model continues text: bos + text, no chat template
            ids = [self.tokenizer.bos_token_id] + self.tokenizer(user_text, add_special_tokens=False)["input_ids"]
            room = self.engine.context - self.args.max_new_tokens
            return ids[-room:]
        text = self.engine.render(self.history() + [{"role": "user", "content": user_text}],
                                  tools=self._schemas(), thinking=self.args.think)
        return self.engine.prompt_ids(text, self.args.max_new_tokens, notice=self.out.write)

    def _schemas(self):
        return [tool_schema(fn) for fn in self.tools.values()] if self.tools else None

    def reply(self, user_text) -> str:
        args = self.args
        if args.seed is not None:
            torch.manual_seed(args.seed)
        printer = Printer(self.out, args.hide_think, color=self.out.isatty())
        start = time.perf_counter()
        if self.raw_text:
            answer, n_prompt, n_new = self._continue(user_text, printer)
        else:
            messages = self.history() + [{"role": "user", "content": user_text}]
            kwargs = dict(thinking=args.think, sampling=self.sampling(), notice=self.out.write)
            if self.tools:
                events = self.engine.run_tools(messages, self.tools, max_rounds=args.max_tool_rounds, **kwargs)
            else:
                events = self.engine.stream_reply(messages, **kwargs)
            result = drain(events, printer)
            new, last = result if self.tools else ([result.message()], result)
            new[-1].pop("reasoning_content", None)  # earlier turns go back without their thinking (as Qwen3's)
            self.messages += [{"role": "user", "content": user_text}] + new
            answer, n_prompt, n_new = last.content, last.prompt_tokens, last.completion_tokens
        end = time.perf_counter()
        self.out.write("\n")
        if args.show_speed and printer.first_token_time:
            prefill = printer.first_token_time - start
            decode = end - printer.first_token_time
            self.out.write(f"[prompt {n_prompt} tokens at {n_prompt / prefill:,.0f} tok/s; "
                           f"{n_new} new tokens at {(n_new - 1) / max(decode, 1e-9):,.1f} tok/s]\n")
        return answer

    def _continue(self, text, printer):
        ids = self.prompt_ids(text)
        stream, n_new, answer = TextStream(self.tokenizer), 0, ""
        for token in self.engine.decode([ids], self.sampling()):
            n_new += 1
            if int(token[0]) == self.engine.eos_id:
                break
            piece = stream.add(int(token[0]))
            answer += piece
            printer("content", piece)
        return answer.strip(), len(ids), n_new


def build_parser():
    parser = add_model_args(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=HelpFormatter))
    parser.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.85)
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--history", type=int, default=4, help="earlier turns kept in the prompt (0 = none)")
    parser.add_argument("--hide_think", action="store_true", help="do not print the <think> part")
    think = parser.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_true", default=None,
                       help="open the think part (the template's enable_thinking)")
    think.add_argument("--no_think", dest="think", action="store_false", help="answer without thinking")
    parser.add_argument("--tools", default=None,
                        help="builtin (calculator, current_time, convert_units), their names, or file.py:function, "
                             "comma-separated: the model may call them; each call and result is shown")
    parser.add_argument("--max_tool_rounds", type=int, default=4, help="tool rounds per question at most")
    parser.add_argument("--show_speed", action="store_true", help="print prompt and decode tokens/s")
    parser.add_argument("--auto", action="store_true", help="answer the built-in test questions and exit")
    parser.add_argument("--prompts", default=None, help="a file of prompts, one per line: answer them and exit")
    parser.add_argument("--raw", action="store_true", help="continue raw text (default for --stage pretrain)")
    return parser


def main(argv=None, stdin=None, out=None):
    args = build_parser().parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    try:
        tools = load_tools(args.tools) if args.tools else None
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"--tools {args.tools}: {e}") from None
    engine, path = load_engine(args)
    raw = args.raw or (args.model_path is None and args.stage == "pretrain")
    chat = Chat(engine, args, raw, out, tools)
    out.write(f"[{path}: {sum(p.numel() for p in engine.model.parameters()) / 1e6:.2f}M parameters on "
              f"{args.device}, {'raw text' if raw else 'chat'}"
              + (f", tools: {', '.join(tools)}" if tools else "") + "]\n")
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
