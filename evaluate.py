"""Evaluation for TAGI: Super-NaturalInstructions metrics with the official semantics, rank classification for P3,
TAGI against its baselines and ablations on the same data, and efficiency (FLOPs, latency). See DESIGN.md §9.

    python evaluate.py --out runs/default              # the comparison table of a finished `python train.py` run
    python evaluate.py --out runs/default --ablations  # also Table 4's ablations (python train.py --stage ablations)
    python evaluate.py --efficiency                    # FLOPs and wall time: TAGI vs instruction concatenation

SNI metrics follow the official `compute_metrics.py` (natural-instructions eval/automatic/evaluation.py, copied by
Tk-Instruct and TAGI) for the default (English) track:
- ROUGE-L F1 from `rouge_score` with `use_stemmer=True`: lowercase, every run of characters outside [a-z0-9] is a
  separator (so accents and CJK vanish), Porter-stem tokens longer than 3 characters; empty token lists score 0.
- exact match after lowercasing, deleting ASCII punctuation and collapsing whitespace; articles are kept.
Both take the max over the references; `sni_scores` averages, multiplies by 100 and rounds to 4 decimals.
"""
import json
import math
import string
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from rouge_score import rouge_scorer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
from model import T5, T5Config, mean_nll
from tagi import TAGI, TAGIConfig, base_of, load_bank, read_stage_info, teacher_group

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # the official default-track scorer
_PUNCTUATION = set(string.punctuation)  # ASCII only, as in the official normalize_answer


def _as_list(references: list[str] | str) -> list[str]:
    references = [references] if isinstance(references, str) else list(references)
    if not references:
        raise ValueError("at least one reference is needed")
    return references


def rouge_l(prediction: str, references: list[str] | str) -> float:
    """ROUGE-L F1 in [0, 1], max over references."""
    scores = (_ROUGE.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in _as_list(references))
    return float(max(scores))  # rouge_score gives int 0 when either side has no tokens


def normalize_answer(text: str) -> str:
    """Official SNI normalisation: lower, drop ASCII punctuation, collapse whitespace (articles kept, unlike SQuAD)."""
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCTUATION).split())


def exact_match(prediction: str, references: list[str] | str) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in _as_list(references)))


def sni_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """{"rougeL", "exact_match"}: means × 100 rounded to 4 decimals, as the official compute_metrics reports them."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equally many predictions and references, got {len(predictions)} and {len(references)}")
    n = len(predictions)
    rouge = sum(rouge_l(p, r) for p, r in zip(predictions, references))
    em = sum(exact_match(p, r) for p, r in zip(predictions, references))
    return {"rougeL": round(100.0 * rouge / n, 4), "exact_match": round(100.0 * em / n, 4)}


def scores_by(preds: list[str], examples, key) -> dict[str, dict[str, float]]:
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(key(e), []).append(i)
    return {g: sni_scores([preds[i] for i in idx], [examples[i].references for i in idx]) for g, idx in
            sorted(groups.items())}


def sni_report(preds: list[str], examples) -> dict:
    """Overall, per-task and per-category ROUGE-L and exact match."""
    return {"overall": sni_scores(preds, [e.references for e in examples]),
            "per_task": scores_by(preds, examples, lambda e: e.task),
            "per_category": scores_by(preds, examples, lambda e: e.category)}


# ----------------------------------------------------------------------------------------------------------------
# Methods: each turns a batch (data.Batcher's keys) into generated ids, or into per-example NLL of the labels


def method_dir(run_dir: Path, name: str) -> Path:
    """Where train.py writes a TAGI method: tagi -> <run>/finetune, tagi-nofusion -> <run>/finetune-nofusion,
    hint -> <run>/finetune-hint."""
    return run_dir / (name.replace("tagi", "finetune", 1) if name.startswith("tagi") else f"finetune-{name}")


def method_fns(name: str, run_dir: Path, t5: T5, device, group: str = "task"):
    """(generate(batch, max_new_tokens) -> ids, nll(batch) -> (N,)) for one method, or None if it was not trained.
    base: the untuned T5 on the full prompt; concat: one LoRA trained on full prompts (Tk-Instruct style);
    noinstr: one LoRA trained on instances alone; teacher: each task's own LoRA (seen tasks only);
    tk-instruct: every base weight finetuned on full prompts; tagi / tagi-*: a finetuned TAGI (instance-only input,
    adapters generated from the instruction); tagi-adapter: its adapters alone, as `tagi.py adapter` exports them."""
    if name == "base":
        return (lambda b, n: t5.generate(b["prompt_ids"], b["prompt_mask"], n),
                lambda b: mean_nll(t5(b["prompt_ids"], b["prompt_mask"], labels=b["labels"]).logits, b["labels"]))
    if name == "tk-instruct":  # every base weight finetuned on full prompts (train.py --stage tk)
        if not (run_dir / "tk" / "stage.json").exists():
            return None
        tk = T5.from_pretrained(run_dir / "tk").to(device).eval()
        return (lambda b, n: tk.generate(b["prompt_ids"], b["prompt_mask"], n),
                lambda b: mean_nll(tk(b["prompt_ids"], b["prompt_mask"], labels=b["labels"]).logits, b["labels"]))
    if name in ("concat", "noinstr", "teacher"):
        d = run_dir / {"concat": "teachers-all", "noinstr": "teachers-all-instance", "teacher": f"teachers-{group}"}[name]
        if not (d / "stage.json").exists():
            return None
        info = read_stage_info(d, "teachers")
        if info.get("on_tk"):  # LoRAs trained on the tk model, as the paper's teachers
            t5 = T5.from_pretrained(info["base_model"]).to(device).eval()
        bank, _ = load_bank(d, t5, device)
        keys = {k: i for i, k in enumerate(info["keys"])}
        ids, mask = ("input_ids", "attention_mask") if info["input"] == "instance" else ("prompt_ids", "prompt_mask")

        def adapters(b):
            if name != "teacher":
                return bank.get(0)
            return bank(torch.tensor([keys[t if group == "task" else c] for t, c in zip(b["task_names"],
                                      b["categories"])], device=b["input_ids"].device))
        return (lambda b, n: t5.generate(b[ids], b[mask], n, adapters=adapters(b)),
                lambda b: mean_nll(t5(b[ids], b[mask], labels=b["labels"], adapters=adapters(b)).logits,
                                   b["labels"]))
    d = method_dir(run_dir, name.removesuffix("-adapter"))
    if not (d / "stage.json").exists():
        return None
    tagi = TAGI.load(d, t5).to(device).eval()
    if name.endswith("-adapter"):  # the exported PEFT adapters alone (fusion left out); generation only
        return (lambda b, n: tagi.generate_adapters_only(b, n), None)
    return (lambda b, n: tagi.generate(b, n), lambda b: mean_nll(tagi.student(b)[0], b["labels"]))


@torch.no_grad()
def predict(generate, batcher, tok, device, batch_size=64, max_new_tokens=128) -> list[str]:
    preds = []
    for exs, b in batcher.iter_eval(batch_size):
        b = {k: v.to(device) for k, v in b.items()}
        b["task_names"], b["categories"] = [e.task for e in exs], [e.category for e in exs]
        preds += [tok.decode(row) for row in generate(b, max_new_tokens).tolist()]
    return preds


@torch.no_grad()
def rank_classification(nll, items: list[dict], tok, device, batch_size=64) -> dict:
    """P3 evaluation: the option with the lowest mean per-token NLL wins. items: data.p3_rank_items records
    (inputs, choices, answer, task, prompt[, instruction]). Accuracy is averaged over prompts, then tasks.

    One row per (item, choice), item by item, batch_size rows per call of nll(batch) -> (rows,) scores. A batch
    holds, on device: input_ids / attention_mask = data.pad of tok.encode(inputs), prompt_ids / prompt_mask the
    same, instruction_ids / instruction_mask of tok.encode(instruction, or the prompt's name without one), labels
    = tok.encode(choice) padded with -100, task_idx = the item's index; and the lists task_names ("task/prompt")
    and categories (the task). The first choice with the lowest score is chosen. Returns {"accuracy": the mean
    over tasks of the task's mean over its prompts of the % correct, "per_task": {task: %}, sorted by task,
    "predictions": [the chosen choice of each item]}."""
    rows = [(i, c) for i, it in enumerate(items) for c in range(len(it["choices"]))]
    scores = torch.empty(len(rows))
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        src = [tok.encode(items[i]["inputs"]) for i, _ in chunk]
        ins = [tok.encode(items[i].get("instruction") or items[i]["prompt"]) for i, _ in chunk]
        b = {}
        b["input_ids"], b["attention_mask"] = data.pad(src)
        b["prompt_ids"], b["prompt_mask"] = b["input_ids"], b["attention_mask"]
        b["instruction_ids"], b["instruction_mask"] = data.pad(ins)
        b["labels"], _ = data.pad([tok.encode(items[i]["choices"][c]) for i, c in chunk], value=-100)
        b["task_idx"] = torch.tensor([i for i, _ in chunk])
        b = {k: v.to(device) for k, v in b.items()}
        b["task_names"] = [f"{items[i]['task']}/{items[i]['prompt']}" for i, _ in chunk]
        b["categories"] = [items[i]["task"] for i, _ in chunk]
        scores[s:s + len(chunk)] = nll(b).float().cpu()
    best: dict[int, tuple[float, int]] = {}
    for (i, c), v in zip(rows, scores.tolist()):
        if i not in best or v < best[i][0]:
            best[i] = (v, c)
    per_prompt: dict[tuple[str, str], list[float]] = {}
    for i, it in enumerate(items):
        per_prompt.setdefault((it["task"], it["prompt"]), []).append(float(best[i][1] == it["answer"]))
    per_task: dict[str, list[float]] = {}
    for (task, _), accs in per_prompt.items():
        per_task.setdefault(task, []).append(sum(accs) / len(accs))
    task_acc = {t: 100 * sum(v) / len(v) for t, v in sorted(per_task.items())}
    return {"accuracy": sum(task_acc.values()) / len(task_acc), "per_task": task_acc,
            "predictions": [best[i][1] for i in range(len(items))]}


# ----------------------------------------------------------------------------------------------------------------
# The comparison table (paper Tables 2 and 4, on whatever data the run was trained on)

METHODS = ("base", "noinstr", "concat", "tk-instruct", "teacher", "hint", "tagi", "tagi-adapter")
# Finetune variants: the HINT-like row of Table 2 (hypernetwork + fusion, cross-entropy only) and Table 4.
VARIANTS = {"hint": {"kl_weight": 0.0, "ins_weight": 0.0}}
ABLATIONS = {"tagi-nopretrain": {"no_pretrain": True}, "tagi-nofusion": {"fusion": "none"},
             "tagi-nokl": {"kl_weight": 0.0}, "tagi-noins": {"ins_weight": 0.0}, "tagi-noce": {"ce_weight": 0.0}}


# Answers of the right form that a model could give without solving the task (knowing only its family): their mean
# score is the family's chance level (`replace`: the input copied unchanged; `prefix`: the named word and any word).
GUESSES = {"contains": lambda w, p: ["yes", "no"], "order": lambda w, p: ["yes", "no"],
           "label": lambda w, p: p[1:3], "choose": lambda w, p: p[:2], "after": lambda w, p: [x for x in w if x != p[0]],
           "position": lambda w, p: [str(i + 1) for i in range(len(w))],
           "prefix": lambda w, p: [f"{p[0]} {x}" for x in w], "replace": lambda w, p: [" ".join(w)]}


def chance(data_dir, n: int = 100) -> dict[str, float]:
    """Held-out ROUGE-L per family of a uniform pick among GUESSES, in expectation, on the first n instances."""
    per = {}
    for t in data.load_sni(data_dir, part="test", max_instances=n):
        fam, p = t["Suite"]["family"], t["Suite"]["params"]
        for x in t["Instances"]:
            opts = GUESSES[fam](x["input"].split(), p)
            per.setdefault(fam, []).append(100 * sum(rouge_l(o, x["output"]) for o in opts) / len(opts))
    return {f: sum(v) / len(v) for f, v in per.items()}


def held_out_count(cfg) -> int:
    """Instances scored per test task: eval_instances (at most 20 under --quick)."""
    return min(cfg.eval_instances, 20) if cfg.quick else cfg.eval_instances


def held_out_examples(cfg):
    """The test tasks' first held_out_count(cfg) instances."""
    return data.sni_examples(data.load_sni(cfg.data_dir, part="test", max_instances=held_out_count(cfg)),
                             num_pos=cfg.num_pos)


def seen_examples(cfg, total: int = 960):
    """Training tasks scored on instances they were not trained on (after the first max_instances), about
    `total` instances spread evenly over the tasks (at least one each)."""
    tasks = data.load_sni(cfg.data_dir, part="train", max_instances=None,
                          per_category=getattr(cfg, "tasks_per_category", 0))
    n = max(1, total // len(tasks))
    for t in tasks:
        t["Instances"] = t["Instances"][cfg.max_instances:cfg.max_instances + n]
    return data.sni_examples([t for t in tasks if t["Instances"]], num_pos=cfg.num_pos)


def eval_batcher(cfg, examples, tok, batch_size: int = 64) -> data.Batcher:
    return data.Batcher(examples, tok, batch_size, shuffle=False, max_source_len=cfg.max_source_len,
                        max_target_len=cfg.max_target_len, max_instruction_len=cfg.max_instruction_len)


def compare(cfg, t5: T5, tok, device, ablations: bool = False) -> dict:
    """Score every trained method of the run in cfg.out (cfg: the run's settings, a train.Config or the config a
    stage.json saved) on held-out tasks (and seen tasks, new instances), on its base model t5 with tokenizer tok;
    write <out>/results/{results.json, results.md, <method>.<split>.jsonl} and print the table."""
    run_dir, res_dir = Path(cfg.out), Path(cfg.out) / "results"
    names = list(METHODS) + (list(ABLATIONS) if ablations else [])
    results = {"config": {"out": cfg.out, "data": cfg.data, "num_pos": cfg.num_pos, "seed": cfg.seed,
                          "data_dir": cfg.data_dir, "eval_instances": held_out_count(cfg)}}
    if cfg.data == "p3":  # rank classification on the held-out datasets' answer choices
        items = data.p3_rank_items(data.load_p3(Path(cfg.data_dir) / "test"))
        for name in names:
            fns = method_fns(name, run_dir, t5, device, teacher_group(cfg.group))
            if fns is not None and fns[1] is not None and name != "teacher":
                r = rank_classification(fns[1], items, tok, device)
                results[name] = {"held-out": {"accuracy": r["accuracy"], "per_task": r["per_task"]}}
        res_dir.mkdir(parents=True, exist_ok=True)
        (res_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({k: v["held-out"]["accuracy"] for k, v in results.items() if k != "config"}, indent=1))
        return results
    splits = {"held-out": held_out_examples(cfg), "seen": seen_examples(cfg, 384 if cfg.quick else 960)}
    batchers = {s: eval_batcher(cfg, exs, tok) for s, exs in splits.items()}
    for name in names:
        fns = method_fns(name, run_dir, t5, device, teacher_group(cfg.group))
        if fns is None:
            continue
        for split, exs in splits.items():
            if name == "teacher" and split == "held-out":
                continue  # a held-out task has no teacher: that is the point of TAGI
            t0 = time.time()
            preds = predict(fns[0], batchers[split], tok, device, max_new_tokens=cfg.max_target_len)
            rep = sni_report(preds, exs)
            rep["seconds"] = round(time.time() - t0, 1)
            results.setdefault(name, {})[split] = rep
            res_dir.mkdir(parents=True, exist_ok=True)  # only now: a bad input above leaves --out untouched
            with open(res_dir / f"{name}.{split}.jsonl", "w") as f:
                for e, p in zip(exs, preds):
                    f.write(json.dumps({"id": e.id, "prediction": p}, ensure_ascii=False) + "\n")
    for name, ratio in method_flops(cfg, t5, tok, device).items():
        if name in results:
            results[name]["flops_vs_tk"] = ratio
    (res_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = results_table(results)
    (res_dir / "results.md").write_text(table + "\n")
    print(table)
    return results


def results_table(results: dict) -> str:
    """One run's table; with summary's {"mean", "std"} pairs in place of numbers, the "mean ± std" table."""
    def num(x):
        return f"{x['mean']:.1f} ± {x['std']:.1f}" if isinstance(x, dict) else f"{x:.1f}"

    def cell(r, split, metric):
        return num(r[split]["overall"][metric]) if split in r else "–"
    lines = ["| method | held-out ROUGE-L | held-out EM | seen ROUGE-L | seen EM | FLOPs (× tk-instruct) |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name not in ("config", "seeds"):
            flops = r.get("flops_vs_tk", "–")
            flops = f"{flops['mean'] if isinstance(flops, dict) else flops:.2f}" if flops != "–" else flops
            lines.append(f"| {name} | {cell(r, 'held-out', 'rougeL')} | {cell(r, 'held-out', 'exact_match')} | "
                         f"{cell(r, 'seen', 'rougeL')} | {cell(r, 'seen', 'exact_match')} | {flops} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Efficiency (paper Table 2: TAGI at 0.39x the FLOPs of instruction concatenation)


def t5_flops(c: T5Config, S: int, T: int, M: int | None = None, lora: dict | None = None) -> int:
    """Analytic matmul FLOPs (2 per multiply-add) of one teacher-forced T5 forward: source S tokens, target T,
    decoder cross-attending to M memory tokens (default S; TAGI's concat fusion: instruction + S). lora:
    {module path: rank} adds 2·L·r·(in + out) per adapted Linear."""
    M = S if M is None else M
    D, A, F = c.d_model, c.num_heads * c.d_kv, c.d_ff
    ffn = (3 if c.gated else 2) * D * F
    enc = c.num_layers * (S * (4 * D * A + ffn) + 2 * S * S * A)
    dec = c.num_decoder_layers * (T * (4 * D * A + 2 * D * A + ffn) + 2 * M * D * A + 2 * T * T * A + 2 * T * M * A)
    total = 2 * (enc + dec + T * D * c.vocab_size)
    for path, r in (lora or {}).items():
        d_in, d_out = (F, D) if path.endswith(".wo") else (D, F) if ".wi" in path else (A, D) if \
            path.endswith(".o") else (D, A)
        L = S if path.startswith("encoder") else M if "EncDecAttention" in path and path[-1] in "kv" else T
        total += 2 * L * r * (d_in + d_out)
    return total


def count_flops(fn) -> int:
    """Matmul FLOPs of fn(), counted by torch. The math attention backend is forced because the flop counter
    does not see inside every fused attention kernel (e.g. the CPU flash kernel)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def task_runs(tagi: TAGI, concat_adapters: dict, batch: dict):
    """Two closures that score one task's instances (teacher forcing on the references). TAGI reads the
    instruction once (encoder + hypernetwork), then instance-only inputs; concatenation (a LoRA trained on full
    prompts, Tk-Instruct style) reads the whole prompt for every instance."""
    t5, N = tagi.t5, len(batch["input_ids"])

    def run_tagi():
        states, smask, gen = tagi.task_adapters(batch["instruction_ids"][:1], batch["instruction_mask"][:1])
        mem, mmask = tagi.student_memory(batch["input_ids"], batch["attention_mask"], states.expand(N, -1, -1),
                                         smask.expand(N, -1), gen)
        return t5.decode(batch["labels"].clamp(min=0), mem, mmask, gen)

    def run_concat():
        return t5(batch["prompt_ids"], batch["prompt_mask"], labels=batch["labels"], adapters=concat_adapters)
    return run_tagi, run_concat


@torch.no_grad()
def task_cost(tagi: TAGI, concat_adapters: dict, batch: dict, timed: bool = True) -> dict:
    out = {}
    for name, fn in zip(("tagi", "concat"), task_runs(tagi, concat_adapters, batch)):
        out[f"{name}_flops"] = count_flops(fn)
        if timed:
            fn()  # warm-up
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            out[f"{name}_seconds"] = round((time.perf_counter() - t0) / 3, 4)
    out["flop_ratio"] = round(out["tagi_flops"] / out["concat_flops"], 4)
    if timed:
        out["time_ratio"] = round(out["tagi_seconds"] / out["concat_seconds"], 4)
    return out


@torch.no_grad()
def method_flops(cfg, t5: T5, tok, device) -> dict[str, float]:
    """Table 2's FLOPs column: scoring one held-out task of 100 instances (teacher forcing on the references), per
    method, relative to tk-instruct (the full prompt for every instance). TAGI and HINT read the instruction once;
    LoRA rows add their adapters' cost; base and tk-instruct are one architecture."""
    run = Path(cfg.out)
    if cfg.data == "p3" or not (run / "finetune" / "stage.json").exists() or not (run / "teachers-all").is_dir():
        return {}
    exs = held_out_examples(cfg)
    exs = [e for e in exs if e.task == exs[0].task][:100]
    b = {k: v.to(device) for k, v in eval_batcher(cfg, exs, tok, len(exs)).batch(0).items()}
    tagi = TAGI.load(run / "finetune", t5).to(device).eval()
    lora = load_bank(run / "teachers-all", t5, device)[0].get(0)
    run_tagi, run_concat = task_runs(tagi, lora, b)

    def adapters_only():
        gen = tagi.task_adapters(b["instruction_ids"][:1], b["instruction_mask"][:1])[2]
        return t5(b["input_ids"], b["attention_mask"], labels=b["labels"], adapters=gen)
    f = {"tk-instruct": count_flops(lambda: t5(b["prompt_ids"], b["prompt_mask"], labels=b["labels"])),
         "concat": count_flops(run_concat), "tagi": count_flops(run_tagi), "tagi-adapter": count_flops(adapters_only),
         "noinstr": count_flops(lambda: t5(b["input_ids"], b["attention_mask"], labels=b["labels"], adapters=lora))}
    f.update({"base": f["tk-instruct"], "teacher": f["concat"], "hint": f["tagi"]})
    return {k: round(v / f["tk-instruct"], 4) for k, v in f.items()}


def efficiency_report(cfg, t5: T5, tok, device) -> dict:
    """One task of 100 instances, measured twice: the run's own models on a held-out task, and an SNI-shaped case
    (T5 v1.1-base shape, rank 32 on q and v, ≈1,000-token prompts; FLOPs only, counted on the meta device)."""
    tagi = TAGI.load(Path(cfg.out) / "finetune", t5).to(device).eval()
    exs = held_out_examples(cfg)
    exs = [e for e in exs if e.task == exs[0].task][:100]
    batch = {k: v.to(device) for k, v in eval_batcher(cfg, exs, tok, len(exs)).batch(0).items()}
    concat = load_bank(Path(cfg.out) / "teachers-all", t5, device)[0].get(0)
    report = {"run": {"task": exs[0].task, "instances": len(exs), "device": str(device),
                      **task_cost(tagi, concat, batch)}}
    report["sni_shape"] = sni_shape_cost()
    return report


def sni_shape_cost(N=100, s=900, S=100, T=16) -> dict:
    """Instruction (definition + 2 examples) ≈ s tokens, instance ≈ S, prompt = both, targets T."""
    c = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                 num_heads=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        big = TAGI(T5(c), TAGIConfig(rank=32))
        ones = lambda *shape: torch.ones(*shape, dtype=torch.long)  # noqa: E731
        b = {"instruction_ids": ones(N, s), "instruction_mask": ones(N, s), "input_ids": ones(N, S),
             "attention_mask": ones(N, S), "prompt_ids": ones(N, s + S), "prompt_mask": ones(N, s + S),
             "labels": ones(N, T)}
        lora = {p: (torch.zeros(1, 32, big.t5.adaptable()[p].in_features),
                    torch.zeros(1, big.t5.adaptable()[p].out_features, 32)) for p in big.targets}
        out = task_cost(big, lora, b, timed=False)
    return {"instruction_tokens": s, "instance_tokens": S, "target_tokens": T, **out}


# ----------------------------------------------------------------------------------------------------------------
# Seeds, scaling and figures: python evaluate.py --out RUN --seeds 3 --ablations --scaling --plot

SCALING = (8, 24, 60)  # training tasks per category of the scaling runs (the run itself has them all: 120)


def seed_dir(run_dir: Path, seed: int) -> Path:
    return run_dir if seed == 0 else run_dir / f"seed-{seed}"


def train_run(run_dir: Path, out: Path, *extra: str):
    """`python train.py` with the command line that made run_dir (its pipeline.json; none: the zero-argument run)
    and `extra` after it (later flags win): trains what out lacks, keeping stages trained with the same settings."""
    f = run_dir / "pipeline.json"
    argv = json.loads(f.read_text())["argv"] if f.is_file() else []
    suite = ["--data_dir", str(run_dir / "suite")] if (run_dir / "suite" / "suite.json").is_file() else []
    cmd = [sys.executable, str(Path(__file__).with_name("train.py")), *argv, *suite, "--out", str(out), *extra]
    print("$ python", " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode:
        raise SystemExit(f"{out}: training failed (see above); run the same command again to go on")


def mean_std(xs: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": round(m, 2), "std": round(sd, 2)}


def summarize(runs: list[dict]) -> dict:
    """Several results.json (one per seed) -> the same layout with {"mean", "std"} for every number all have."""
    def merge(vals):
        if isinstance(vals[0], dict):
            return {k: merge([v[k] for v in vals]) for k in vals[0] if all(k in v for v in vals)}
        return mean_std(vals) if isinstance(vals[0], (int, float)) else vals[0]
    return {"seeds": [r["config"]["seed"] for r in runs], **merge([{k: v for k, v in r.items() if k != "config"}
                                                                   for r in runs])}


def noise_verdict(a: dict, b: dict) -> str:
    """b against a ({"mean", "std"} each): a difference only when it exceeds both spreads."""
    d = b["mean"] - a["mean"]
    return "within noise" if abs(d) <= max(a["std"], b["std"]) else "higher" if d > 0 else "lower"


def ablation_table(summ: dict) -> str:
    lines = ["| method | held-out ROUGE-L | seen ROUGE-L | Δ held-out | Δ seen |", "|---|---|---|---|---|"]
    t = summ["tagi"]
    for name in ["tagi", *ABLATIONS]:
        if name not in summ:
            continue
        cells = []
        for split in ("held-out", "seen"):
            a, b = t[split]["overall"]["rougeL"], summ[name][split]["overall"]["rougeL"]
            cells.append(f"{b['mean'] - a['mean']:+.1f} ({noise_verdict(a, b)})" if name != "tagi" else "")
        r = {s: summ[name][s]["overall"]["rougeL"] for s in ("held-out", "seen")}
        lines.append(f"| {name} | {r['held-out']['mean']:.1f} ± {r['held-out']['std']:.1f} | "
                     f"{r['seen']['mean']:.1f} ± {r['seen']['std']:.1f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def family_table(summ: dict, chances: dict | None = None) -> str:
    """Held-out ROUGE-L per family (category), mean ± std, one column per method; with chances, a chance column
    and the best method's margin over it."""
    names = [n for n in METHODS if "held-out" in summ.get(n, {})]
    cats = list(summ["tagi"]["held-out"]["per_category"])
    extra = " chance | best − chance |" if chances else ""
    lines = ["| family | " + " | ".join(names) + " |" + extra, "|---" * (len(names) + 1 + 2 * bool(chances)) + "|"]
    for c in cats:
        cells = [summ[n]["held-out"]["per_category"][c]["rougeL"] for n in names]
        k = max(range(len(cells)), key=lambda i: cells[i]["mean"])  # the best method
        lines.append(f"| {c} | " + " | ".join(f"{x['mean']:.0f} ± {x['std']:.0f}" for x in cells) + " |" + (
            f" {chances[c]:.0f} | {cells[k]['mean'] - chances[c]:+.0f} ({names[k]}) |" if chances else ""))
    return "\n".join(lines)


def plots(run_dir: Path, summ: dict | None, scaling: dict | None) -> list[Path]:
    """PNGs under <run>/results/plots: every stage's logged terms, the Table 2 / Table 4 bars (mean ± std over the
    seeds) and the scaling figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = run_dir / "results" / "plots"
    out.mkdir(parents=True, exist_ok=True)
    logs = sorted(d for d in run_dir.iterdir() if (d / "log.jsonl").is_file())
    fig, axes = plt.subplots(math.ceil(len(logs) / 4), 4, figsize=(16, 3 * math.ceil(len(logs) / 4)), squeeze=False)
    for ax, d in zip(axes.flat, logs):
        recs = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        starts = [i for i in range(len(recs)) if i == 0 or recs[i]["step"] <= recs[i - 1]["step"]]
        recs = recs[starts[-1]:]  # a stage trained again appends to its log: its last training
        for k in [k for k in recs[0] if k not in ("step", "lr", "ms_per_step", "tokens_per_s")]:
            ax.plot([r["step"] for r in recs], [r[k] for r in recs], label=k)
        ax.set(title=d.name, xlabel="step", yscale="log")
        ax.legend(fontsize=7)
    for ax in axes.flat[len(logs):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    files = [out / "curves.png"]
    for name, rows in (("table2", METHODS), ("table4", ("tagi", *ABLATIONS))) if summ else ():
        rows = [m for m in rows if m in summ]
        if len(rows) < 2:
            continue
        fig, ax = plt.subplots(figsize=(1.1 * len(rows) + 2, 3.5))
        for i, split in enumerate(("held-out", "seen")):
            vals = [summ[m][split]["overall"]["rougeL"] if split in summ[m] else {"mean": 0, "std": 0} for m in rows]
            ax.bar([j + 0.4 * i - 0.2 for j in range(len(rows))], [v["mean"] for v in vals], 0.4, label=split,
                   yerr=[v["std"] for v in vals], capsize=3)
        ax.set_xticks(range(len(rows)), rows, rotation=20)
        ax.set(ylabel="ROUGE-L", title=f"{name}: mean ± std over seeds {summ['seeds']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=90)
        files.append(out / f"{name}.png")
    if scaling:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in ("tagi", "tk-instruct"):
            ax.plot(list(scaling), [scaling[n][m] for n in scaling], marker="o", label=m)
        ax.set(xscale="log", xlabel="training tasks per family", ylabel="held-out ROUGE-L", title="scaling (seed 0)")
        ax.set_xticks(list(scaling), [str(n) for n in scaling])
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=90)
        files.append(out / "scaling.png")
    plt.close("all")
    return files


def load_run(run_dir: Path, device_flag: str | None):
    """The run's settings (its finetune stage's config), its base T5, tokenizer and device (the run's own unless
    device_flag says otherwise)."""
    saved = read_stage_info(run_dir / "finetune", "finetune")["config"]  # already resolved by train.py
    cfg = SimpleNamespace(**{**saved, "out": str(run_dir)})
    device = data.pick_device(device_flag or cfg.device)
    t5, info = base_of(run_dir / "finetune", device)
    return cfg, t5, data.Tokenizer(info["tokenizer"]), device


def report(run_dir: Path, seeds: int, ablations: bool, scaling: bool, plot: bool, device_flag: str | None):
    """Train what is missing (seeds 1.. in <run>/seed-<k>, scaling runs in <run>/scaling-<n>), score it, and write
    <run>/results/summary.{md,json} (and the PNGs)."""
    runs = []
    for seed in range(seeds):
        d = seed_dir(run_dir, seed)
        f = d / "results" / "results.json"
        found = json.loads(f.read_text()) if f.is_file() else {}
        if not found or (ablations and not all(n in found for n in ABLATIONS)):
            train_run(run_dir, d, "--seed", str(seed), "--stage", "ablations" if ablations else "all")
            found = json.loads(f.read_text())
        runs.append(found)
    summ, points = summarize(runs), {}
    c = runs[0]["config"]
    chances = chance(c["data_dir"], c["eval_instances"]) if c.get("data") == "suite" and "data_dir" in c else None
    write_summary(run_dir, summ, points, ablations, chances)  # now, and again once the scaling runs are in
    if scaling:
        for n in SCALING:
            d = run_dir / f"scaling-{n}"
            if not (d / "results" / "results.json").is_file():
                train_run(run_dir, d, "--seed", "0", "--stage", "finetune", "--tasks_per_category", str(n))
                compare(*load_run(d, device_flag))
            points[n] = json.loads((d / "results" / "results.json").read_text())
        points[max(len(v) for v in family_tasks(run_dir).values())] = runs[0]
        points = {n: {m: points[n][m]["held-out"]["overall"]["rougeL"] for m in ("tagi", "tk-instruct")}
                  for n in sorted(points)}
        write_summary(run_dir, summ, points, ablations, chances)
    if plot:
        print("\n".join(str(p) for p in plots(run_dir, summ, points)))


def write_summary(run_dir: Path, summ: dict, points: dict, ablations: bool, chances: dict | None = None):
    md = [f"Mean ± std over seeds {summ['seeds']}.", "", "Table 2", "", results_table(
        {n: summ[n] for n in METHODS if n in summ}), "", "Per family (held-out ROUGE-L)", "",
        family_table(summ, chances)]
    if ablations:
        md += ["", "Table 4 (Δ against tagi; a difference only beyond both rows' std)", "", ablation_table(summ)]
    if points:
        md += ["", "Scaling (held-out ROUGE-L, seed 0)", "", "| tasks per family | tagi | tk-instruct |",
               "|---|---|---|"] + [f"| {n} | {p['tagi']:.1f} | {p['tk-instruct']:.1f} |" for n, p in points.items()]
    (run_dir / "results").mkdir(exist_ok=True)
    (run_dir / "results" / "summary.json").write_text(json.dumps({**summ, "scaling": points, "chance": chances},
                                                                   indent=1) + "\n")
    (run_dir / "results" / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


def family_tasks(run_dir: Path) -> dict[str, list[str]]:
    cfg = read_stage_info(run_dir / "finetune", "finetune")["config"]
    out = {}
    for t in data.load_sni(cfg["data_dir"], part="train", max_instances=0, per_category=cfg.get("tasks_per_category")):
        out.setdefault(t["Categories"][0], []).append(t["name"])
    return out


def main(argv=None):
    ap = data.ArgumentParser(description="Score a finished run: TAGI against its baselines and ablations.")
    ap.add_argument("--out", default="runs/default", help="the run folder written by train.py")
    ap.add_argument("--ablations", action="store_true", help="also score Table 4's ablations (trained by "
                    "`python train.py --stage ablations`; with --seeds, trained here where missing)")
    ap.add_argument("--seeds", type=data.bounded(int, ">= 1"), default=1, help="mean ± std over seeds 0..N-1 "
                    "(seed k > 0 in <out>/seed-k), training what is missing with the run's own command line")
    ap.add_argument("--scaling", action="store_true", help=f"also train and score TAGI and tk-instruct with "
                    f"{', '.join(map(str, SCALING))} training tasks per category (<out>/scaling-<n>)")
    ap.add_argument("--plot", action="store_true", help="write PNGs under <out>/results/plots (needs matplotlib)")
    ap.add_argument("--efficiency", action="store_true", help="FLOPs and wall time, TAGI vs concatenation")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's own --device")
    args = ap.parse_args(argv)
    run_dir = Path(args.out)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot: needs matplotlib, which is not installed: pip install matplotlib") from None
    if args.seeds > 1 or args.scaling or args.plot:
        if run_dir.exists() and not run_dir.is_dir():
            raise SystemExit(f"--out {run_dir}: is a file; pass a run folder")
        return report(run_dir, args.seeds, args.ablations, args.scaling, args.plot, args.device)
    if not run_dir.is_dir():
        raise SystemExit(f"--out {run_dir}: no such run folder; train one first: python train.py --out {run_dir}")
    missing = [n for n in ABLATIONS if not (method_dir(run_dir, n) / "stage.json").is_file()] if args.ablations else []
    if missing:
        raise SystemExit(f"--ablations: {method_dir(run_dir, missing[0])} (and {len(missing) - 1} more) not trained; "
                         f"run python train.py --stage ablations --out {run_dir} first")
    cfg, t5, tok, device = load_run(run_dir, args.device)
    if args.efficiency:
        print(json.dumps(efficiency_report(cfg, t5, tok, device), indent=1))
    else:
        compare(cfg, t5, tok, device, args.ablations)


if __name__ == "__main__":
    data.cli(main)
