"""Data for TAGI: tokenizer, SNI and P3 readers, Tk-Instruct prompts, pretraining splits, the built-in suite, batching.

Serves the paper's §4.1 (datasets: Super-NaturalInstructions and P3), §3.3 (hypernetwork pretraining on C4, where a
text is cut into instruction | input | output) and DESIGN.md §8. Everything the model sees is built here:

  teacher (Tk-Instruct)  : prompt = [task name. ]Definition + k positive examples + "Now complete ... Input: x. Output: "
  student (TAGI)         : input  = "Now complete the following example -\\nInput: x.\\nOutput: " (instance only)
  hypernetwork           : instruction = the prompt's part before "Now complete ..." (definition [+ examples])

Local file layouts read here (nothing is downloaded):
  SNI  <dir>/tasks/<task>.json and <dir>/splits/<split>/{train,test}_tasks.txt  (the upstream layout)
  P3   <dir>/<dataset>/<prompt>.jsonl, one JSON object per line with bigscience/P3's field names:
       {"inputs_pretokenized": str, "targets_pretokenized": str, "answer_choices": [str] (optional),
        "is_correct": bool (optional, `_score_eval` variants: only the line with is_correct true is ranked)}
  text C4 shards *.json / *.json.gz / *.jsonl(.gz) with one {"text": ...} per line; *.txt files, where one document is
       one paragraph (lines up to the next blank line, joined by "\\n").
  suite make_suite() writes the built-in instruction suite in SNI's own layout, so load_sni() reads it unchanged.

Run `python data.py runs/suite` to build the suite and its tokenizer and print a few prompts.
"""
import argparse
import gzip
import io
import itertools
import json
import random
import re
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

# ----------------------------------------------------------------------------------------------------- tokenizer
NUM_SENTINELS = 100
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # Unicode White_Space (Rust's)
# Hugging Face splits the raw text on its added tokens first: <extra_id_k> eats the whitespace on both sides
# (lstrip/rstrip in tokenizer.json); <pad>, </s>, <unk> do not. Every other piece goes through SentencePiece.
_SPECIAL = re.compile(rf"[{_WS}]*<extra_id_([0-9]|[1-9][0-9])>[{_WS}]*|<pad>|</s>|<unk>")
_CLEANUP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]  # transformers' clean_up_tokenization


class Tokenizer:
    """A SentencePiece model plus T5's 100 sentinels; ids equal Hugging Face's T5 tokenizer (pad 0, eos 1, unk 2)."""

    def __init__(self, model_file):
        self.path = Path(model_file)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such SentencePiece model file")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
        if (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()) != (0, 1, 2):
            raise ValueError(f"{self.path}: need pad=0, eos=1, unk=2, got "
                             f"{self.sp.pad_id()}, {self.sp.eos_id()}, {self.sp.unk_id()}")
        self.num_pieces = self.sp.get_piece_size()
        self.vocab_size = self.num_pieces + NUM_SENTINELS  # 32100 for T5

    def sentinel_id(self, k: int) -> int:
        """<extra_id_k> counts down from the top: <extra_id_0> = vocab_size - 1 (32099 for T5)."""
        return self.num_pieces + NUM_SENTINELS - 1 - k

    def _pieces(self, text: str) -> list[int]:
        # tokenizers' normaliser turns U+0085 into a space where SentencePiece's own maps it to <unk> (the only
        # single code point where the two differ, checked over all of them); SNI task719 contains one.
        return self.sp.encode(text.replace("\x85", " ")) if text else []

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        ids, start = [], 0
        for m in _SPECIAL.finditer(text):
            ids += self._pieces(text[start:m.start()])
            ids.append(self.sentinel_id(int(m[1])) if m[1] is not None else ["<pad>", "</s>", "<unk>"].index(m[0]))
            start = m.end()
        ids += self._pieces(text[start:])
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Like HF `decode(ids, skip_special_tokens=True)`. Negative ids (label padding -100) and ids past the
        vocabulary (T5's padded embedding rows) are always dropped; stopping at eos is the caller's job."""
        ids = [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
        pieces = [self.sp.id_to_piece(i) if i < self.num_pieces else f"<extra_id_{self.sentinel_id(0) - i}>"
                  for i in ids if 0 <= i < self.vocab_size and not (skip_special and (i < 3 or i >= self.num_pieces))]
        text = "".join(pieces).replace("\u2581", " ")
        if pieces and pieces[0].startswith("\u2581"):  # the Metaspace decoder drops the first prefix space only
            text = text[1:]
        for old, new in _CLEANUP:
            text = text.replace(old, new)
        return text


def train_tokenizer(texts, out_file, vocab_size: int, model_type: str = "unigram") -> Tokenizer:
    """Train a small SentencePiece model (pad 0, eos 1, unk 2, no bos) on an iterable of strings.

    One thread and an in-memory writer (no input path stored in the model) make it byte-for-byte deterministic.
    `vocab_size` is an upper bound: on a small corpus SentencePiece stops when no more pieces are worth adding."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in texts if t.strip()), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, character_coverage=1.0,
        hard_vocab_limit=False, max_sentence_length=1 << 16, minloglevel=2)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    Path(out_file).write_bytes(buf.getvalue())
    return Tokenizer(out_file)


def truncate(ids: list[int], max_len: int, eos_id: int = 1) -> list[int]:
    """HF truncation: a cut sequence that ended in eos keeps eos as its last token."""
    if len(ids) <= max_len:
        return ids
    return ids[:max_len - 1] + [eos_id] if ids[-1] == eos_id else ids[:max_len]


# ---------------------------------------------------------------------------------------------------------- SNI
def _check(ok: bool, path, field: str, what: str):
    if not ok:
        raise ValueError(f"{path}: field {field!r}: {what}")


def _example_list(obj, path, field: str) -> list[dict]:
    """Positive/Negative Examples: a list of {input: str, output: str | [str], explanation?}; output -> str."""
    _check(isinstance(obj, list), path, field, "must be a list")
    out = []
    for k, ex in enumerate(obj):
        _check(isinstance(ex, dict) and isinstance(ex.get("input"), str), path, f"{field}[{k}].input", "must be a str")
        y = ex.get("output")
        y = y[0] if isinstance(y, list) and y else y  # some old files store a list of answers
        _check(isinstance(y, str), path, f"{field}[{k}].output", "must be a str or a non-empty list of str")
        out.append({**ex, "output": y})
    return out


def load_sni_task(path) -> dict:
    """Read and validate one SNI task file (bare NaN, U+0085 and mojibake load fine); adds "name" (the file stem)."""
    path = Path(path)
    try:
        task = json.loads(path.read_text(encoding="utf-8"))  # json accepts bare NaN; the text is never split on lines
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable file or broken JSON: {e}") from None
    _check(isinstance(task, dict), path, "<top>", "must be a JSON object")
    d = task.get("Definition")
    d = [d] if isinstance(d, str) else d  # old schema: a plain string
    _check(isinstance(d, list) and d and all(isinstance(s, str) for s in d) and d[0].strip(), path, "Definition",
           "must be a non-empty list of str")
    inst = task.get("Instances")
    _check(isinstance(inst, list), path, "Instances", "must be a list")
    for k, x in enumerate(inst):
        _check(isinstance(x, dict) and isinstance(x.get("input"), str), path, f"Instances[{k}].input", "must be str")
        y = x.get("output")
        _check(isinstance(y, list) and all(isinstance(s, str) for s in y), path, f"Instances[{k}].output",
               "must be a list of str")
    _check("Positive Examples" in task, path, "Positive Examples", "is missing")
    task["Positive Examples"] = _example_list(task["Positive Examples"], path, "Positive Examples")
    task["Negative Examples"] = _example_list(task.get("Negative Examples", []), path, "Negative Examples")
    task["Definition"], task["name"] = d, path.stem
    return task


def load_sni(data_dir, split: str = "default", part: str = "train", max_instances: int | None = 100,
             english_only: bool = True, missing_ok: bool = False, sample_seed: int | None = None,
             per_category: int | None = None) -> list[dict]:
    """The tasks listed in splits/<split>/<part>_tasks.txt, each cut to its first `max_instances` instances
    (with sample_seed: `max_instances` drawn at random, seeded by (seed, task), as the official code shuffles);
    per_category: only the first that many tasks of each category (its first listed)."""
    data_dir = Path(data_dir)
    list_file = data_dir / "splits" / split / f"{part}_tasks.txt"
    if not list_file.is_file():
        raise ValueError(f"{list_file}: split file not found")
    tasks, taken = [], {}
    for name in (s.strip() for s in list_file.read_text(encoding="utf-8").split("\n")):
        if not name:
            continue
        path = data_dir / "tasks" / f"{name}.json"
        if not path.is_file() and missing_ok:
            continue
        if not path.is_file():
            raise ValueError(f"{path}: listed in {list_file} but missing (pass missing_ok=True to skip)")
        task = load_sni_task(path)
        langs = [task.get("Input_language", ["English"]), task.get("Output_language", ["English"])]
        if english_only and not all(any("English" in str(x) for x in lang) for lang in langs):
            continue
        category = (task.get("Categories") or [""])[0]
        if per_category and taken.get(category, 0) >= per_category:
            continue
        taken[category] = taken.get(category, 0) + 1
        if sample_seed is not None:
            random.Random(f"{sample_seed}-{name}").shuffle(task["Instances"])
        if max_instances is not None:
            task["Instances"] = task["Instances"][:max_instances]
        tasks.append(task)
    return tasks


def _dot(s: str) -> str:
    """Tk-Instruct appends "." to a piece whose last character is not in string.punctuation.
    "Input: cat" -> "Input: cat."; "Is it?" and "a;" stay; "…" is not ASCII punctuation, so "kurz…" -> "kurz….";
    an empty piece becomes "."."""
    return s if s and s[-1] in string.punctuation else s + "."


def _example_block(kind: str, k: int, ex: dict, add_explanation: bool) -> str:
    """One worked example of a prompt (kind "Positive" or "Negative", k counted from 1), each line a piece passed
    through _dot with the input / output / explanation stripped (an output stored as a list: its first answer):
    " Positive Example 1 -\nInput: cat.\n Output: tac.\n" + [" Explanation: Reversed.\n"] + "\n"; the
    explanation only with add_explanation and when the example has one."""
    block = f" {kind} Example {k} -\n" + _dot(f"Input: {ex['input'].strip()}") + "\n"
    y = ex["output"][0] if isinstance(ex["output"], list) else ex["output"]  # old files: a list of answers
    block += _dot(f" Output: {y.strip()}") + "\n"
    if add_explanation and "explanation" in ex:
        block += _dot(f" Explanation: {ex['explanation'].strip()}") + "\n"
    return block + "\n"


def instance_text(instance_input: str) -> str:
    """The student's input: the instance alone, in Tk-Instruct's wrapper (DESIGN.md §5).
    "  bird " -> "Now complete the following example -\nInput: bird.\nOutput: " (the input stripped, its piece
    "Input: ..." through _dot, and a space after the last "Output:")."""
    return "Now complete the following example -\n" + _dot(f"Input: {instance_input.strip()}") + "\nOutput: "


def prompt_blocks(task: dict, num_pos: int = 2, num_neg: int = 0, add_task_name: bool = False,
                  add_explanation: bool = False) -> tuple[str, list[str]]:
    """(head, example blocks): head = "[name. ]Definition: ...\n\n"; the blocks are positives then negatives.
    head: "{task['name']}. " only with add_task_name, then the piece "Definition: " + the first definition,
    stripped, through _dot, then "\n\n". Blocks: _example_block of the first num_pos positive examples, then of
    the first num_neg negative ones (a task may have none), each kind numbered from 1."""
    head = f"{task['name']}. " if add_task_name else ""  # official collator: instance["Task"] + ". "
    head += _dot("Definition: " + task["Definition"][0].strip()) + "\n\n"
    blocks = [_example_block("Positive", k + 1, ex, add_explanation)
              for k, ex in enumerate(task["Positive Examples"][:num_pos])]
    blocks += [_example_block("Negative", k + 1, ex, add_explanation)
               for k, ex in enumerate(task.get("Negative Examples", [])[:num_neg])]
    return head, blocks


def sni_prompt(task: dict, instance_input: str, num_pos: int = 2, num_neg: int = 0, add_task_name: bool = False,
               add_explanation: bool = False) -> str:
    """The Tk-Instruct source string exactly as the official collator (ni_collator.py) builds it; no length limit.
    The head, the example blocks and instance_text(instance_input), joined without separators, e.g.
    "Definition: Say hi.\n\n Positive Example 1 -\nInput: a.\n Output: b.\n\nNow complete the following
    example -\nInput: c.\nOutput: " for num_pos=1 (Tk-Instruct's format, Wang et al., 2022)."""
    head, blocks = prompt_blocks(task, num_pos, num_neg, add_task_name, add_explanation)
    return head + "".join(blocks) + instance_text(instance_input)


def instruction_text(task: dict, num_pos: int = 0, add_task_name: bool = False) -> str:
    """What the hypernetwork reads: definition (+ num_pos positive examples), the prompt without the instance."""
    head, blocks = prompt_blocks(task, num_pos, 0, add_task_name)
    return (head + "".join(blocks)).rstrip()


def _fit(head: str, blocks: list[str], tail: str, tokenizer: Tokenizer, max_len: int) -> list[int]:
    """Keep head and tail, add example blocks in order while the tokenized prompt fits, then truncate.
    official code: measures without the task name, joins blocks by " " and may still try negatives after a
    positive failed; here: we measure the exact string fed to the model and stop at the first block that fails."""
    ids = tokenizer.encode(head + "".join(blocks) + tail)
    if len(ids) > max_len:
        kept = []
        for b in blocks:
            if len(tokenizer.encode(head + "".join(kept) + b + tail)) > max_len:
                break
            kept.append(b)
        ids = tokenizer.encode(head + "".join(kept) + tail)
    return truncate(ids, max_len, tokenizer.eos_id)


def fit_prompt(task: dict, instance_input: str, tokenizer: Tokenizer, max_len: int, num_pos: int = 2,
               num_neg: int = 0, add_task_name: bool = False) -> list[int]:
    """Token ids of the Tk-Instruct prompt with only the examples that fit `max_len` (eos kept when truncated)."""
    head, blocks = prompt_blocks(task, num_pos, num_neg, add_task_name)
    return _fit(head, blocks, instance_text(instance_input), tokenizer, max_len)


# ------------------------------------------------------------------------------------------ examples and batching
@dataclass
class Example:
    task: str
    instruction: str       # instruction_text(): the hypernetwork's input
    source: str            # instance_text(): the student's input
    prompt: str            # sni_prompt(): the teacher's input (full Tk-Instruct prompt)
    target: str            # first reference
    references: list[str]
    id: str
    category: str
    blocks: tuple = ()     # (head, [example blocks]) of `prompt`, so the Batcher can drop examples that do not fit


def sni_examples(tasks: list[dict], num_pos: int = 2, add_task_name: bool = False) -> list[Example]:
    """One Example per instance; the same num_pos serves the instruction and the teacher prompt."""
    out = []
    for task in tasks:
        instruction = instruction_text(task, num_pos, add_task_name)
        head, blocks = prompt_blocks(task, num_pos, 0, add_task_name)
        category = (task.get("Categories") or [""])[0]
        for k, inst in enumerate(task["Instances"]):
            refs = inst["output"] or [""]
            source = instance_text(inst["input"])
            out.append(Example(task["name"], instruction, source, head + "".join(blocks) + source, refs[0],
                               list(refs), str(inst.get("id", f"{task['name']}-{k}")), category, (head, blocks)))
    return out


def pad(seqs: list[list[int]], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: ids (N, L) long and mask (N, L) long (1 = real token)."""
    n, width = len(seqs), max(1, max((len(s) for s in seqs), default=1))
    ids, mask = torch.full((n, width), value, dtype=torch.long), torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


class _Stream:
    """An endless stream of epochs over n items: position p -> item index. Epoch e's order is a permutation
    seeded by (seed, e) only, never by global RNG state, so any position can be recomputed after a restart."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch, self.order = n, seed, shuffle, None, None

    def __getitem__(self, p: int) -> int:
        epoch, i = divmod(p, self.n)
        if epoch != self.epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self.epoch, self.order = epoch, rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return int(self.order[i])


def _shard(items: list, batch_size: int, rank: int, world_size: int) -> list:
    if batch_size % world_size or not 0 <= rank < world_size:
        raise ValueError(f"batch_size {batch_size} must divide by world_size {world_size} and 0 <= rank {rank} "
                         f"< world_size")
    per = batch_size // world_size
    return items[rank * per:(rank + 1) * per]


class Batcher:
    """Tokenises every example once; batch(step) is a pure function of (seed, step), so resuming is exact.

    Global batch `step` covers positions [step*B, (step+1)*B) of an endless stream of epochs; epoch e visits the
    examples in an order seeded by (seed, e) (see _Stream). With bucket=True, each window of `bucket_window` batches is sorted by
    prompt length, cut into batches and those batches are shuffled (seeded by (seed, window)): less padding."""

    def __init__(self, examples: list[Example], tokenizer: Tokenizer, batch_size: int, seed: int = 0,
                 max_source_len: int = 1024, max_target_len: int = 128, max_instruction_len: int = 1024,
                 tasks: list[str] | None = None, shuffle: bool = True, bucket: bool = False, bucket_window: int = 50,
                 random_reference: bool = False):
        if not examples or batch_size < 1:
            raise ValueError(f"need examples ({len(examples)}) and batch_size >= 1 ({batch_size})")
        self.examples, self.tokenizer, self.batch_size, self.seed = examples, tokenizer, batch_size, seed
        self.shuffle, self.bucket, self.bucket_window = shuffle, bucket, bucket_window
        self.tasks = list(tasks) if tasks is not None else sorted({e.task for e in examples})
        self.task_index = {t: i for i, t in enumerate(self.tasks)}
        missing = sorted({e.task for e in examples} - set(self.task_index))
        if missing:
            raise ValueError(f"tasks {missing[:5]} of the examples are not in the `tasks` list")
        enc, cache = tokenizer.encode, {}
        def cached(text, n):  # instructions repeat for every instance of a task
            if (text, n) not in cache:
                cache[text, n] = truncate(enc(text), n)
            return cache[text, n]
        self.instruction = [cached(e.instruction, max_instruction_len) for e in examples]
        self.source = [truncate(enc(e.source), max_source_len) for e in examples]
        self.prompt = [_fit(*e.blocks, e.source, tokenizer, max_source_len) if e.blocks
                       else truncate(enc(e.prompt), max_source_len) for e in examples]
        self.target = [truncate(enc(e.target), max_target_len) for e in examples]
        self.references = [[truncate(enc(r), max_target_len) for r in e.references] for e in examples] \
            if random_reference else None  # training batches then draw one reference per example (official)
        self.task_idx = [self.task_index[e.task] for e in examples]
        self.stream = _Stream(len(examples), seed, shuffle)

    def __len__(self) -> int:
        return len(self.examples)

    def global_indices(self, step: int) -> list[int]:
        """Example indices of the whole (all ranks) batch number `step`."""
        B = self.batch_size
        if not self.bucket:
            return [self.stream[p] for p in range(step * B, (step + 1) * B)]
        window, k = divmod(step, self.bucket_window)
        start = window * self.bucket_window * B
        idx = [self.stream[p] for p in range(start, start + self.bucket_window * B)]
        idx.sort(key=lambda i: (len(self.prompt[i]), len(self.source[i])))  # stable: ties keep the shuffled order
        batches = [idx[j:j + B] for j in range(0, len(idx), B)]
        random.Random(f"bucket-{self.seed}-{window}").shuffle(batches)
        return batches[k]

    def collate(self, indices: list[int], step: int | None = None) -> dict[str, torch.Tensor]:
        """The batch of `indices`; the targets are first references, or with random_reference and a step, a
        reference drawn per example by (seed, step, index)."""
        out, target = {}, self.target
        if self.references is not None and step is not None:
            target = {i: random.Random(f"ref-{self.seed}-{step}-{i}").choice(self.references[i]) for i in indices}
        out["input_ids"], out["attention_mask"] = pad([self.source[i] for i in indices])
        out["instruction_ids"], out["instruction_mask"] = pad([self.instruction[i] for i in indices])
        out["prompt_ids"], out["prompt_mask"] = pad([self.prompt[i] for i in indices])
        out["labels"], _ = pad([target[i] for i in indices], value=-100)
        out["task_idx"] = torch.tensor([self.task_idx[i] for i in indices], dtype=torch.long)
        return out

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        return self.collate(_shard(self.global_indices(step), self.batch_size, rank, world_size), step)

    def iter_eval(self, batch_size: int):
        """(examples slice, batch) in the stored order, no shuffling: for evaluation."""
        for s in range(0, len(self.examples), batch_size):
            yield self.examples[s:s + batch_size], self.collate(list(range(s, min(s + batch_size, len(self)))))


# ----------------------------------------------------------------------------------------------------------- P3
_P3_FIELDS = {"inputs_pretokenized": str, "targets_pretokenized": str}


def load_p3(p3_dir, max_per_prompt: int | None = None) -> list[dict]:
    """Records {dataset, prompt, inputs, target, choices, is_correct, where} from <dir>/<dataset>/<prompt>.jsonl;
    the first `max_per_prompt` of each file (the paper samples 1,000 per prompt)."""
    files = sorted(Path(p3_dir).glob("*/*.jsonl"))
    if not files:
        raise ValueError(f"{p3_dir}: no <dataset>/<prompt>.jsonl files")
    records = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            kept = 0
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if max_per_prompt is not None and kept >= max_per_prompt:
                    break
                kept += 1
                where = f"{f}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: broken JSON: {e}") from None
                _check(isinstance(row, dict), where, "<line>", "must be a JSON object")
                for key, typ in _P3_FIELDS.items():
                    _check(isinstance(row.get(key), typ), where, key, "missing or not a str")
                choices = row.get("answer_choices")
                _check(choices is None or (isinstance(choices, list) and all(isinstance(c, str) for c in choices)),
                       where, "answer_choices", "must be a list of str")
                _check(isinstance(row.get("is_correct", True), bool), where, "is_correct", "must be a bool")
                records.append({"dataset": f.parent.name, "prompt": f.stem, "inputs": row["inputs_pretokenized"],
                                "target": row["targets_pretokenized"], "choices": choices,
                                "is_correct": row.get("is_correct"), "where": where})
    return records


def p3_examples(records: list[dict]) -> list[Example]:
    """P3 bakes its prompt template into `inputs`, so source = prompt = inputs; the instruction the hypernetwork
    reads is the prompt's name and the dataset's, e.g. "choose the best answer (super glue copa)". One task =
    dataset/prompt; category = dataset. `_score_eval` lines with is_correct false are skipped."""
    out = []
    for r in records:
        if r["is_correct"] is False:
            continue
        instruction = f"{r['prompt'].replace('_', ' ')} ({r['dataset'].replace('_', ' ')})"
        out.append(Example(f"{r['dataset']}/{r['prompt']}", instruction, r["inputs"], r["inputs"], r["target"],
                           [r["target"]], r["where"], r["dataset"]))
    return out


def p3_rank_items(records: list[dict]) -> list[dict]:
    """Rank-classification items {inputs, choices, answer, task, prompt, instruction (as in p3_examples)};
    records without choices are skipped."""
    items = []
    for r in records:
        if not r["choices"] or r["is_correct"] is False:
            continue
        choices = [c.strip() for c in r["choices"]]
        _check(r["target"].strip() in choices, r["where"], "targets_pretokenized", "is not one of answer_choices")
        items.append({"inputs": r["inputs"], "choices": r["choices"], "answer": choices.index(r["target"].strip()),
                      "task": r["dataset"], "prompt": r["prompt"],
                      "instruction": f"{r['prompt'].replace('_', ' ')} ({r['dataset'].replace('_', ' ')})"})
    return items


# ------------------------------------------------------------------------------------------- pretraining text
def _text_files(paths) -> list[Path]:
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    suffixes = (".json", ".json.gz", ".jsonl", ".jsonl.gz", ".txt")
    return [f for p in map(Path, paths)
            for f in (sorted(f for f in p.rglob("*") if f.name.endswith(suffixes)) if p.is_dir() else [p])]


def iter_texts(paths):
    """Stream documents, one file at a time: JSON lines (C4) yield their "text", .txt files their paragraphs."""
    for f in _text_files(paths):
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as fh:  # text-mode lines end at \n / \r only, never at U+0085
            if f.name.endswith(".txt"):
                for real, lines in itertools.groupby(fh, key=lambda line: bool(line.strip())):
                    if real:
                        yield "\n".join(line.rstrip("\r\n") for line in lines)
                continue
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{f}:{lineno}: field 'text': {e!r}") from None
                    yield text


def split_abc(ids: list[int], rng: random.Random, max_a: int = 512, max_b: int = 512, max_c: int = 128):
    """Cut a sequence into a | b | c (instruction | input | target, paper §3.3), each non-empty.

    First a window of min(len, max_a + max_b + max_c) tokens is placed at a random start, then cut at two random
    points chosen so that len(a) <= max_a, len(b) <= max_b, len(c) <= max_c; a + b + c is exactly that window
    (the whole sequence when it is short enough).
    Draws, in this order, each one rng.randint over every value still allowed: the window start, len(a) (leaving
    b and c at least 1 token each and room for them within their caps), len(b) (the same for c); c is the rest.
    Every allowed cut is reachable. ValueError for fewer than 3 tokens or a cap below 1. (The order of the draws
    only matters to reproduce the reference run bit for bit.)"""
    if len(ids) < 3 or min(max_a, max_b, max_c) < 1:
        raise ValueError(f"need >= 3 tokens and caps >= 1, got {len(ids)} tokens, caps {max_a}/{max_b}/{max_c}")
    w = min(len(ids), max_a + max_b + max_c)
    start = rng.randint(0, len(ids) - w)
    la = rng.randint(max(1, w - max_b - max_c), min(max_a, w - 2))
    lb = rng.randint(max(1, w - la - max_c), min(max_b, w - la - 1))
    window = list(ids[start:start + w])
    return window[:la], window[la:la + lb], window[la + lb:]


class PretrainBatcher:
    """Batches of a | b | c splits; deterministic in (seed, step) like Batcher, with the same keys.
    instruction = a + eos, input = b + eos, labels = c + eos, prompt = a + b + eos, task_idx = row index (each row its own task)."""

    def __init__(self, sequences: list[list[int]], batch_size: int, seed: int = 0, eos_id: int = 1,
                 max_a: int = 512, max_b: int = 512, max_c: int = 128):
        self.sequences = [list(s) for s in sequences if len(s) >= 3]
        if not self.sequences:
            raise ValueError("no sequence with at least 3 tokens")
        self.batch_size, self.seed, self.eos_id, self.caps = batch_size, seed, eos_id, (max_a, max_b, max_c)
        self.stream = _Stream(len(self.sequences), seed)

    @classmethod
    def from_texts(cls, texts, tokenizer: Tokenizer, max_docs: int, batch_size: int, **kw) -> "PretrainBatcher":
        seqs = [tokenizer.encode(text, add_eos=False) for text in itertools.islice(texts, max_docs)]
        return cls(seqs, batch_size, eos_id=tokenizer.eos_id, **kw)

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        B, eos = self.batch_size, self.eos_id
        rows = []
        for j in _shard(list(range(B)), B, rank, world_size):
            doc = self.sequences[self.stream[step * B + j]]
            rows.append(split_abc(doc, random.Random(f"{self.seed}-{step}-{j}"), *self.caps))
        out = {}
        out["input_ids"], out["attention_mask"] = pad([b + [eos] for a, b, c in rows])
        out["instruction_ids"], out["instruction_mask"] = pad([a + [eos] for a, b, c in rows])
        out["prompt_ids"], out["prompt_mask"] = pad([a + b + [eos] for a, b, c in rows])
        out["labels"], _ = pad([c + [eos] for a, b, c in rows], value=-100)
        out["task_idx"] = torch.arange(len(rows))  # every row is its own "task": its own a
        return out


# ------------------------------------------------------------------------------------------- the built-in suite
# Every task is (family, parameter words). All families share ONE input distribution, 4-7 distinct words from
# SUITE_WORDS in random order, so the input alone reveals neither the task nor its answer; the rule names its
# words and can be solved by matching them against the input. Held-out tasks are parameter combinations a family
# never trained on (see suite_tasks).
SUITE_WORDS = ("cat dog sun red box cup map hat pen egg bus car fish tree milk book door ball bird cake lamp ring "
               "star rain road ship shoe bell coin desk frog key leaf moon nest rose ant bag bat bed bee boat bone "
               "bowl bread brick cloud coat cow crab crown drum duck fan farm fire flag fork fox gate gift goat gold "
               "hill horn horse jar kite lake lion lock mask mouse nail net nut owl pear pig pipe pot rock roof rope "
               "salt sand seed sock soup spoon stone sword table tent tiger toy train vase wall whale wheel wind wolf "
               "yarn zoo apple bear bench chair sheep snow wing tooth bike clock drop glass grass house jam king "
               "lemon mint nose oak pie plum queen rice shell skirt slide sofa tail tape tower van wave web "
               "yard").split()


def _fill(pattern: str, p: tuple, out: str = "") -> str:
    return pattern.format(*p, out=out)


def _pos(words, p):  # index of the main word
    return words.index(p[0])


# family: (number of parameter words, definition templates, rule(words, params) -> output, explanation template)
# Parameter words stand bare in the definitions, with a space on each side and never next to punctuation, so
# that they are the very same tokens as in the inputs ("▁hat"): a model can match and copy them, and a word it
# has never seen as a parameter of a family is still a token it knows.
SUITE_FAMILIES = {
    "contains": (1, ["Answer yes if the word {0} appears in the input and no if it does not.",
                     "Does the word {0} occur in the input ? Answer yes or no."],
                 lambda w, p: "yes" if p[0] in w else "no", "The answer is {out} because we look for {0} here."),
    "after": (1, ["Find the word {0} in the input and answer with the word that follows it.",
                  "Output the word that comes right after the word {0} in the input."],
              lambda w, p: w[_pos(w, p) + 1], "The word after {0} is {out} here."),
    "position": (1, ["Give the position of the word {0} in the input counting from 1.",
                     "Where is the word {0} in the input ? Answer with its position starting at 1."],
                 lambda w, p: str(_pos(w, p) + 1), "The word {0} is word number {out} here."),
    "order": (2, ["Answer yes if the word {0} comes before the word {1} in the input and no otherwise.",
                  "Both {0} and {1} are in the input . Is {0} the first of the two ? Answer yes or no."],
              lambda w, p: "yes" if w.index(p[0]) < w.index(p[1]) else "no", "The answer is {out} here."),
    "label": (3, ["If the input contains the word {0} answer {1} and otherwise answer {2} instead.",
                  "Answer {1} when the word {0} is in the input and {2} when it is not."],
              lambda w, p: p[1] if p[0] in w else p[2], "The answer is {out} here."),
    "choose": (2, ["Exactly one of the words {0} and {1} is in the input . Answer with that word.",
                   "The input holds either {0} or {1} but not both . Which one is it ?"],
               lambda w, p: p[0] if p[0] in w else p[1], "The input holds {out} here."),
    "prefix": (1, ["Write the word {0} and then the first word of the input.",
                   "Answer with {0} followed by the word that starts the input."],
               lambda w, p: f"{p[0]} {w[0]}", "That gives {out} here."),
    "replace": (2, ["Copy the input but write the word {1} wherever the word {0} appears.",
                    "Rewrite the input with {0} replaced by {1} and keep all other words."],
                lambda w, p: " ".join(p[1] if x == p[0] else x for x in w), "Each {0} becomes {1} here."),
}


def _suite_words(family: str, p: tuple, rng: random.Random) -> list[str]:
    """One input. Presence of the parameter words is set per family (half the time for yes/no rules)."""
    present = rng.random() < 0.5
    need = {"contains": p[:1] if present else (), "label": p[:1] if present else (), "order": p[:2],
            "choose": p[:1] if present else p[1:2], "prefix": ()}.get(family, p[:1])
    avoid = {"contains": () if present else p[:1], "label": () if present else p[:1], "replace": p[1:2],
             "choose": p[1:2] if present else p[:1], "prefix": p[:1]}.get(family, ())
    pool = [w for w in SUITE_WORDS if w not in need and w not in avoid]
    while True:
        words = rng.sample(pool, rng.randint(4, 7) - len(need)) + list(need)
        rng.shuffle(words)
        if family != "after" or words[-1] != p[0]:
            return words


def suite_tasks(seed: int = 0, n_train: int = 120, n_test: int = 2) -> list[tuple[str, str, tuple, int, bool]]:
    """(name, family, params, template, is_test) for every task. Training tasks name random words. A held-out
    task names a combination its family never trained on: with several parameter words, each word has filled the
    same slot in some training task, never together with the others; with one word, the word was trained under
    the family's other wording. So a held-out definition is new, and only its content says what to answer."""
    tasks = []
    for family, (n_params, templates, _, _) in SUITE_FAMILIES.items():
        rng = random.Random(f"suite-{seed}-{family}")
        train: dict[tuple, int] = {}
        while len(train) < n_train:
            train.setdefault(tuple(rng.sample(SUITE_WORDS, n_params)), rng.randrange(len(templates)))
        seen, held = list(train), {}
        while len(held) < n_test:
            if n_params == 1:
                p = rng.choice(seen)
                k = (train[p] + 1) % len(templates)
            else:
                p, k = tuple(rng.choice(seen)[i] for i in range(n_params)), rng.randrange(len(templates))
                if len(set(p)) < n_params or p in train:
                    continue
            held.setdefault(p, k)
        for (p, k), is_test in [(pk, False) for pk in train.items()] + [(pk, True) for pk in held.items()]:
            tasks.append((f"suite_{family}_{'_'.join(p)}_{k}", family, p, k, is_test))
    return tasks


def _suite_task(name: str, family: str, p: tuple, template: int, seed: int, n: int) -> dict:
    _, templates, rule, explain = SUITE_FAMILIES[family]
    rng = random.Random(f"{seed}-{name}")
    definition = _fill(templates[template], p)

    def instance():
        words = _suite_words(family, p, rng)
        return " ".join(words), rule(words, p)
    positives = []
    for _ in range(2):
        x, y = instance()
        positives.append({"input": x, "output": y, "explanation": _fill(explain, p, y)})
    instances = [dict(zip(("input", "output"), instance())) for _ in range(n)]
    return {"Contributors": ["tagi-from-scratch"], "Source": ["built-in suite"], "URL": [""], "Categories": [family],
            "Reasoning": [], "Definition": [definition], "Input_language": ["English"],
            "Output_language": ["English"], "Instruction_language": ["English"], "Domains": ["Words"],
            "Positive Examples": positives, "Negative Examples": [],
            "Instances": [{"id": f"{name}-{k}", "input": x["input"], "output": [x["output"]]}
                          for k, x in enumerate(instances)],
            "Instance License": ["Apache 2.0"], "Suite": {"family": family, "params": list(p), "seed": seed}}


def make_suite(out_dir, seed: int = 0, instances_per_task: int = 140) -> Path:
    """Write the suite in SNI's layout (tasks/*.json, splits/default/{train,test}_tasks.txt); byte-identical
    for the same seed."""
    out = Path(out_dir)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    (out / "splits" / "default").mkdir(parents=True, exist_ok=True)
    split = {False: [], True: []}
    for name, family, p, template, is_test in suite_tasks(seed):
        task = _suite_task(name, family, p, template, seed, instances_per_task)
        (out / "tasks" / f"{name}.json").write_text(json.dumps(task, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
        split[is_test].append(name)
    for part, is_test in (("train", False), ("test", True)):
        (out / "splits" / "default" / f"{part}_tasks.txt").write_text("\n".join(split[is_test]) + "\n")
    return out


def suite_texts(suite_dir) -> list[str]:
    """Texts for the suite tokenizer: the printable ASCII characters (nothing typed is <unk>), every template of
    every family (so their words count whatever templates the seed drew), ten full prompts (with explanations)
    per task and every instance."""
    texts = [string.printable.strip()]
    texts += [_fill(t, tuple(SUITE_WORDS[k:k + 3])) for _, ts, _, e in SUITE_FAMILIES.values() for t in ts + [e]
              for k in range(0, len(SUITE_WORDS) - 2, 3)]
    for f in sorted(Path(suite_dir, "tasks").glob("*.json")):
        task = load_sni_task(f)
        texts += [sni_prompt(task, x["input"], add_explanation=True) + x["output"][0] for x in task["Instances"][:10]]
        texts += [s for x in task["Instances"] for s in [x["input"], *x["output"]]]
    return texts


def ensure_suite(suite_dir, seed: int = 0, vocab_size: int = 640, instances_per_task: int = 140) -> Path:
    """Build the suite and its tokenizer (suite_dir/spiece.model) unless a build for this seed is already there."""
    d = Path(suite_dir)
    stamp = {"seed": seed, "vocab_size": vocab_size, "instances_per_task": instances_per_task}
    if (d / "suite.json").is_file():
        found = json.loads((d / "suite.json").read_text())
        if found != stamp:
            raise ValueError(f"{d}: holds a suite built with {found}, asked for {stamp}; use another folder")
        if (d / "spiece.model").is_file():
            return d
    make_suite(d, seed, instances_per_task)
    train_tokenizer(suite_texts(d), d / "spiece.model", vocab_size, model_type="bpe")  # BPE: whole words
    (d / "suite.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return d


# ------------------------------------------------------------------------------------------ command lines
# Every script (train, evaluate, tagi, bench, data) checks its flags before any work and answers bad input with one
# line, `error: <flag or file>: <what is wrong and what to do>`, and exit status 2.


def fail(msg) -> None:
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    raise SystemExit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (argparse itself prints a usage block)."""

    def error(self, message):
        m = re.fullmatch(r"(?:the following arguments are required|unrecognized arguments): (.*)", message)
        fail(f"{m.group(1)}: {'required' if 'required' in message else 'unknown flag'} (see --help)" if m else
             message.removeprefix("argument "))  # "--fusion: invalid choice: ..."


def bounded(typ, spec: str):
    """An argparse type: typ(text), which must lie in spec: ">= 1", "> 0" or "[0, 1)" (half-open)."""
    def parse(text):
        x = typ(text)
        if spec.startswith("["):
            lo, hi = map(float, spec[1:-1].split(","))
            ok = lo <= x < hi
        else:
            op, bound = spec.split()
            ok = x >= float(bound) if op == ">=" else x > float(bound)
        if not ok:  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"must be {'in ' * spec.startswith('[')}{spec}, got {text}")
        return x
    parse.__name__ = typ.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


def pick_device(name: str) -> torch.device:
    """--device auto | cpu | cuda; asking for CUDA where there is none is bad input, not a crash later."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device on this machine; use --device cpu or auto")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def cli(main) -> None:
    """Run a script's main() the way a shell calls it: a ValueError (library code names the file and field), an
    unreadable file or a SystemExit with a message becomes the one `error:` line and exit status 2."""
    try:
        main()
    except NotImplementedError as e:  # a classroom handout (ASSIGNMENTS.md): "E<k> <file>::<name>: see ASSIGNMENTS.md"
        if not re.fullmatch(r"E[0-9]+ \S+::\S+: see ASSIGNMENTS\.md", str(e)):
            raise
        fail(str(e).replace(": see", " is not implemented yet: see", 1))
    except (ValueError, OSError) as e:
        fail(f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else e)
    except SystemExit as e:
        if isinstance(e.code, str):
            fail(e.code)
        raise


def main(argv=None):
    ap = ArgumentParser(description="Build the built-in suite (SNI layout) and its tokenizer; print a few prompts.")
    ap.add_argument("folder", nargs="?", default="runs/suite", help="where the suite is (or goes)")
    folder = Path(ap.parse_args(argv).folder)
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"{folder}: is a file, not a folder; pass a folder for the suite")
    t0 = time.time()
    folder = ensure_suite(folder)
    tok = Tokenizer(folder / "spiece.model")
    train, test = load_sni(folder, part="train"), load_sni(folder, part="test")
    print(f"{folder}: {len(train)} train / {len(test)} test tasks, vocab {tok.vocab_size}, {time.time() - t0:.1f}s")
    for ex in sni_examples(test[:: max(1, len(test) // 3)], num_pos=0)[::100]:  # "Def", as the suite runs
        print("-" * 80 + f"\n{ex.prompt}{ex.target}\n  ({len(tok.encode(ex.prompt))} tokens)")


if __name__ == "__main__":
    cli(main)
