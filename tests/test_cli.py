"""The command lines (issue 12), run as a user runs them: `python train.py ...` in a subprocess.

- Bad input, any of it, to any of the five scripts: ONE line `error: <flag or file>: <what to do>` on stderr, exit
  status 2, no traceback, within seconds (all checks come before any work), and --out left as it was.
- Every choice or range declared beside a train.Config field is enforced by parse_args, with no code per field.
- The six product files import one way (DESIGN.md §1), deferred imports inside functions included.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import train

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "assets" / "suite-base"  # a real (tiny) T5 folder: config.json, model.safetensors, spiece.model


# ---------------------------------------------------------------------------------------------------------------
# Bad invocations: (script and flags, what the line must start with after "error: ", the path that must not change)
# {out} is a fresh folder (absent), {tmp} holds the prepared bad files, {base} the committed suite base model.

BAD = [
    ("train.py --fusion concatt --out {out}", "--fusion: invalid choice"),
    ("train.py --ins_mode nope --out {out}", "--ins_mode: invalid choice"),
    ("train.py --steps -5 --out {out}", "--steps: must be >= 1"),
    ("train.py --batch_size 0 --out {out}", "--batch_size: must be >= 1"),
    ("train.py --grad_accum 0 --out {out}", "--grad_accum: must be >= 1"),
    ("train.py --warmup 1.5 --out {out}", "--warmup: must be in [0, 1)"),
    ("train.py --lr nan --out {out}", "--lr: must be > 0"),
    ("train.py --device tpu --out {out}", "--device: invalid choice"),
    ("train.py --no_such_flag 3 --out {out}", "--no_such_flag 3: unknown flag"),
    ("train.py --modules q,x --out {out}", "--modules: unknown ['x']"),
    ("train.py --ins_mode params --out {out}", "--ins_mode params: compares factors of equal rank"),
    ("train.py --data sni --out {out}", "--data_dir: required with --data sni"),
    ("train.py --stage pretrain --resume --out {out}", "--resume: {out}/pretrain holds no checkpoint"),
    ("train.py --model {tmp}/nowhere --out {out}", "{tmp}/nowhere/config.json: not found"),
    ("train.py --model {tmp}/wrong-type --out {out}", "{tmp}/wrong-type/config.json: field 'd_model' is '128'"),
    ("train.py --model {tmp}/truncated --out {out}", "{tmp}/truncated/model.safetensors: not a valid safetensors"),
    ("train.py --stage teachers --data sni --data_dir {tmp}/sni --model {base} --out {out}",
     "{tmp}/sni/tasks/task1_broken.json: unreadable file or broken JSON"),
    ("evaluate.py --out {tmp}/missing", "--out {tmp}/missing: no such run folder"),
    ("evaluate.py --out {tmp}/run", "{tmp}/run/finetune/stage.json: not found"),
    ("evaluate.py --out {tmp}/run --device gpu", "--device: invalid choice"),
    ("tagi.py adapter --checkpoint {tmp}/missing --instruction hi --out {out}", "{tmp}/missing/tagi.json: not found"),
    ("tagi.py adapter --checkpoint {tmp}/run --instruction @{tmp}/no.txt --out {out}", "--instruction @{tmp}/no.txt"),
    ("tagi.py", "command: required"),
    ("bench.py --only t6", "--only: unknown ['t6']"),
    ("bench.py --repeats 0", "--repeats: must be >= 1"),
    ("bench.py --json {tmp}/broken.json", "--json {tmp}/broken.json: unreadable or broken JSON"),
    ("data.py {tmp}/a-file", "{tmp}/a-file: is a file, not a folder"),
    ("data.py --seed 1", "--seed: unknown flag"),
]
if not torch.cuda.is_available():
    BAD += [("train.py --device cuda --out {out}", "--device cuda: torch sees no CUDA device")]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """Bad files: a T5 folder whose config.json has a wrong type, one with a truncated safetensors file, an SNI
    folder with a broken task JSON, a run folder with nothing finished, a broken --json list, a plain file."""
    d = tmp_path_factory.mktemp("bad")
    shutil.copytree(BASE, d / "wrong-type")
    cfg = json.loads((d / "wrong-type" / "config.json").read_text())
    (d / "wrong-type" / "config.json").write_text(json.dumps({**cfg, "d_model": "128"}))
    shutil.copytree(BASE, d / "truncated")
    f = d / "truncated" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    (d / "sni" / "tasks").mkdir(parents=True)
    (d / "sni" / "splits" / "default").mkdir(parents=True)
    for part in ("train", "test"):
        (d / "sni" / "splits" / "default" / f"{part}_tasks.txt").write_text("task1_broken\n")
    (d / "sni" / "tasks" / "task1_broken.json").write_text('{"Definition": ["Say hi."], "Instances": [')
    (d / "run").mkdir()
    (d / "run" / "notes.txt").write_text("a run folder with no finished stage\n")
    (d / "broken.json").write_text("[{")
    (d / "a-file").write_text("not a folder\n")
    return d


def snapshot(path: Path):
    """Everything under path, byte for byte (None if absent)."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(f.relative_to(path)): f.read_bytes() if f.is_file() else "dir" for f in sorted(path.rglob("*"))}


@pytest.mark.parametrize("cmd,expect", BAD, ids=[c for c, _ in BAD])
def test_bad_input_gets_one_line_exit_2_fast_and_writes_nothing(cmd, expect, tmp, tmp_path):
    fill = {"out": tmp_path / "out", "tmp": tmp, "base": BASE}
    argv = [a.format(**fill) for a in cmd.split()]
    watched = [tmp_path / "out", *(tmp / p for p in ("run", "broken.json", "a-file", "sni"))]
    before = [snapshot(p) for p in watched]
    t0 = time.time()
    r = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.time() - t0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    print(f"\n{seconds:5.1f} s  python {' '.join(argv)}\n        {lines[-1] if lines else '(no output)'}")
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: " + expect.format(**fill)), lines
    assert [snapshot(p) for p in watched] == before, "a bad invocation wrote into --out (or a file it named)"


# ---------------------------------------------------------------------------------------------------------------
# Declared once, enforced everywhere: the values beside each Config field


def outside(valid: str, typ) -> str:
    """A value just outside a declared range, or not among the declared choices."""
    if "|" in valid:
        return "no-such-choice"
    bound = valid[1:-1].split(",")[1] if valid.startswith("[") else valid.split()[1]  # [lo, hi) -> hi; >= b / > b
    return str(typ(float(bound)) - (1 if valid.startswith(">=") else 0))


@pytest.mark.parametrize("f", [f for f in fields(train.Config) if f.metadata.get("valid")], ids=lambda f: f.name)
def test_every_declared_choice_and_range_is_enforced(f, capsys):
    """A value outside what train.arg declares for the field is refused with one line and exit status 2; the
    declared choices and the range's edge are accepted. A new field with arg(default, valid) needs no code here."""
    valid, typ = f.metadata["valid"], {"int": int, "float": float, "str": str}[str(f.type)]
    with pytest.raises(SystemExit) as e:
        train.parse_args([f"--{f.name}", outside(valid, typ)])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: --{f.name}: "), err
    edge = valid.split("|") if "|" in valid else [valid[1:-1].split(",")[0] if valid.startswith("[") else
                                                  str(typ(float(valid.split()[1])) + (0 if ">=" in valid else 1))]
    for ok in edge:
        assert getattr(train.parse_args([f"--{f.name}", ok]), f.name) == typ(ok)


# ---------------------------------------------------------------------------------------------------------------
# The house: data flows one way (DESIGN.md §1)

PRODUCT = ("model", "hypernet", "data", "tagi", "evaluate", "train")
# what each file may import: model <- hypernet <- tagi <- evaluate <- train, and data (at most model) to all above it
ALLOWED = {"model": set(), "hypernet": {"model"}, "data": {"model"}, "tagi": {"model", "hypernet", "data"},
           "evaluate": {"model", "hypernet", "data", "tagi"},
           "train": {"model", "hypernet", "data", "tagi", "evaluate"}}


def product_imports(name: str) -> set[str]:
    """Our files that `name`.py imports anywhere: at module level, inside functions, under `if __name__`."""
    found = set()
    for node in ast.walk(ast.parse((REPO / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PRODUCT)


def test_imports_flow_one_way():
    graph = {n: product_imports(n) for n in PRODUCT}
    assert "train" not in graph["evaluate"], "evaluate.py imports train.py: train.py runs evaluation, not the reverse"
    for name, deps in graph.items():
        assert deps <= ALLOWED[name], f"{name}.py imports {sorted(deps - ALLOWED[name])} (DESIGN.md §1)"
    left = dict(graph)  # acyclic: repeatedly remove the files that import none of those left
    while left:
        leaves = [n for n, deps in left.items() if not deps & set(left)]
        assert leaves, f"import cycle among {sorted(left)}"
        for n in leaves:
            del left[n]
