"""Tool-use evaluation: held-out tool tasks through the inference core's tool loop, scored.

    python scripts/eval_tools.py --stage tools                       # the demo's held-out weather tasks
    python scripts/eval_tools.py --model_path out/demo/tools --json scripts/results/tools_eval.json
    python scripts/eval_tools.py --stage sft --data dataset/agent_rl.jsonl --tools builtin,my_tools.py:search

Rows: MiniMind's agent_rl format -- "conversations" (a system message carrying "tools", the user's question, maybe
earlier turns) and "gt" (the accepted answers), optionally "expected_call" ({"name", "arguments"}: scores the first
call's function and arguments) and "tool_results" ({tool name: result}: a scripted environment, as the demo's
weather, instead of running real functions). Calls run in --tools (default: the built-in calculator, current_time,
convert_units); a call to anything else gets an "unknown tool" result, as the model would in use.

Reports: valid_call (the first reply holds a parsable call and nothing malformed), right_tool, right_arguments
(exact, spaces aside), answer_accuracy (tools executed, at most --max_rounds rounds; a number must be the last number
of the final reply's first sentence, a text answer must appear in it), answer_accuracy_without_tools (the same
questions with no tools in the prompt) and n; JSON on stdout and to --json. Malformed rows are reported with
file:line and counted (--strict stops at the first).
"""

import argparse
import json
import platform
import time
from pathlib import Path

from common.cli import HelpFormatter
from dataset.chat import normalize_chat
from dataset.jsonl import BadLineError, JsonlFile
from inference import load_tools
from inference.load import add_model_args, load
from trainer import report
from trainer.tool_eval import tool_use_scores

ROOT = Path(__file__).resolve().parents[1]

DEMO_SET = ROOT / "demo" / "data" / "tools_eval.jsonl"


def check_row(row):
    if not isinstance(row, dict):
        raise BadLineError("not a JSON object")
    _, tools = normalize_chat(row.get("conversations"), complete=False)
    if not tools:
        raise BadLineError('no "tools" on the system message: nothing to call')
    gt = row.get("gt")
    if isinstance(gt, (str, int, float)):
        row["gt"] = [gt]
    elif not isinstance(gt, list) or not gt:
        raise BadLineError('"gt" is not an answer or a non-empty list of answers')


def build_parser():
    parser = add_model_args(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=HelpFormatter))
    parser.set_defaults(stage="tools")
    parser.add_argument("--data", default=str(DEMO_SET), help="agent_rl-format jsonl (default: the demo's set)")
    parser.add_argument("--tools", default="builtin", help="builtin, their names, file.py:function, ...")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--max_rounds", type=int, default=2, help="tool rounds per task at most")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="the first N rows only")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed row")
    parser.add_argument("--json", default=None, help="write the result here too")
    parser.add_argument("--show", type=int, default=0, help="print the first N tool-loop transcripts")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        functions = load_tools(args.tools)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"--tools {args.tools}: {e}") from None
    rows = JsonlFile(args.data, check=check_row, strict=args.strict)
    items = [rows[i] for i in range(len(rows) if args.limit is None else min(args.limit, len(rows)))]
    for item in items:
        check_row(item)  # lifts a single "gt" into a list, as the check did on the index pass
    model, tokenizer, path = load(args)
    start = time.perf_counter()
    scores = tool_use_scores(model, tokenizer, items, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, max_rounds=args.max_rounds, functions=functions,
                             return_generations=bool(args.show))
    for transcript in scores.pop("generations", [])[:args.show]:
        print(json.dumps(transcript, ensure_ascii=False, indent=1))
    scores.pop("generations_without_tools", None)
    data = Path(args.data).resolve()
    data = data.relative_to(ROOT) if data.is_relative_to(ROOT) else data
    result = {"model": str(path), "data": str(data), "bad_rows": len(rows.bad_lines), **scores,
              "seconds": round(time.perf_counter() - start, 1), "device": args.device,
              "machine": platform.processor() or platform.machine()}
    print(json.dumps(result, ensure_ascii=False, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for name in ("valid_call", "right_arguments", "answer_accuracy"):  # into the report card
        if isinstance(scores.get(name), float):
            report.append(args.out_dir, {"kind": "metric", "name": f"tools: {name}", "value": scores[name],
                                         "model": str(path), "source": f"eval_tools on {data}"})
    return result


if __name__ == "__main__":
    main()
