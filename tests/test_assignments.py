"""The classroom tooling (tests/assignments.py, ASSIGNMENTS.md): blanking keeps every other byte, a handout is the
repository minus the selected bodies, the near-copy check finds a leaked body, grade's statuses, and the hand-worked
oracle tables of tests/test_exercises.py against the reference package. `python tests/assignments.py check` (the
README's test command) runs the end-to-end guarantees on throwaway handouts."""
import filecmp
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assignments  # noqa: E402

SOURCE = '''"""A module."""
import torch


@torch.no_grad()
def first(x,
          y=1):  # a signature over two lines
    """Docstring: kept
    exactly, ünïcode too."""
    z = x + y   # a comment
    # a comment line inside the body

    return z
    # a trailing comment of the body


class K:
    def method(self):
        """Short."""
        def inner():
            return 2
        return inner()

    def kept(self):
        """Not blanked."""
        return 3
'''
BLANKED = '''"""A module."""
import torch


@torch.no_grad()
def first(x,
          y=1):  # a signature over two lines
    """Docstring: kept
    exactly, ünïcode too."""
    raise NotImplementedError('E1 m.py::first: see ASSIGNMENTS.md')


class K:
    def method(self):
        """Short."""
        raise NotImplementedError('E2 m.py::K.method: see ASSIGNMENTS.md')

    def kept(self):
        """Not blanked."""
        return 3
'''


def test_blank_source_replaces_the_body_and_keeps_every_other_byte():
    text, removed = assignments.blank_source(SOURCE, [("first", "E1 m.py::first: see ASSIGNMENTS.md"),
                                                      ("K.method", "E2 m.py::K.method: see ASSIGNMENTS.md")])
    assert text == BLANKED
    assert removed["K.method"] == ["        def inner():", "            return 2", "        return inner()"]
    with pytest.raises(ValueError):
        assignments.blank_source(SOURCE, [("K.missing", "x")])


def test_handout_of_one_exercise_differs_from_the_repository_only_in_its_body(tmp_path):
    root, out = assignments.ROOT, tmp_path / "handout"
    removed = assignments.write_handout(out, ["E4"], root)
    assert list(removed) == ["model.py::lora"] and not (out / ".git").exists()
    files = assignments.repo_files(root)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == files
    assert [f for f in files if not filecmp.cmp(root / f, out / f, shallow=False)] == ["model.py"]
    ours, theirs = (root / "model.py").read_text().split("\n"), (out / "model.py").read_text().split("\n")
    assert len(ours) - len(theirs) == len(removed["model.py::lora"]) - 1
    changed = [line for line in theirs if line not in ours]
    assert changed == ['    raise NotImplementedError(\'E4 model.py::lora: see ASSIGNMENTS.md\')']
    with pytest.raises(SystemExit):
        assignments.write_handout(out, ["E4"], root)  # not over an existing handout
    with pytest.raises(SystemExit):
        assignments.write_handout(tmp_path / "other", ["E99"], root)


def test_near_copy_check_finds_a_leaked_body(tmp_path):
    out = tmp_path / "handout"
    removed = assignments.write_handout(out, ["E4", "E15"], assignments.ROOT)
    assert assignments.near_copies(out, removed) == []
    body = removed["train.py::get_lr"]  # pasted into the notes with other spacing and a comment, split differently
    leak = "\n".join(line.replace(" * ", "*").replace("+ 0.45", "+0.45  # the cosine") for line in body)
    (out / "NOTES.md").write_text("Solution:\n```\n" + leak + "\n```\n")
    problems = assignments.near_copies(out, removed)
    assert len(problems) == 1 and problems[0].startswith("train.py::get_lr:") and "NOTES.md" in problems[0]


def test_grade_statuses():
    exercises = [{"id": f"E{k}", "functions": [f"m.py::f{k}"], "title": "", "points": k,
                  "depends_on": ["E1"] if k == 4 else []} for k in (1, 2, 3, 4)]
    tests = {"t::a": ("E1", "passed", ""), "t::b": ("E1", "failed", "f1: max |Δ| 0.5 at [0] (tolerance 1e-06)"),
             "t::c": ("E2", "passed", ""), "t::d": ("E3", "failed", "NotImplementedError: E3 m.py::f3: see ASSIGNMENTS.md"),
             "t::e": ("E4", "passed", ""), "t::f": ("E2", "skipped", "")}
    results = {"tests": {n: {"markers": [m], "outcome": o, "error": err, "seconds": 0.1}
                         for n, (m, o, err) in tests.items()}}
    rows = {r["id"]: r for r in assignments.grade_rows(exercises, results, ["E1", "E2", "E3", "E4"])}
    assert rows["E1"]["status"] == "FAIL" and "max |Δ| 0.5 at [0]" in rows["E1"]["message"]
    assert (rows["E2"]["status"], rows["E2"]["passed"], rows["E2"]["total"], rows["E2"]["earned"]) == ("PASS", 1, 1, 2)
    assert rows["E3"]["status"] == "TODO" and rows["E3"]["earned"] == 0
    assert rows["E4"]["status"] == "BLOCKED by E1" and rows["E4"]["earned"] == 0


def test_bucket_table_of_the_exercise_tests_matches_transformers():
    """The hand-worked buckets in tests/test_exercises.py are T5's: transformers' own function gives the same."""
    T5Attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention
    import torch
    from test_exercises import BUCKETS, REL
    for (bidirectional, n, d), want in BUCKETS.items():
        got = T5Attention._relative_position_bucket(torch.tensor(REL), bidirectional=bidirectional, num_buckets=n,
                                                    max_distance=d)
        assert got.tolist() == want, (bidirectional, n, d)
