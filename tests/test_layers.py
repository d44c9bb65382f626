"""The house's rule, read from the source with `ast`: packages sit in layers, bottom to top

    model -> common -> dataset -> inference -> trainer -> demo, scripts, the stage scripts, tests

and a module imports only from its own layer or below (never up): each package has its own layer, so a cycle between
packages would need an upward import and needs no check of its own. The stage scripts and the --method modules
resolve each method's defaults as they did before the methods moved out of the scripts."""

import argparse
import ast
import json
from pathlib import Path

import pytest
from helpers import ROOT, load_script

LAYERS = ["model", "common", "dataset", "inference", "trainer", "demo", "scripts"]
RANK = {name: i for i, name in enumerate(LAYERS)}
TOP = len(LAYERS)  # stage scripts, eval_model.py, data_process.py, tests


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level project package) of every import in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:  # relative imports stay inside their package
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in RANK]
    return found


def layer_of(path: Path) -> int:
    rel = path.relative_to(ROOT)
    return RANK.get(rel.parts[0], TOP) if len(rel.parts) > 1 else TOP


def sources():
    skip = {".git", "out", ".corpus"}
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]


def upward_imports(files) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line} imports {pkg} (layer {RANK[pkg]} above {layer_of(p)})"
            for p in files for line, pkg in project_imports(p) if RANK[pkg] > layer_of(p)]


def test_no_module_imports_a_higher_layer():
    assert upward_imports(sources()) == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule is not vacuous: a model file importing the trainer is reported, with its line."""
    fake = tmp_path / "model" / "bad.py"
    fake.parent.mkdir()
    fake.write_text("import torch\nfrom trainer.engine import Trainer\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert upward_imports([fake]) == ["model/bad.py:2 imports trainer (layer 4 above 0)"]


def test_no_script_edits_sys_path():
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in sources() if p.name != "test_layers.py"
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "sys.path.insert" in line
                 or "sys.path.append" in line]
    assert offenders == []


RESOLVED = json.loads((Path(__file__).parent / "data" / "stage_defaults.json").read_text())


@pytest.mark.parametrize("case", sorted(RESOLVED))
def test_each_method_resolves_the_same_defaults_as_before(case, monkeypatch):
    """tests/data/stage_defaults.json holds every stage's and method's arguments as main() resolved them when the
    methods still lived in the stage scripts; the modules must give the same (stage_main is replaced: no training)."""
    script, *argv = case.split()
    module = load_script(script)
    seen = {}

    def capture(stage, build_parser, run, args=None):
        args = args if isinstance(args, argparse.Namespace) else build_parser().parse_args(args)
        seen.update(stage=stage, args=dict(sorted(vars(args).items())))

    monkeypatch.setattr(module, "stage_main", capture)
    module.main(argv)
    assert seen == RESOLVED[case]


@pytest.mark.parametrize("argv, expected", [(["--method", "grpo"], "reason"), (["--method", "grpo", "--from", "dpo"], "dpo"),
                                            (["--method", "grpo", "--from=dpo"], "dpo"), (["--method", "agent"], "sft")])
def test_a_flag_the_user_gives_beats_the_methods_default(argv, expected, monkeypatch):
    """--from dpo equals the stage's default, yet GRPO must start from dpo when it is written out, not from reason."""
    module = load_script("6-reason.py")
    seen = {}
    monkeypatch.setattr(module, "stage_main", lambda stage, build_parser, run, args: seen.update(args=args))
    module.main(argv)
    assert seen["args"].init_from == expected
