"""Classroom assignments: student handouts of this repository, their grader, and the guarantees CI checks.

    python tests/assignments.py list                           # one line per exercise
    python tests/assignments.py handout OUT [--only E3,E7]    # a student copy with those exercises blanked
    python tests/assignments.py grade [E3 ...] [--json FILE]   # in a handout or in the reference
    python tests/assignments.py check                          # (a)-(e) below; the README's test command runs it

One source of truth, tests/exercises.json, lists the exercises in course order: the functions each one blanks
(`file.py::Qualified.name`), title, points, paper reference, depends_on and a hint. Their tests (its "test_files")
carry exactly one pytest marker each, the exercise id, registered by tests/conftest.py for --strict-markers.

handout: every file of the repository (git's tracked and untracked-but-not-ignored files), byte for byte, except
that each blanked function keeps its signature and docstring and its body becomes
`raise NotImplementedError("E<k> <file>::<name>: see ASSIGNMENTS.md")`, found by line spans of the ast module;
nothing is re-formatted.
grade: one pytest process over the exercise tests, selected by marker (never -k); one row per exercise with the
tests passed/total, points, seconds and a status: PASS, FAIL (the first failed assertion), TODO (not implemented
yet) or BLOCKED by E<j> (a declared dependency does not pass); exit 0 only if every selected exercise passes.
check: (a) the reference passes every exercise; (b) the full handout fails every exercise test, each on a
NotImplementedError; (c) a handout blanking only E<k> fails exactly the tests of E<k> and of the exercises that
depend on it (transitively) and passes all others; (d) no blanked body, nor a near copy of it (the same code up to
whitespace, comments and line breaks, for at least half of its lines), appears anywhere in the handout; (e) the
manifest is consistent: every function exists and has a docstring, every exercise has points and tests (each
under 10 s), every exercise test carries exactly one exercise marker, and none is used outside the test files.

This file is also the pytest plugin (`-p assignments`, active when ASSIGNMENTS_RESULTS names a file) that records
every exercise test's marker, outcome, first error line and duration.
"""
from __future__ import annotations

import argparse
import ast
import fnmatch
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "tests/exercises.json"
EXERCISE_ID = re.compile(r"E[1-9][0-9]*")
NOT_IMPLEMENTED = re.compile(r"NotImplementedError: (E[1-9][0-9]*) ")
MAX_SECONDS = 10.0  # per exercise, on one core


# ------------------------------------------------------------------------------------------------ the manifest
def load_manifest(root: Path = ROOT) -> dict:
    path = root / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: cannot read the manifest ({e})") from None


def split_function(spec: str) -> tuple[str, str]:
    """'model.py::T5.generate' -> ('model.py', 'T5.generate')."""
    file, _, qual = spec.partition("::")
    return file, qual


def dependents(exercises: list[dict], k: str) -> set[str]:
    """The exercises that depend on k, directly or through others."""
    out, grew = set(), True
    while grew:
        grew = False
        for e in exercises:
            if e["id"] not in out and ({k} | out) & set(e["depends_on"]):
                out.add(e["id"])
                grew = True
    return out


def find_function(tree: ast.AST, qual: str):
    """The FunctionDef of a dotted name such as 'T5.generate' (classes, then the function), or None."""
    node = tree
    for part in qual.split("."):
        node = next((n for n in getattr(node, "body", []) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                             ast.ClassDef)) and n.name == part), None)
        if node is None:
            return None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def body_span(fn, lines: list[str]) -> tuple[int, int, str]:
    """(start, end, indent): the 0-based line range [start, end) after the docstring that blanking replaces, and
    the body's indentation. Comment lines right after the body, indented deeper than the def, go with it."""
    doc = fn.body[0]
    start, end = doc.end_lineno, fn.end_lineno
    while end < len(lines) and lines[end].strip().startswith("#") and \
            len(lines[end]) - len(lines[end].lstrip()) > fn.col_offset:
        end += 1
    return start, end, " " * doc.col_offset


def has_docstring(fn) -> bool:
    first = fn.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def lint_manifest(root: Path, manifest: dict) -> list[str]:
    """Problems with the manifest itself and the functions it names (check (e), the static half)."""
    problems, seen_ids, seen_functions = [], [], set()
    exercises = manifest.get("exercises")
    if not isinstance(exercises, list) or not exercises:
        return [f"{MANIFEST}: field 'exercises' must be a non-empty list"]
    files = manifest.get("test_files")
    if not isinstance(files, list) or not files or not all((root / f).is_file() for f in files):
        problems.append(f"{MANIFEST}: field 'test_files' must list existing test files, got {files!r}")
    trees = {}
    for n, e in enumerate(exercises):
        where = f"{MANIFEST}: exercise {n + 1} ({e.get('id', '?')})"
        for key, kind in (("id", str), ("functions", list), ("title", str), ("points", int), ("paper", str),
                          ("depends_on", list), ("hint", str)):
            if not isinstance(e.get(key), kind) or (kind is not int and not e.get(key) and key != "depends_on"):
                problems.append(f"{where}: field {key!r} must be a {'non-empty ' if key != 'depends_on' else ''}"
                                f"{kind.__name__}")
        if problems and problems[-1].startswith(where):
            continue
        if not EXERCISE_ID.fullmatch(e["id"]) or e["id"] in seen_ids:
            problems.append(f"{where}: id {e['id']!r} must be E<number> and unique")
        if e["points"] <= 0:
            problems.append(f"{where}: points must be positive")
        for d in e["depends_on"]:
            if d not in seen_ids:
                problems.append(f"{where}: depends_on {d!r} is not an exercise listed before it (course order)")
        seen_ids.append(e["id"])
        for spec in e["functions"]:
            file, qual = split_function(spec)
            if spec in seen_functions:
                problems.append(f"{where}: {spec} belongs to two exercises")
            seen_functions.add(spec)
            if file not in trees:
                try:
                    trees[file] = ast.parse((root / file).read_text(encoding="utf-8"))
                except (OSError, SyntaxError, ValueError) as err:
                    trees[file] = None
                    problems.append(f"{where}: cannot parse {file} ({err})")
            fn = find_function(trees[file], qual) if trees[file] is not None else None
            if trees[file] is not None and fn is None:
                problems.append(f"{where}: {spec} does not exist")
            elif fn is not None and not has_docstring(fn):
                problems.append(f"{where}: {spec} has no docstring (the docstring is the handout)")
            elif fn is not None and fn.body[0].lineno == fn.lineno:
                problems.append(f"{where}: {spec} needs its docstring on a line of its own")
    doc = root / "ASSIGNMENTS.md"
    if not doc.is_file() or markdown_table(exercises) not in doc.read_text(encoding="utf-8"):
        problems.append("ASSIGNMENTS.md: its exercise table differs from the manifest; paste the output of "
                        "`python tests/assignments.py list --markdown`")
    marker = re.compile(r"\bmark\.(E[1-9][0-9]*)\b")
    for f in sorted((root / "tests").glob("*.py")):
        rel = f.relative_to(root).as_posix()
        if rel in (files or []) or f.name == Path(__file__).name:
            continue
        for lineno, line in enumerate(f.read_text(encoding="utf-8").split("\n"), 1):
            for m in marker.finditer(line):
                problems.append(f"{rel}:{lineno}: exercise marker {m[1]} outside the exercise test files "
                                f"{files} (grade would never run it)")
    return problems


# ------------------------------------------------------------------------------------------------- handouts
def repo_files(root: Path) -> list[str]:
    """The repository's files: git's tracked and untracked-but-not-ignored ones; without .git (in a handout), every
    file but .git and what .gitignore names."""
    if (root / ".git").exists():
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode("utf-8")
        return sorted({f for f in out.split("\0") if f and (root / f).is_file()})
    ignore = [".git"]
    if (root / ".gitignore").is_file():
        ignore += [p.strip().rstrip("/") for p in (root / ".gitignore").read_text().split("\n")
                   if p.strip() and not p.startswith("#")]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if not any(fnmatch.fnmatch(x, p) for p in ignore)]
        files += [(Path(d) / x).relative_to(root).as_posix() for x in names
                  if not any(fnmatch.fnmatch(x, p) for p in ignore)]
    return sorted(files)


def blank_source(text: str, items: list[tuple[str, str]]) -> tuple[str, dict[str, list[str]]]:
    """Blank the functions `items` = [(qualified name, raise line message)] of a module's source. Returns the new
    text (identical outside the blanked lines) and the removed lines of each function."""
    lines = text.split("\n")
    tree = ast.parse(text)
    spans = []
    for qual, message in items:
        fn = find_function(tree, qual)
        if fn is None or not has_docstring(fn):
            raise ValueError(f"{qual}: no such function with a docstring")
        start, end, indent = body_span(fn, lines)
        spans.append((start, end, indent + f"raise NotImplementedError({message!r})", qual))
    spans.sort()
    for (s1, e1, _, q1), (s2, _, _, q2) in zip(spans, spans[1:]):
        if s2 < e1:
            raise ValueError(f"{q1} and {q2} overlap")
    removed = {}
    for start, end, line, qual in reversed(spans):
        removed[qual] = lines[start:end]
        lines[start:end] = [line]
    return "\n".join(lines), removed


def raise_message(ex_id: str, spec: str) -> str:
    return f"{ex_id} {spec}: see ASSIGNMENTS.md"


def write_handout(out: Path, only: list[str] | None = None, root: Path = ROOT) -> dict[str, list[str]]:
    """Write the student copy to `out` (new or empty, outside the repository). Returns {spec: removed lines}."""
    exercises = load_manifest(root)["exercises"]
    ids = [e["id"] for e in exercises]
    selected = ids if only is None else only
    unknown = [k for k in selected if k not in ids]
    if unknown:
        raise SystemExit(f"error: unknown exercise(s) {unknown}; the exercises are {', '.join(ids)}")
    out = out.resolve()
    if out == root or root in out.parents:
        raise SystemExit(f"error: {out} is inside the repository {root}; write the handout elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"error: {out} exists and is not an empty folder")
    by_file: dict[str, list[tuple[str, str]]] = {}
    for e in exercises:
        if e["id"] in selected:
            for spec in e["functions"]:
                file, qual = split_function(spec)
                by_file.setdefault(file, []).append((qual, raise_message(e["id"], spec)))
    removed = {}
    for f in repo_files(root):
        dst = out / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f in by_file:
            text, cut = blank_source((root / f).read_bytes().decode("utf-8"), by_file[f])
            dst.write_bytes(text.encode("utf-8"))
            shutil.copymode(root / f, dst)
            removed.update({f"{f}::{q}": v for q, v in cut.items()})
        else:
            shutil.copy2(root / f, dst)
    missing = sorted(f for f in by_file if not (root / f).is_file())
    if missing:
        raise SystemExit(f"error: the manifest names files that are not in the repository: {missing}")
    return removed


# ---------------------------------------------------------------------------------------- running the tests
def run_tests(root: Path, ids: list[str], timeout: float = 900) -> dict:
    """Run the exercise tests of `ids` (selected by marker) in one pytest process in `root`. Returns
    {"tests": {nodeid: {markers, outcome, error, seconds}}, "collection_errors": [...], "output": pytest's tail}."""
    manifest = load_manifest(root)
    with tempfile.TemporaryDirectory(prefix="assignments-") as tmp:
        results = Path(tmp) / "results.json"
        env = {**os.environ, "ASSIGNMENTS_RESULTS": str(results), "OMP_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONPATH": os.pathsep.join([str(root / "tests")] + ([os.environ["PYTHONPATH"]]
                                                                     if os.environ.get("PYTHONPATH") else []))}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "assignments", "-p", "no:cacheprovider", "--strict-markers",
               "--continue-on-collection-errors", "-m", " or ".join(ids), *manifest["test_files"]]
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"error: the exercise tests in {root} ran past {timeout:.0f} s") from None
        if not results.is_file():
            raise SystemExit(f"error: pytest in {root} recorded no results:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        out = json.loads(results.read_text())
        out["output"] = (proc.stdout + proc.stderr)[-3000:]
        return out


def by_exercise(results: dict) -> dict[str, list[tuple[str, dict]]]:
    """{exercise id: [(nodeid, result)]} over the tests that ran (one marker each)."""
    out: dict[str, list[tuple[str, dict]]] = {}
    for nodeid, r in results["tests"].items():
        if r["outcome"] != "deselected" and len(r["markers"]) == 1:
            out.setdefault(r["markers"][0], []).append((nodeid, r))
    return out


def grade_rows(exercises: list[dict], results: dict, ids: list[str]) -> list[dict]:
    """One row per exercise of `ids` (with their dependencies among them), in course order, with its status."""
    tests, rows, status = by_exercise(results), [], {}
    for e in exercises:
        if e["id"] not in ids:
            continue
        mine = tests.get(e["id"], [])
        passed = sum(r["outcome"] == "passed" for _, r in mine)
        skipped = sum(r["outcome"] == "skipped" for _, r in mine)
        failed = [(n, r) for n, r in mine if r["outcome"] == "failed"]
        todo = [(n, r) for n, r in failed if (m := NOT_IMPLEMENTED.match(r["error"])) and m[1] == e["id"]]
        blocked = next((d for d in e["depends_on"] if status.get(d, "PASS") != "PASS"), None)
        message = ""
        if not mine:
            state = "FAIL"
            message = "no test ran: " + "; ".join(results.get("collection_errors", []))[:300]
        elif blocked:
            state = f"BLOCKED by {blocked}"
        elif not failed and passed:
            state = "PASS"
        elif not failed:
            state, message = "FAIL", "every test was skipped"
        elif len(todo) == len(failed):
            state = "TODO"
        else:
            state = "FAIL"
            nodeid, r = next((n, r) for n, r in failed if (n, r) not in todo)
            m = NOT_IMPLEMENTED.match(r["error"])
            message = (f"{nodeid.split('::')[-1]}: needs {r['error'].split(': ', 1)[1]}" if m else
                       f"{nodeid.split('::')[-1]}: {r['error']}")
        status[e["id"]] = state.split()[0] if not state.startswith("BLOCKED") else "BLOCKED"
        rows.append({"id": e["id"], "functions": e["functions"], "title": e["title"], "points": e["points"],
                     "earned": e["points"] if state == "PASS" else 0, "passed": passed, "total": len(mine) - skipped,
                     "skipped": skipped, "seconds": round(sum(r["seconds"] for _, r in mine), 2), "status": state,
                     "message": message,
                     "tests": [{"test": n, **{k: r[k] for k in ("outcome", "error", "seconds")}} for n, r in mine]})
    return rows


def functions_label(functions: list[str]) -> str:
    """'data.py::a', 'data.py::b' -> 'data.py::a, b'."""
    out, last = [], None
    for spec in functions:
        file, qual = split_function(spec)
        out.append(qual if file == last else spec)
        last = file
    return ", ".join(out)


def print_table(rows: list[dict], width: int = 400) -> None:
    """One row per exercise; a FAIL's first failed assertion follows on its own line."""
    fw = max(len(functions_label(r["functions"])) for r in rows)
    print(f"{'id':<4} {'function(s)':<{fw}} {'tests':>5} {'points':>6} {'seconds':>7}  status")
    for r in rows:
        print(f"{r['id']:<4} {functions_label(r['functions']):<{fw}} {r['passed']:>2}/{r['total']:<2} "
              f"{r['earned']:>3}/{r['points']:<2} {r['seconds']:>7.2f}  {r['status']}")
        if r["message"]:
            print(f"     {r['message'] if len(r['message']) <= width else r['message'][:width - 3] + '...'}")


# ---------------------------------------------------------------------------------------------- the commands
def markdown_table(exercises: list[dict]) -> str:
    """The exercise table of ASSIGNMENTS.md (check (e) keeps the two equal)."""
    lines = ["| id | function(s) | exercise | paper | points | depends on |", "|---|---|---|---|---|---|"]
    for e in exercises:
        title, paper = (e[k].replace("|", "\\|") for k in ("title", "paper"))
        lines.append(f"| {e['id']} | `{functions_label(e['functions'])}` | {title} | {paper} | {e['points']} "
                     f"| {', '.join(e['depends_on']) or '–'} |")
    return "\n".join(lines)


def cmd_list(args) -> int:
    if args.markdown:
        print(markdown_table(load_manifest(ROOT)["exercises"]))
        return 0
    for e in load_manifest(ROOT)["exercises"]:
        deps = ", ".join(e["depends_on"]) or "-"
        print(f"{e['id']:<4} {functions_label(e['functions'])}  ({e['points']} points; depends on {deps}) "
              f"{e['title']}; {e['paper']}")
    return 0


def cmd_handout(args) -> int:
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    t0 = time.time()
    removed = write_handout(Path(args.out), only)
    print(f"wrote {args.out}: {len(removed)} function(s) blanked ({', '.join(only) if only else 'every exercise'}) "
          f"in {time.time() - t0:.1f} s; the students run `python tests/assignments.py grade`")
    return 0


def cmd_grade(args) -> int:
    exercises = load_manifest(ROOT)["exercises"]
    ids = [e["id"] for e in exercises]
    unknown = [k for k in args.ids if k not in ids]
    if unknown:
        raise SystemExit(f"error: unknown exercise(s) {unknown}; the exercises are {', '.join(ids)}")
    wanted = args.ids or ids
    need = set(wanted)
    for e in reversed(exercises):  # a row's status needs its dependencies' (course order: they come first)
        if e["id"] in need:
            need |= set(e["depends_on"])
    t0 = time.time()
    results = run_tests(ROOT, [k for k in ids if k in need])
    rows = [r for r in grade_rows(exercises, results, [k for k in ids if k in need]) if r["id"] in wanted]
    print_table(rows)
    earned, total = sum(r["earned"] for r in rows), sum(r["points"] for r in rows)
    n_pass = sum(r["status"] == "PASS" for r in rows)
    print(f"score: {earned}/{total} points ({n_pass} of {len(rows)} exercises pass) in {time.time() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"score": earned, "total": total, "exercises": rows}, indent=1) + "\n")
    return 0 if n_pass == len(wanted) else 1


def line_signatures(text: str, python: bool) -> list[str]:
    """Each line without whitespace (and, for Python, without comments): the unit of the near-copy check."""
    if python:
        try:
            lines: dict[int, list[str]] = {}
            skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                    tokenize.ENDMARKER)
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                if tok.type not in skip:
                    lines.setdefault(tok.start[0], []).append(re.sub(r"\s+", "", tok.string))
            return ["".join(v) for _, v in sorted(lines.items())]
        except (tokenize.TokenError, SyntaxError, IndentationError):
            pass
    return [re.sub(r"\s+", "", line) for line in text.split("\n")]


def near_copies(handout: Path, removed: dict[str, list[str]], min_chars: int = 16) -> list[str]:
    """Check (d): blanked bodies found in the handout, up to whitespace, comments and line breaks; a body counts as
    copied when at least half of its significant lines (>= min_chars without whitespace) appear somewhere."""
    blobs = {}
    for f in sorted(p for p in handout.rglob("*") if p.is_file()):
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # binary assets
        blobs[f.relative_to(handout).as_posix()] = "".join(line_signatures(text, f.suffix == ".py"))
    problems = []
    for spec, body in removed.items():
        sigs = [s for s in line_signatures(textwrap.dedent("\n".join(body)), True) if len(s) >= min_chars]
        if not sigs:
            continue
        found = {}
        for s in sigs:
            where = [f for f, blob in blobs.items() if s in blob]
            if where:
                found[s] = where
        if len(found) * 2 >= len(sigs):
            files = sorted({f for w in found.values() for f in w})
            problems.append(f"{spec}: {len(found)} of its {len(sigs)} significant lines appear in {files}, e.g. "
                            f"{next(iter(found))[:80]!r}")
    return problems


def cmd_check(args) -> int:
    t0 = time.time()
    manifest = load_manifest(ROOT)
    exercises = manifest["exercises"]
    problems = lint_manifest(ROOT, manifest)
    if problems:
        print("check (e) manifest: FAILED\n  " + "\n  ".join(problems))
        return 1
    ids = [e["id"] for e in exercises]
    jobs = args.jobs or min(4, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="assignments-check-") as tmp:
        variants = {"reference": ROOT}
        removed = write_handout(Path(tmp) / "all", None, ROOT)
        variants["all"] = Path(tmp) / "all"
        for k in ids:
            write_handout(Path(tmp) / k, [k], ROOT)
            variants[k] = Path(tmp) / k
        t_write = time.time() - t0
        with ThreadPoolExecutor(jobs) as pool:
            futures = {name: pool.submit(run_tests, path, ids) for name, path in variants.items()}
            runs = {name: f.result() for name, f in futures.items()}
        copies = near_copies(Path(tmp) / "all", removed)
    ref = runs["reference"]
    report: list[tuple[str, list[str]]] = []

    # (e) the collected tests: one exercise marker each, every exercise has tests, each exercise fast enough
    lint = [f"{n}: collection error" for n in ref.get("collection_errors", [])]
    lint += [f"{n}: {len(r['markers'])} exercise markers {r['markers']} (exactly one)" for n, r in ref["tests"].items()
             if len(r["markers"]) != 1]
    tests = by_exercise(ref)
    lint += [f"{k}: no test carries its marker" for k in ids if k not in tests]
    lint += [f"{k}: its tests took {sum(r['seconds'] for _, r in tests[k]):.1f} s (limit {MAX_SECONDS:.0f} s)"
             for k in ids if k in tests and sum(r["seconds"] for _, r in tests[k]) > MAX_SECONDS]
    n_tests = sum(len(v) for v in tests.values())
    report.append((f"(e) manifest: {len(ids)} exercises, {sum(len(e['functions']) for e in exercises)} functions, "
                   f"{n_tests} tests with one exercise marker each", lint))

    # (a) the reference passes everything
    bad = [f"{n}: {r['outcome']} {r['error']}".rstrip() for n, r in ref["tests"].items()
           if r["outcome"] != "passed" and r["markers"]]
    report.append((f"(a) reference: every exercise passes ({n_tests} tests, "
                   f"{sum(r['seconds'] for r in ref['tests'].values()):.1f} s)", bad))

    def closure(k):  # the exercises whose tests blanking k may fail
        return {k} | dependents(exercises, k)

    broken = {n for n, r in ref["tests"].items() if r["outcome"] == "failed"}  # reported by (a) already

    def failures(run, blanked: set[str]):
        """Wrong outcomes in a handout blanking `blanked`: tests of affected exercises must fail on a
        NotImplementedError of a blanked exercise; every other test must pass."""
        affected = set().union(*(closure(k) for k in blanked))
        out = []
        for n, r in run["tests"].items():
            if len(r["markers"]) != 1 or r["outcome"] in ("deselected", "skipped") or n in broken:
                continue
            m = NOT_IMPLEMENTED.match(r["error"])
            if r["markers"][0] in affected:
                if r["outcome"] != "failed":
                    out.append(f"{n}: passed, although it belongs to {r['markers'][0]}")
                elif not m or m[1] not in blanked:
                    out.append(f"{n}: failed on {r['error'][:120]!r}, not on a blanked exercise")
            elif r["outcome"] != "passed":
                out.append(f"{n}: {r['outcome']} ({r['error'][:120]}) although {r['markers'][0]} does not depend on "
                           f"the blanked {sorted(blanked)}: undeclared dependency or broken isolation")
        return out + [f"collection error: {c}" for c in run.get("collection_errors", [])]

    # (b) the full handout: every test fails, every row is TODO or BLOCKED
    bad = failures(runs["all"], set(ids))
    bad += [f"{r['id']}: {r['status']}" for r in grade_rows(exercises, runs["all"], ids)
            if not (r["status"] == "TODO" or r["status"].startswith("BLOCKED"))]
    report.append((f"(b) full handout: every exercise test fails ({n_tests} tests), every row TODO or BLOCKED", bad))

    # (c) isolation, one exercise at a time
    bad = [f"blanking {k} only: {p}" for k in ids for p in failures(runs[k], {k})]
    report.append((f"(c) isolation: each of the {len(ids)} single-exercise handouts fails exactly its own and its "
                   "dependents' tests", bad))

    # (d) no body survives
    report.append((f"(d) no blanked body ({len(removed)}) or near copy of one anywhere in the handout", copies))

    ok = True
    for title, bad in report:
        print(f"check {title}: {'ok' if not bad else 'FAILED'}")
        for p in bad[:20]:
            print(f"    {p}")
        if len(bad) > 20:
            print(f"    ... and {len(bad) - 20} more")
        ok &= not bad
    print(f"check {'passed' if ok else 'FAILED'} in {time.time() - t0:.0f} s ({len(variants)} pytest runs, {jobs} at "
          f"a time; handouts written in {t_write:.1f} s)")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="one line per exercise")
    ls.add_argument("--markdown", action="store_true", help="the table of ASSIGNMENTS.md instead")
    h = sub.add_parser("handout", help="write a student copy of the repository")
    h.add_argument("out", help="a new (or empty) folder outside the repository")
    h.add_argument("--only", default="", help="comma-separated exercise ids to blank (default: all)")
    g = sub.add_parser("grade", help="run the exercise tests and print one row per exercise")
    g.add_argument("ids", nargs="*", help="exercise ids (default: all)")
    g.add_argument("--json", default="", help="also write the rows to this file")
    c = sub.add_parser("check", help="the guarantees (a)-(e), on throwaway handouts")
    c.add_argument("--jobs", type=int, default=0, help="pytest processes at a time (default: the cores, at most 4)")
    args = ap.parse_args(argv)
    return {"list": cmd_list, "handout": cmd_handout, "grade": cmd_grade, "check": cmd_check}[args.cmd](args)


# ------------------------------------------------------------------------------ the pytest plugin (-p assignments)
_RESULTS: dict[str, dict] = {}
_COLLECTION_ERRORS: list[str] = []


def _first_line(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().split("\n")[0].removeprefix("AssertionError: ")


if os.environ.get("ASSIGNMENTS_RESULTS"):
    import pytest

    @pytest.hookimpl(tryfirst=True)  # before -m deselects anything: every collected test is recorded
    def pytest_collection_modifyitems(session, config, items):
        known = {e["id"] for e in load_manifest(ROOT)["exercises"]}
        for item in items:
            _RESULTS[item.nodeid] = {"markers": [m.name for m in item.iter_markers() if m.name in known],
                                     "outcome": "deselected", "error": "", "seconds": 0.0}

    def pytest_collectreport(report):
        if report.failed:
            _COLLECTION_ERRORS.append(f"{report.nodeid}: {_first_line(report)}")

    def pytest_runtest_logreport(report):
        r = _RESULTS.get(report.nodeid)
        if r is None:
            return
        r["seconds"] = round(r["seconds"] + report.duration, 4)
        if report.failed:
            if r["outcome"] != "failed":
                r["outcome"], r["error"] = "failed", _first_line(report)
        elif report.skipped and r["outcome"] != "failed":
            r["outcome"] = "skipped"
        elif report.when == "call" and r["outcome"] not in ("failed", "skipped"):
            r["outcome"] = "passed"

    def pytest_sessionfinish(session, exitstatus):
        Path(os.environ["ASSIGNMENTS_RESULTS"]).write_text(json.dumps(
            {"tests": _RESULTS, "collection_errors": _COLLECTION_ERRORS}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
