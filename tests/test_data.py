"""Tests for data.py: Tk-Instruct prompts character for character, HF tokenizer parity, SNI/P3 readers,
a|b|c splits, the built-in suite (determinism, held-out split, rules re-checked from the definition text), batching."""
import gzip
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SNI_DIR, T5_DIR = SHARED / "data" / "sni", SHARED / "data" / "t5_spiece"

TASK = {
    "name": "task001_toy",
    "Definition": ["Given a word, write it backwards"],
    "Positive Examples": [{"input": "cat", "output": "tac", "explanation": "Reversed"},
                          {"input": "Is it dog?", "output": ["god"], "explanation": "d-o-g reversed."}],
    "Negative Examples": [{"input": "sun", "output": "sun", "explanation": "Not reversed"}],
    "Instances": [{"id": "task001-0", "input": "  bird ", "output": ["drib", "DRIB"]}],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The real T5 vocabulary when present, else a small one trained here."""
    if (T5_DIR / "spiece.model").is_file():
        return data.Tokenizer(T5_DIR / "spiece.model")
    texts = [data.sni_prompt(TASK, w, num_neg=1) for w in ["bird", "fish", "café", "a b c"]] * 20
    return data.train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model", 150)


# ------------------------------------------------------------------------------------------------- prompts
def test_prompt_two_positive_examples_exact(tmp_path):
    task = data.load_sni_task(write_task(TASK, tmp_path))  # also normalises the list output ["god"] -> "god"
    assert data.sni_prompt(task, "  bird ") == (
        "Definition: Given a word, write it backwards.\n\n"
        " Positive Example 1 -\nInput: cat.\n Output: tac.\n\n"
        " Positive Example 2 -\nInput: Is it dog?\n Output: god.\n\n"
        "Now complete the following example -\nInput: bird.\nOutput: ")


def test_prompt_final_punctuation_task_name_negatives_explanations():
    task = {**TASK, "Definition": ["  Reverse the word!  "], "Positive Examples": TASK["Positive Examples"][:1]}
    assert data.sni_prompt(task, "x;", num_pos=2, num_neg=1, add_task_name=True, add_explanation=True) == (
        "task001_toy. Definition: Reverse the word!\n\n"
        " Positive Example 1 -\nInput: cat.\n Output: tac.\n Explanation: Reversed.\n\n"
        " Negative Example 1 -\nInput: sun.\n Output: sun.\n Explanation: Not reversed.\n\n"
        "Now complete the following example -\nInput: x;\nOutput: ")
    assert data.sni_prompt(task, "x", num_pos=0) == (
        "Definition: Reverse the word!\n\nNow complete the following example -\nInput: x.\nOutput: ")


def test_prompt_non_ascii_and_helpers():
    task = {**TASK, "Definition": ["Übersetze ins Deutsche – kurz…"], "Positive Examples": [
        {"input": "café crème", "output": "Kaffee 日本"}]}
    assert data.sni_prompt(task, "naïve 😀") == (
        "Definition: Übersetze ins Deutsche – kurz….\n\n"
        " Positive Example 1 -\nInput: café crème.\n Output: Kaffee 日本.\n\n"
        "Now complete the following example -\nInput: naïve 😀.\nOutput: ")
    assert data.instance_text("a b") == "Now complete the following example -\nInput: a b.\nOutput: "
    assert data.instruction_text(task) == "Definition: Übersetze ins Deutsche – kurz…."
    assert data.instruction_text(task, num_pos=1, add_task_name=True) == (
        "task001_toy. Definition: Übersetze ins Deutsche – kurz….\n\n"
        " Positive Example 1 -\nInput: café crème.\n Output: Kaffee 日本.")


def test_fit_prompt_drops_examples_that_do_not_fit(tok):
    one, two = (tok.encode(data.sni_prompt(TASK, "bird", num_pos=k)) for k in (1, 2))
    assert len(two) > len(one)
    assert data.fit_prompt(TASK, "bird", tok, 10_000) == two
    assert data.fit_prompt(TASK, "bird", tok, len(two) - 1) == one  # example 2 no longer fits
    assert tok.decode(one) == tok.decode(tok.encode(
        "Definition: Given a word, write it backwards.\n\n Positive Example 1 -\nInput: cat.\n Output: tac.\n\n"
        "Now complete the following example -\nInput: bird.\nOutput: "))
    cut = data.fit_prompt(TASK, "bird", tok, 8)  # not even the definition fits: HF truncation keeps eos
    assert len(cut) == 8 and cut[-1] == tok.eos_id and cut[:7] == tok.encode(data.sni_prompt(TASK, "bird", 0))[:7]


# ---------------------------------------------------------------------------------------------- SNI files
def write_task(task, folder, name="task001_toy"):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({k: v for k, v in task.items() if k != "name"}) if not isinstance(task, str) else task)
    return path


@pytest.mark.parametrize("broken, field", [
    ({k: v for k, v in TASK.items() if k != "Definition"}, "Definition"),
    ({**TASK, "Instances": {"a": 1}}, "Instances"),
    ('{"Definition": ["x"], "Instances": [', "broken JSON"),
    ({**TASK, "Instances": [{"input": "a", "output": "b"}]}, "Instances[0].output"),
    ({**TASK, "Definition": []}, "Definition"),
    ({**TASK, "Positive Examples": [{"input": "a"}]}, "Positive Examples[0].output"),
])
def test_malformed_task_files_name_file_and_field(tmp_path, broken, field):
    path = write_task(broken, tmp_path)
    with pytest.raises(ValueError) as err:
        data.load_sni_task(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_load_sni_split_and_first_instances(tmp_path):
    for k in range(3):
        write_task({**TASK, "Instances": [{"input": f"w{i}", "output": ["x"]} for i in range(5)],
                    "Input_language": ["English"], "Output_language": ["German" if k == 2 else "English"]},
                   tmp_path / "tasks", f"task{k}")
    (tmp_path / "splits" / "default").mkdir(parents=True)
    (tmp_path / "splits" / "default" / "train_tasks.txt").write_text("task0\ntask1\ntask2\ntask9\n")
    with pytest.raises(ValueError, match="task9.json"):
        data.load_sni(tmp_path)
    tasks = data.load_sni(tmp_path, max_instances=3, missing_ok=True)
    assert [t["name"] for t in tasks] == ["task0", "task1"]  # task2 is not English, task9 is missing
    assert [x["input"] for x in tasks[0]["Instances"]] == ["w0", "w1", "w2"]
    assert len(data.load_sni(tmp_path, english_only=False, missing_ok=True)) == 3


def test_real_sni_sample_loads_and_renders(tok):
    if not (SNI_DIR / "tasks").is_dir():
        pytest.skip(f"{SNI_DIR} not present")
    files = sorted((SNI_DIR / "tasks").glob("*.json"))
    for f in files:
        task = data.load_sni_task(f)
        for inst in task["Instances"]:
            prompt = data.sni_prompt(task, inst["input"], num_pos=2, num_neg=2, add_explanation=True)
            assert prompt.startswith("Definition: ") and prompt.endswith("\nOutput: ")
            assert "Now complete the following example -\nInput: " + inst["input"].strip() in prompt
        assert len(data.fit_prompt(task, task["Instances"][0]["input"], tok, 64)) <= 64
    names = {t["name"] for part in ("train", "test") for t in data.load_sni(SNI_DIR, part=part, missing_ok=True)}
    assert names == {f.stem for f in files}
    if len(names) < 875:
        with pytest.raises(ValueError, match="missing"):
            data.load_sni(SNI_DIR, part="test")


# ---------------------------------------------------------------------------------------------- tokenizer
PARITY = ["Hello world", "", " ", "   leading and trailing   ", "multiple    spaces\tand\ttabs", "line\nbreak\n\n",
          "a <extra_id_0> b<extra_id_1>", "<extra_id_0>", "x<extra_id_99>y", " <extra_id_5>  z", "a\n<extra_id_2>\nb",
          "<extra_id_100> is not a sentinel", "<extra_id_3 half", "<pad> and </s> and <unk>", "a</s>b", "ünïcödé",
          "日本語のテキスト", "emoji 😀👍🏽 end", "e\u0301 combining", "ﬁ ligature ½ Ⅻ", "zero\u200bwidth", "nbsp\u00a0here",
          "ideographic\u3000space", "NEL\x85inside", "\x85", "mojibake toÂ \"quote\"", "It is n't ok . Yes , no !",
          "what ?", "I 'm sure you 've seen it 're 's", "3.14159 and 42", "Output: ", "Now complete the following "
          "example -\nInput: cat.\nOutput: ", "(brackets) [square] {curly}", "tabs\t\t\tonly", "\r\nwindows\r\n",
          "UPPER lower MiXeD", "don't won't can't", "a-b_c/d\\e", "email@example.com", "https://x.org/a?b=c",
          "  <extra_id_7>  <extra_id_8>  ", "<extra_id_0><extra_id_1>", "Ελληνικά κείμενο", "Русский текст",
          "עברית", "العربية", "한국어", "\ufeffBOM", "form\x0cfeed", "line\u2028sep", "#hashtag @mention $5 %",
          "..., ;; :: !!", "'quoted' \"double\""]


def test_tokenizer_matches_hugging_face():
    if not (T5_DIR / "spiece.model").is_file():
        pytest.skip(f"{T5_DIR} not present")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(T5_DIR))
    ours = data.Tokenizer(T5_DIR / "spiece.model")
    assert (ours.vocab_size, ours.sentinel_id(0), ours.sentinel_id(99)) == (32100, 32099, 32000)
    assert len(PARITY) >= 50
    for text in PARITY:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_eos=False) == ids[:-1]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.decode(torch.tensor(ids + [-100])) == hf.decode(ids, skip_special_tokens=True)


def test_train_tokenizer_is_deterministic(tmp_path):
    texts = [f"the {w} sat on the mat number {i}" for i, w in enumerate(["cat", "dog", "bird"] * 30)]
    a = data.train_tokenizer(texts, tmp_path / "a.model", 60)
    b = data.train_tokenizer(iter(texts), tmp_path / "b.model", 60)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert (a.pad_id, a.eos_id, a.unk_id, a.vocab_size) == (0, 1, 2, b.sp.get_piece_size() + 100)
    assert a.decode(a.encode("the cat sat")) == "the cat sat" and a.encode("x <extra_id_0>")[-2:] == [a.vocab_size - 1, 1]


# ------------------------------------------------------------------------------------------------ a | b | c
def test_split_abc_is_a_contiguous_window():
    for seed in range(300):
        rng = random.Random(seed)
        n, caps = rng.randint(3, 60), (rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9))
        ids = list(range(100, 100 + n))
        a, b, c = data.split_abc(ids, random.Random(seed), *caps)
        window, start = a + b + c, a[0] - 100
        assert all(1 <= len(p) <= m for p, m in zip((a, b, c), caps))
        assert window == ids[start:start + len(window)]  # contiguous
        assert len(window) == min(n, sum(caps)) and (n > sum(caps) or window == ids)
    with pytest.raises(ValueError):
        data.split_abc([1, 2], random.Random(0))


# ---------------------------------------------------------------------------------------------------- suite
RULES = {  # written independently of data.py: the definition text alone decides the answer
    r"Answer yes if the word (?P<a>\w+) appears in the input and no if it does not\.": "contains",
    r"Does the word (?P<a>\w+) occur in the input \? Answer yes or no\.": "contains",
    r"Find the word (?P<a>\w+) in the input and answer with the word that follows it\.": "after",
    r"Output the word that comes right after the word (?P<a>\w+) in the input\.": "after",
    r"Give the position of the word (?P<a>\w+) in the input counting from 1\.": "position",
    r"Where is the word (?P<a>\w+) in the input \? Answer with its position starting at 1\.": "position",
    r"Answer yes if the word (?P<a>\w+) comes before the word (?P<b>\w+) in the input and no otherwise\.": "order",
    r"Both (?P<a>\w+) and (?P<b>\w+) are in the input \. Is (?P=a) the first of the two \? Answer yes or no\.": "order",
    r"If the input contains the word (?P<a>\w+) answer (?P<b>\w+) and otherwise answer (?P<c>\w+) instead\.": "label",
    r"Answer (?P<b>\w+) when the word (?P<a>\w+) is in the input and (?P<c>\w+) when it is not\.": "label",
    r"Exactly one of the words (?P<a>\w+) and (?P<b>\w+) is in the input \. Answer with that word\.": "choose",
    r"The input holds either (?P<a>\w+) or (?P<b>\w+) but not both \. Which one is it \?": "choose",
    r"Write the word (?P<a>\w+) and then the first word of the input\.": "prefix",
    r"Answer with (?P<a>\w+) followed by the word that starts the input\.": "prefix",
    r"Copy the input but write the word (?P<b>\w+) wherever the word (?P<a>\w+) appears\.": "replace",
    r"Rewrite the input with (?P<a>\w+) replaced by (?P<b>\w+) and keep all other words\.": "replace",
}
SOLVE = {
    "contains": lambda w, a, **_: "yes" if a in w else "no",
    "after": lambda w, a, **_: w[w.index(a) + 1],
    "position": lambda w, a, **_: str(w.index(a) + 1),
    "order": lambda w, a, b, **_: "yes" if w.index(a) < w.index(b) else "no",
    "label": lambda w, a, b, c: b if a in w else c,
    "choose": lambda w, a, b: a if a in w else b,
    "prefix": lambda w, a: f"{a} {w[0]}",
    "replace": lambda w, a, b: " ".join(b if x == a else x for x in w),
}


def parse_rule(definition):
    for pattern, family in RULES.items():
        m = re.fullmatch(pattern, definition)
        if m:
            return family, m.groupdict()
    raise AssertionError(f"definition matches no rule: {definition!r}")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return data.ensure_suite(tmp_path_factory.mktemp("suite"), seed=0)


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_suite_is_deterministic_per_seed(suite, tmp_path):
    again = data.ensure_suite(tmp_path / "again", seed=0)
    assert files_of(suite) == files_of(again)  # tasks, splits and the trained spiece.model, byte for byte
    other = files_of(data.make_suite(tmp_path / "other", seed=1))
    assert {k: v for k, v in files_of(suite).items() if k.startswith(("tasks", "splits"))} != other
    assert all(v.endswith(b"\n") for v in other.values())
    with pytest.raises(ValueError, match="seed"):
        data.ensure_suite(suite, seed=1)


def test_suite_rules_follow_from_definitions(suite):
    train, test = (data.load_sni(suite, part=p, max_instances=None) for p in ("train", "test"))
    families = {parse_rule(t["Definition"][0])[0] for t in train}
    assert len(families) >= 6 and len(train) >= 40 and len(test) >= 12
    params_of = {"train": set(), "test": set()}
    for part, tasks in (("train", train), ("test", test)):
        for task in tasks:
            family, params = parse_rule(task["Definition"][0])
            assert task["Categories"] == [family] and len(task["Instances"]) >= 140
            params_of[part].add((family, tuple(sorted(params.items()))))
            outputs = []
            for x in task["Instances"] + task["Positive Examples"]:
                words = x["input"].split()
                assert 4 <= len(words) <= 7 and len(set(words)) == len(words) and set(words) <= set(data.SUITE_WORDS)
                ref = x["output"] if isinstance(x["output"], list) else [x["output"]]
                assert ref == [SOLVE[family](words, **params)], (task["name"], x)
                outputs.append(ref[0])
            if family in ("contains", "order", "label", "choose"):
                assert 0.35 < outputs.count(outputs[0]) / len(outputs) < 0.65  # two balanced classes
    train_defs = {t["Definition"][0] for t in train}
    assert not any(t["Definition"][0] in train_defs for t in test)  # every held-out definition is new
    assert {f for f, _ in params_of["test"]} == families
    for family, params in params_of["test"]:
        trained = [dict(p) for f, p in params_of["train"] if f == family]
        for slot, word in params:  # each named word filled the same slot in some training task of the family...
            assert any(p[slot] == word for p in trained), (family, slot, word)
        if len(params) > 1:  # ...but never together with the others; one word: trained under the other wording
            assert dict(params) not in trained


def test_suite_tokenizer(suite):
    tok = data.Tokenizer(suite / "spiece.model")
    assert 500 <= tok.vocab_size - 100 <= 700
    words = {w for text in data.suite_texts(suite)[1:] for w in re.findall(r"[A-Za-z]+|\d+", text)}
    assert {w: tok.sp.encode(w, out_type=str) for w in words if len(tok.encode(w, add_eos=False)) > 2} == {}
    ex = data.sni_examples(data.load_sni(suite, part="test", max_instances=1))[0]
    assert tok.decode(tok.encode(ex.target)) == ex.target and data.Tokenizer(suite / "spiece.model").unk_id not in \
        tok.encode(ex.prompt)


# --------------------------------------------------------------------------------------------------- batching
@pytest.fixture(scope="module")
def batcher_parts(suite):
    tasks = data.load_sni(suite, part="train", max_instances=5)
    return data.sni_examples(tasks), data.Tokenizer(suite / "spiece.model")


def test_batcher_determinism_and_shards(batcher_parts):
    examples, tok = batcher_parts
    a, b = (data.Batcher(examples, tok, 8, seed=3) for _ in range(2))
    for step in (0, 1, 57, 1000):  # same (seed, step) -> same batch, in any order of calls
        ga, gb = a.batch(step), b.batch(step)
        assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert not torch.equal(a.batch(0)["labels"], data.Batcher(examples, tok, 8, seed=4).batch(0)["labels"])
    assert len(examples) % 8 == 0
    epoch = [i for s in range(len(examples) // 8) for i in a.global_indices(s)]
    assert sorted(epoch) == list(range(len(examples)))  # one epoch visits every example once
    full = a.collate(a.global_indices(5))
    shards = [a.batch(5, rank=r, world_size=4) for r in range(4)]
    for k in ("input_ids", "labels", "prompt_ids", "instruction_ids", "task_idx"):
        width = full[k].shape[-1] if full[k].dim() == 2 else None
        fill = -100 if k == "labels" else 0
        cat = torch.cat([torch.nn.functional.pad(s[k], (0, width - s[k].shape[-1]), value=fill) if width else s[k]
                         for s in shards])
        assert torch.equal(cat, full[k]), k
    with pytest.raises(ValueError, match="world_size"):
        a.batch(0, rank=0, world_size=3)
    c = data.Batcher(examples, tok, 8, seed=3, bucket=True)
    assert torch.equal(c.batch(7)["input_ids"], data.Batcher(examples, tok, 8, seed=3, bucket=True).batch(7)["input_ids"])


def test_batch_padding_conventions(batcher_parts):
    examples, tok = batcher_parts
    bt = data.Batcher(examples, tok, 4, tasks=sorted({e.task for e in examples}, reverse=True), max_source_len=40)
    idx = bt.global_indices(2)
    b = bt.batch(2)
    for i, j in enumerate(idx):
        e = examples[j]
        src, tgt = tok.encode(e.source), tok.encode(e.target)
        assert b["input_ids"][i, :len(src)].tolist() == src and b["attention_mask"][i].sum() == len(src)
        assert b["input_ids"][i, len(src):].eq(0).all() and b["attention_mask"][i, len(src):].eq(0).all()
        assert b["labels"][i, :len(tgt)].tolist() == tgt and b["labels"][i, len(tgt):].eq(-100).all()
        assert b["prompt_mask"][i].sum() <= 40 and b["prompt_ids"][i, b["prompt_mask"][i].sum() - 1] == tok.eos_id
        assert bt.tasks[b["task_idx"][i]] == e.task and tok.decode(b["instruction_ids"][i]).startswith("Definition:")
    assert max(b["attention_mask"].sum(1)) == b["input_ids"].shape[1]  # dynamic padding to the longest
    got = [ex for chunk, _ in bt.iter_eval(7) for ex in chunk]
    assert got == examples and len(bt) == len(examples)


def test_pretrain_batcher(suite):
    tok = data.Tokenizer(suite / "spiece.model")
    pb = data.PretrainBatcher.from_texts((t["Definition"][0] * 3 for t in data.load_sni(suite, max_instances=1)),
                                         tok, max_docs=20, batch_size=4, max_a=9, max_b=7, max_c=5)
    assert len(pb) == 20
    x, y = pb.batch(3), pb.batch(3)
    assert all(torch.equal(x[k], y[k]) for k in x) and x["labels"].shape[1] <= 6 and x["input_ids"].shape[1] <= 8
    for i in range(4):
        n = int(x["attention_mask"][i].sum())
        assert x["input_ids"][i, n - 1] == tok.eos_id and (x["labels"][i] != -100).sum() >= 2


# ------------------------------------------------------------------------------------------------- P3, text
def test_p3_reader(tmp_path):
    (tmp_path / "super_glue_copa").mkdir()
    rows = [{"inputs_pretokenized": "Pick one: A or B?", "targets_pretokenized": "B ", "answer_choices": ["A", "B"]},
            {"inputs_pretokenized": "Pick one: C or D?", "targets_pretokenized": "C", "answer_choices": ["C", "D"],
             "is_correct": False}]
    (tmp_path / "super_glue_copa" / "choose_best.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    records = data.load_p3(tmp_path)
    assert [r["target"] for r in records] == ["B ", "C"] and records[0]["dataset"] == "super_glue_copa"
    items = data.p3_rank_items(records)
    assert items == [{"inputs": "Pick one: A or B?", "choices": ["A", "B"], "answer": 1, "task": "super_glue_copa",
                      "prompt": "choose_best", "instruction": "choose best (super glue copa)"}]
    (ex,) = data.p3_examples(records)
    assert (ex.source, ex.prompt, ex.target, ex.instruction) == (
        "Pick one: A or B?", "Pick one: A or B?", "B ", "choose best (super glue copa)")
    (tmp_path / "super_glue_copa" / "bad.jsonl").write_text(json.dumps({"inputs_pretokenized": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'targets_pretokenized'"):
        data.load_p3(tmp_path)


def test_iter_texts(tmp_path):
    (tmp_path / "c4").mkdir()
    with gzip.open(tmp_path / "c4" / "c4-00000.json.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "first doc\u0085 with NEL", "url": "u"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    (tmp_path / "c4" / "more.json").write_text(json.dumps({"text": "c"}) + "\n")
    (tmp_path / "notes.txt").write_text("para one\nstill one\n\n\npara two\n")
    assert list(data.iter_texts([tmp_path / "c4", tmp_path / "notes.txt"])) == [
        "first doc\u0085 with NEL", "b", "c", "para one\nstill one", "para two"]
    (tmp_path / "bad.json").write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.json:1"):
        list(data.iter_texts(tmp_path / "bad.json"))
