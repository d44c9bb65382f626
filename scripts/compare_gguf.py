"""Run our GGUF export in llama.cpp (through llama-cpp-python) and compare it with our own model: the prompt's
tokenisation, the next-token logits, greedy continuations, and the chat template
llama.cpp carries (a tools request rendered by llama-cpp-python's Jinja formatter against ours). Not part of CI: llama-cpp-python builds llama.cpp
from source (`pip install llama-cpp-python`, a few minutes).

    python scripts/compare_gguf.py --stage sft
    python scripts/compare_gguf.py --model_path out/demo/grpo --max_new_tokens 64 --json scripts/results/gguf.json
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


from common.cli import HelpFormatter
from scripts import convert_model
from inference import Sampling, generate
from inference.load import TEST_PROMPTS, add_model_args, load


def llama_greedy(llm, ids, max_new_tokens, eos):
    """(first-step logits, greedy continuation) from llama.cpp, fed our token ids."""
    llm.reset()
    llm.eval(ids)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    out = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return first, out


def our_greedy(model, ids, max_new_tokens, eos):
    with torch.no_grad():
        x = torch.tensor([ids])
        first = model(x).logits[0, -1].float().numpy()
        new = generate(model, x, sampling=Sampling(max_new_tokens=max_new_tokens), eos_id=eos, pad_id=eos)[0].tolist()
    return first, new[:new.index(eos)] if eos in new else new


TOOLS_REQUEST = [  # a tool round trip: tools in the system turn, a call, its result
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "37加25等于几？"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "37+25"}}}]},
    {"role": "tool", "content": "62"}]


def template_check(llm, tokenizer) -> dict:
    """Does llama.cpp's copy of the chat template (the GGUF's tokenizer.chat_template, rendered by llama-cpp-python's
    Jinja2 formatter, as `--jinja` servers do) give our prompt for a tools request, and for a plain one?"""
    from inference import calculator, tool_schema
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if template is None:
        return {"template_in_gguf": False}
    fmt = Jinja2ChatFormatter(template, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token or "")
    tools = [tool_schema(calculator)]
    out = {"template_in_gguf": template == tokenizer.chat_template}
    for name, messages, kwargs in [("plain", TOOLS_REQUEST[1:2], {}), ("tools", TOOLS_REQUEST, {"tools": tools})]:
        ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        try:
            theirs = fmt(messages=messages, **kwargs).prompt
        except Exception as e:  # a Jinja feature llama-cpp-python's environment lacks
            out[f"{name}_prompt_equal"] = f"not rendered: {type(e).__name__}: {e}"
            continue
        out[f"{name}_prompt_equal"] = theirs == ours
    print(f"chat template: {out}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(parser)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--formats", default="f32,f16,q8_0", help="GGUF types to compare (f32, f16, q8_0, q4_0)")
    parser.add_argument("--raw", action="store_true", help="raw text, no chat template (default for --stage pretrain)")
    args = parser.parse_args(argv)
    from llama_cpp import Llama, __version__  # optional: only this script needs llama-cpp-python

    args.device, args.dtype = "cpu", "float32"
    model, tokenizer, path = load(args)
    convert_model.remove_lora(model, merge=True)  # an adapter on top is merged, as the exporter does
    raw = args.raw or (args.model_path is None and args.stage == "pretrain")  # eval_model.py's rule
    results = {"model": str(path), "llama_cpp_python": __version__, "machine": platform.processor() or
               platform.machine(), "max_new_tokens": args.max_new_tokens, "formats": {}}
    eos = tokenizer.eos_token_id
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.formats.split(","):
            gguf_file = convert_model.export_gguf(model, tokenizer, Path(tmp) / f"model-{dtype}.gguf", dtype)
            llm = Llama(model_path=str(gguf_file), n_ctx=model.config.max_position_embeddings, n_threads=2,
                        logits_all=True, verbose=False, seed=0)
            rows = []
            for prompt in TEST_PROMPTS:
                chat = [{"role": "user", "content": prompt}]
                text = tokenizer.bos_token + prompt if raw else tokenizer.apply_chat_template(
                    chat, tokenize=False, add_generation_prompt=True)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                llama_ids = llm.tokenize(text.encode(), add_bos=False, special=True)
                t0 = time.perf_counter()
                ref_logits, ref = our_greedy(model, ids, args.max_new_tokens, eos)
                t1 = time.perf_counter()
                logits, got = llama_greedy(llm, ids, args.max_new_tokens, eos)
                t2 = time.perf_counter()
                same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
                rows.append({"prompt": prompt, "tokenization_equal": llama_ids == ids,
                             "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
                             "greedy_equal": ref == got, "common_prefix_tokens": same, "ours_tokens": len(ref),
                             "ours": tokenizer.decode(ref), "llama_cpp": tokenizer.decode(got),
                             "ours_s": round(t1 - t0, 3), "llama_cpp_s": round(t2 - t1, 3)})
                print(f"[{dtype}] {prompt!r}: tokenization {'=' if rows[-1]['tokenization_equal'] else '≠'}, "
                      f"max |Δlogit| {rows[-1]['max_abs_logit_diff']:.2e}, greedy "
                      f"{'equal' if ref == got else f'differs after {same} tokens'} ({len(ref)} tokens)")
            if "template" not in results:  # the template is the same in every format
                results["template"] = template_check(llm, tokenizer)
            del llm
            results["formats"][dtype] = {
                "prompts": rows, "tokenization_equal": sum(r["tokenization_equal"] for r in rows),
                "greedy_equal": sum(r["greedy_equal"] for r in rows), "n": len(rows),
                "file_mib": round(gguf_file.stat().st_size / 2**20, 2),
                "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows)}
            s = results["formats"][dtype]
            print(f"[{dtype}, {s['file_mib']} MiB] greedy equal on {s['greedy_equal']}/{s['n']} prompts, tokenization on "
                  f"{s['tokenization_equal']}/{s['n']}, max |Δlogit| {s['max_abs_logit_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
