"""Train TAGI, stage by stage (paper §3.3-3.4), behind one command line.

    python train.py                            # the whole pipeline on the built-in suite, then the results table
    python train.py --stage pretrain           # one stage (missing earlier stages are built first, and said so)
    python train.py --stage finetune --data sni --data_dir natural-instructions --model t5-lm-base --out runs/sni
    torchrun --nproc_per_node 2 train.py ...   # PyTorch DDP: each rank reads its own shard of every batch

Stages (each writes <out>/<stage>/ and can be resumed with --resume):
    base      the suite only: a tiny T5 trained from scratch (span corruption + prefix LM on suite text), standing
              in for T5-LM-adapt. Real runs pass --model instead.
    tk        the Tk-Instruct analog (paper §4.2): every weight of the base finetuned on full Tk-Instruct prompts.
              It is the logit teacher of L_kl, the base of the teacher LoRAs, and a baseline row. Real runs may
              pass a downloaded Tk-Instruct folder as --tk_model instead.
    teachers  "Training with Instance": one LoRA per training task (--group task) or category, all in one bank,
              on the frozen base with the full Tk-Instruct prompt. --group all trains one shared LoRA: the
              instruction-concatenation baseline; with --teacher_input instance, the no-instruction baseline.
    pretrain  hypernetwork pretraining on plain text cut as a | b | c: a is the "instruction", b the input, c
              the target; cross-entropy only.
    finetune  TAGI on the tasks with L_ce + λ1·L_kl + λ2·L_ins, starting from the pretrained hypernetwork
              (--name NAME: a variant, in <out>/NAME).
    all       the pipeline (`pipeline`): tk, the teachers and the two one-LoRA baselines, pretrain, TAGI and the
              HINT-like variant (evaluate.VARIANTS), then the table (evaluate.compare). Stages already trained with
              the same settings are kept (so a second run only scores).
    ablations `all` and the paper's Table 4: one finetune variant each (evaluate.ABLATIONS), <out>/finetune-<name>.

Every stage: AdamW, linear warmup then cosine decay, gradient accumulation, bf16 autocast on CUDA, gradient
clipping, a tqdm bar, one JSON line per logged step (<stage>/log.jsonl), checkpoints in safetensors + JSON
written atomically, exact resume (same batches, same RNG), a stop with the last good checkpoint kept on NaN/inf.
Bad input (a flag, or a file it names) stops the run before any work with one line `error: ...`, exit status 2.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
from hypernet import FFN, LoRABank, target_paths
from model import T5, T5Config, atomic_write_text, load_safetensors, read_safetensors_header, save_safetensors, \
    token_nll
from tagi import TAGI, TAGIConfig, ce_loss, load_bank, read_stage_info, teacher_group

HERE = Path(__file__).resolve().parent
SUITE_BASE = HERE / "assets" / "suite-base"  # committed output of `python train.py --stage base` (see README)


def arg(default, valid: str):
    """A Config field and the values its flag accepts, declared together: choices "a|b|c", or a range ">= 1",
    "> 0", "[0, 1)". parse_args checks every flag against it before any work; a default left out of its range
    (0, -1, "") means "decided later" (see resolve and stage_defaults)."""
    return field(default=default, metadata={"valid": valid})


INS_WEIGHT = 1e-4  # λ2 of the defaults, chosen on seen tasks (README, "Choosing λ2")


@dataclass
class Config:
    stage: str = arg("all", "all|base|tk|teachers|pretrain|finetune|ablations")  # all: the pipeline + evaluation
    recipe: str = arg("", "|official|paper")      # a preset of the switches below (README "Differences"); '': ours
    data: str = arg("suite", "suite|sni|p3")      # the built-in suite, or --data_dir's SNI / P3
    data_dir: str = ""                            # SNI clone / P3 folder (the suite is generated under <out>/suite)
    model: str = ""                               # Hugging Face T5 folder (suite: <out>/base, or the committed one)
    tk_model: str = ""                            # Tk-Instruct, a Hugging Face T5 folder (default: <out>/tk)
    tokenizer: str = ""                           # spiece.model (default: <model>/spiece.model)
    text: str = ""                                # pretraining text: C4 *.json(.gz) / *.txt files (default: task text)
    out: str = "runs/default"                     # run folder: one subfolder per stage, results/ after evaluation
    group: str = arg("", "|task|category|all")    # teachers: a LoRA per task / category / one for all ('': auto)
    teacher_input: str = arg("prompt", "prompt|instance")  # teachers: full Tk-Instruct prompt | instance only
    teacher_base: str = arg("tk", "tk|base")      # teachers per task/category sit on: tk (the paper, §3.2.2) | base
    kl_teacher: str = arg("tk", "tk|lora")        # L_kl's teacher: Tk-Instruct (§4.2) | each task's LoRA
    num_pos: int = arg(-1, ">= 0")                # positive examples: 0 "Def", 2 "Def+2Pos" (-1: suite 0, else 2)
    max_instances: int = arg(100, ">= 1")         # per training task (SNI: 100)
    fusion: str = arg("concat", "concat|encoder|none")  # Eq. 1: concat (official code) | encoder (paper) | none
    rank: int = arg(0, ">= 1")                    # LoRA rank (0: 32 for real models, 8 for the suite)
    alpha: float = arg(0.0, "> 0")                # LoRA alpha (0: = rank)
    modules: str = ""                             # adapted Linears (default "q,v"; the suite adapts every Linear)
    hidden: int = arg(256, ">= 1")                # hypernetwork width
    pooling: str = arg("mean", "mean|first_last")  # task vector: mean of I_x (padding out) | first_last (official)
    init: str = arg("offset", "offset|official")  # heads: offset (ΔW = 0, rank 2r) | official (N(0, 1e-7), rank r)
    ce_weight: float = arg(1.0, ">= 0")           # Eq. 6 weight of L_ce (0 switches the term off)
    kl_weight: float = arg(1.0, ">= 0")           # λ1, weight of L_kl (distillation from the teachers' logits)
    ins_weight: float = arg(INS_WEIGHT, ">= 0")   # λ2, weight of L_ins (distance to the teachers' LoRA; README)
    temperature: float = arg(2.0, "> 0")          # T of L_kl
    kl_t_squared: bool = True                     # L_kl x T² (ours); the paper and official code: --no-kl_t_squared
    kl_positions: str = arg("tokens", "tokens|all")  # L_kl averaged over real target tokens | all positions (official)
    ins_mode: str = arg("delta", "delta|params|official")  # L_ins: delta ||ΔW-ΔW_t||² | factor MSEs (--init official)
    no_pretrain: bool = False                     # finetune from a fresh hypernetwork (ablation)
    steps: int = arg(0, ">= 1")                   # optimizer steps (0: the stage's default, see DEFAULTS)
    lr: float = arg(0.0, "> 0")                   # peak learning rate (0: the stage's default)
    batch_size: int = arg(0, ">= 1")              # per micro-step, all ranks (0: stage default); x grad_accum
    grad_accum: int = arg(1, ">= 1")              # micro-steps per optimizer step
    warmup: float = arg(-1.0, "[0, 1)")           # fraction of steps (-1: the stage's default, see DEFAULTS)
    schedule: str = arg("cosine", "cosine|constant")  # after the linear warmup: cosine to lr/10 | constant (official)
    optimizer: str = arg("adamw", "adamw|adafactor")  # adafactor: the paper's pretraining (Table 8)
    sampling: str = arg("first", "first|random")  # SNI: the first max_instances and first reference | random (official)
    student_input: str = arg("instance", "instance|prompt")  # student encoder: instance | prompt (Def: official)
    reader: str = arg("base", "base|tk")          # the encoder reading the instruction: base (paper) | tk (official)
    weight_decay: float = arg(0.0, ">= 0")        # AdamW weight decay
    clip: float = arg(1.0, ">= 0")                # gradient-norm clipping (0: off)
    max_source_len: int = arg(1024, ">= 1")       # tokens of a prompt / instance (the suite: 256)
    max_target_len: int = arg(128, ">= 1")        # tokens of a target, and of generation (the suite: 32)
    max_instruction_len: int = arg(1024, ">= 1")  # tokens of the instruction the hypernetwork reads (the suite: 256)
    bf16: bool = True                             # autocast on CUDA
    grad_checkpointing: bool = False              # recompute T5 blocks in backward: less memory
    compile: bool = False                         # torch.compile the training objective
    seed: int = 0                                 # initialisation and batch order
    device: str = arg("auto", "auto|cpu|cuda")    # auto: cuda if present
    log_every: int = arg(25, ">= 1")              # steps between log lines (<stage>/log.jsonl)
    save_every: int = arg(500, ">= 1")            # steps between checkpoints
    resume: bool = False                          # continue the stage from its latest checkpoint
    quick: bool = False                           # a short pipeline (CI): fewer steps and instances
    name: str = ""                                # finetune: the variant's folder under --out (default finetune)
    tasks_per_category: int = arg(0, ">= 1")      # keep the first N training tasks of each category (0: all)
    eval_instances: int = arg(100, ">= 1")        # evaluation: first N instances of each test task


# --recipe: the switches that make a run follow the official code or the paper's text (README "Differences").
# Steps, learning rates and batch sizes stay the data's (DEFAULTS), and flags given on the command line win.
RECIPES = {
    "official": dict(  # Xnhyacinth/TAGI, src/ at 8702b4e (scripts/train_tk_instruct.sh defaults)
        kl_teacher="tk", teacher_base="tk",                     # Tk-Instruct: logit teacher, base of the LoRAs
        ce_weight=0.6, kl_weight=0.4, temperature=3.0,          # 0.6·CE + 0.4·KL at T = 3 ...
        kl_t_squared=False, kl_positions="all",                 # ... without T², mean over all positions
        ins_weight=1.0, ins_mode="official",                    # σ(L)·L, L = 1000·[MSE(A, B_t) + MSE(B, A_t)]
        init="official", pooling="first_last", hidden=8,        # N(0, 1e-7) heads; first_last_avg; width 8
        rank=16, alpha=4.0, modules="q,v",                      # r = 16, B / sqrt(r) (α = sqrt(16)), q and v
        no_pretrain=True, schedule="constant", warmup=0.03,     # no pretraining; warmup then constant lr
        sampling="random", student_input="prompt", reader="tk"),  # random instances / reference; custom_model;
                                                                # the teacher's encoder reads the instruction
    "paper": dict(  # the NeurIPS 2024 text (§3-4, Table 8); where it is silent, ours (README)
        kl_teacher="tk", teacher_base="tk",                     # §4.2 Tk-Instruct; §3.2.2 LoRAs on it
        temperature=1.0, kl_t_squared=False,                    # Eq. 5: KL of the plain softmaxes
        ins_weight=1e-4, ins_mode="delta",                      # Eq. 4 on (λ2 not given: MSE per weight, d = 128)
        fusion="encoder", rank=32, alpha=32.0, modules="q,v"),  # Eq. 1; rank 32 on q, v of every attention
}

# (steps, lr, batch, warmup fraction) per stage. Paper (T5-LM-base, SNI): pretrain 50k steps lr 1e-3 batch 8;
# finetune 20k, 1e-4, 16; warmup 2%. The suite's 200-step pretraining warms up over 10%: 2% is 4 steps, too few
# (README "Why HINT and `tagi-noins` failed on some seeds").
DEFAULTS = {
    "suite": {"base": (8000, 2e-3, 64, 0.02), "tk": (600, 1e-3, 32, 0.02), "teachers": (300, 3e-3, 32, 0.02),
              "pretrain": (200, 1e-3, 32, 0.1), "finetune": (600, 1e-3, 32, 0.02)},
    "real": {"base": (0, 0, 0, 0.02), "tk": (10000, 5e-5, 16, 0.02), "teachers": (2000, 1e-4 * 10, 16, 0.02),
             "pretrain": (50000, 1e-3, 8, 0.02), "finetune": (20000, 1e-4, 16, 0.02)},
}


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; one process is the default)


def setup_distributed(device: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = data.pick_device(device).type
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def say(msg: str):
    if int(os.environ.get("RANK", "0")) == 0:
        tqdm.write(msg)


# ----------------------------------------------------------------------------------------------------------------
# Objectives: one nn.Module per stage whose forward(batch, norm) returns a dict of losses with "loss"


def span_corrupt(ids: list[int], rng: random.Random, vocab: int, rate=0.15, span=3):
    """T5's denoising objective: replace ~rate of the tokens, in spans of ~span, by sentinels; the target lists
    the dropped spans after their sentinels."""
    n = len(ids)
    n_spans = max(1, round(n * rate / span))
    starts = sorted(rng.sample(range(n), min(n_spans, n)))
    src, tgt, pos, k = [], [], 0, 0
    for s in starts:
        if s < pos:
            continue
        e = min(n, s + rng.randint(1, 2 * span - 1))
        src += ids[pos:s] + [vocab - 1 - k]
        tgt += [vocab - 1 - k] + ids[s:e]
        pos, k = e, k + 1
    return src + ids[pos:], tgt


class Objective(nn.Module):
    """A stage's trainable system. forward(batch, norm) -> {"loss": ..., other terms}; `norm` holds count(batch)
    summed over the micro-batches and ranks of one optimizer step, so losses are exact global means."""
    frozen: tuple = ()  # state-dict prefixes of inputs the stage does not train (not saved in its checkpoints)

    def count(self, batch):
        return {"tokens": (batch["labels"] != -100).sum(), "examples": torch.tensor(len(batch["labels"])),
                "positions": torch.tensor(batch["labels"].numel())}

    def trained_state(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen)}

    def load_trained_state(self, sd, path):
        own = self.state_dict()
        wrong = [f"{k} {tuple(v.shape)} (here {tuple(own[k].shape)})" for k, v in sd.items()
                 if k in own and v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"{path}: a checkpoint of another configuration (rank, modules, hidden or fusion "
                             f"differ): {', '.join(wrong[:3])}")
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith(self.frozen)]
        if missing or unexpected:
            raise ValueError(f"{path}: not a checkpoint of this stage: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}")


class BaseObjective(Objective):
    """The base and tk stages: plain T5 cross-entropy, every weight trained (tk: on the full prompt)."""

    def __init__(self, t5: T5, source: str = "input"):
        super().__init__()
        self.t5, self.ids, self.mask = t5, *{"input": ("input_ids", "attention_mask"),
                                            "prompt": ("prompt_ids", "prompt_mask")}[source]

    def forward(self, batch, norm):
        logits = self.t5(batch[self.ids], batch[self.mask], labels=batch["labels"]).logits
        return {"loss": ce_loss(logits, batch["labels"], norm["tokens"])}


class TeacherObjective(Objective):
    """The teachers stage: frozen T5 + each example's LoRA from the bank, cross-entropy on the full prompt (or
    the instance alone). The loss is a sum over keys of each key's mean token loss, so every LoRA gets exactly
    the gradient it would get if trained alone on its own examples (and AdamW acts element by element)."""
    frozen = ("t5.",)

    def __init__(self, t5: T5, bank: LoRABank, key_of_task: torch.Tensor, use_prompt: bool):
        super().__init__()
        self.t5, self.bank, self.use_prompt = t5.requires_grad_(False), bank, use_prompt
        self.register_buffer("key_of_task", key_of_task, persistent=False)

    def count(self, batch):
        tokens = (batch["labels"] != -100).sum(1).float()
        return {"key_tokens": torch.zeros(self.bank.num, device=tokens.device).index_add_(
            0, self.key_of_task[batch["task_idx"]], tokens)}

    def forward(self, batch, norm):
        ids, mask = (batch["prompt_ids"], batch["prompt_mask"]) if self.use_prompt else \
            (batch["input_ids"], batch["attention_mask"])
        key = self.key_of_task[batch["task_idx"]]
        logits = self.t5(ids, mask, labels=batch["labels"], adapters=self.bank(key)).logits
        nll = token_nll(logits, batch["labels"]).sum(1)  # (N,)
        return {"loss": (nll / norm["key_tokens"][key].clamp(min=1)).sum()}


class TAGIObjective(Objective):
    """Pretrain and finetune: TAGI's loss (Eq. 6). teachers: the bank for L_ins (and for L_kl when kl_t5 is
    None); kl_t5: L_kl's teacher model on the full prompt (the Tk-Instruct analog); kl_lora: whether it adds each
    task's LoRA from the bank (the bank was trained on kl_t5)."""
    frozen = ("tagi.t5.", "teachers.", "kl_t5.")

    def __init__(self, tagi: TAGI, teachers: LoRABank | None, key_of_task: torch.Tensor | None,
                 kl_t5: T5 | None = None, kl_lora: bool = False):
        super().__init__()
        self.tagi, self.teachers, self.kl_t5, self.kl_lora = tagi, teachers, kl_t5, kl_lora
        if teachers is not None:
            teachers.requires_grad_(False)
            self.register_buffer("key_of_task", key_of_task, persistent=False)
        if kl_t5 is not None:
            kl_t5.requires_grad_(False).eval()

    def kl_teacher(self, batch):
        ad = self.teachers(self.key_of_task[batch["task_idx"]]) if self.kl_lora else None
        return self.kl_t5(batch["prompt_ids"], batch["prompt_mask"], labels=batch["labels"], adapters=ad).logits

    def forward(self, batch, norm):
        return self.tagi.loss(batch, self.teachers, getattr(self, "key_of_task", None), norm["tokens"],
                              norm["examples"], self.kl_teacher if self.kl_t5 is not None else None,
                              norm["positions"])


# ----------------------------------------------------------------------------------------------------------------
# The training loop (shared by every stage)


def get_lr(step: int, steps: int, lr: float, warmup: float, schedule: str = "cosine") -> float:
    """Linear warmup over the first `warmup` fraction of steps, then cosine decay to lr/10.
    w = max(1, int(warmup · steps)) warmup steps: step k < w gets lr · (k + 1) / w, so step w - 1 is at the peak
    lr. From k = w on, half a period of a cosine over the remaining steps - w (at least 1) brings it from lr at
    k = w down to lr / 10 at k = steps. The paper warms up over 2% of the steps (train.py's default).
    schedule="constant" stays at lr after the warmup (the official code's DeepSpeed WarmupLR, whose warmup is
    log-shaped; here it is linear)."""
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    if schedule == "constant":
        return lr
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


def save_checkpoint(stage_dir: Path, objective, opt, step: int, cfg: Config, stage: str):
    """<stage>/ckpt-<step>/ {trained.safetensors, optimizer.safetensors, state.json}, then <stage>/latest is
    replaced atomically, then older checkpoints are removed: a crash at any moment leaves one loadable."""
    d = stage_dir / f"ckpt-{step:07d}"
    d.mkdir(parents=True, exist_ok=True)
    save_safetensors(objective.trained_state(), d / "trained.safetensors")
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, s in osd["state"].items() for k, v in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_safetensors(tensors, d / "optimizer.safetensors")
    atomic_write_text(d / "state.json", json.dumps({"stage": stage, "step": step, "config": asdict(cfg),
                                                     "param_groups": osd["param_groups"]}, indent=1))
    atomic_write_text(stage_dir / "latest", d.name + "\n")
    for old in stage_dir.glob("ckpt-*"):
        if old.name != d.name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(stage_dir: Path, objective, opt, stage: str) -> int:
    d = stage_dir / (stage_dir / "latest").read_text().strip()
    state = json.loads((d / "state.json").read_text())
    if state["stage"] != stage:
        raise ValueError(f"{d / 'state.json'}: field 'stage' is {state['stage']!r}, this run is {stage!r}")
    objective.load_trained_state(load_safetensors(d / "trained.safetensors"), d / "trained.safetensors")
    tensors = load_safetensors(d / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.cpu").clone())  # a copy: a view into the mapped file crashes torch
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng.clone())
    opt_state = {}
    for k, v in tensors.items():
        i, name = k.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state["step"]


def fit(cfg: Config, stage: str, stage_dir: Path, objective, batcher, device) -> None:
    """Train `objective` for cfg.steps optimizer steps over batcher.batch(step * grad_accum + k)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    steps, lr = cfg.steps, cfg.lr
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.Adafactor(params, lr=lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adafactor" \
        else torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    start = 0
    if cfg.resume and (stage_dir / "latest").exists():
        start = load_checkpoint(stage_dir, objective, opt, stage)
        say(f"[{stage}] resumed from step {start}")
    elif (stage_dir / "latest").exists() and rank == 0:
        say(f"[{stage}] {stage_dir} holds a checkpoint; starting over (use --resume to continue it)")
    model = objective
    if world > 1:
        model = nn.parallel.DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.bf16 else nullcontext()
    log = open(stage_dir / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, disable=rank != 0, dynamic_ncols=True)
    done, t0, tokens = start, time.time(), 0
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = get_lr(step, steps, lr, cfg.warmup, cfg.schedule)
            micro = [{k: v.to(device) for k, v in batcher.batch(step * cfg.grad_accum + k, rank, world).items()}
                     for k in range(cfg.grad_accum)]
            counts = [objective.count(b) for b in micro]  # normalisers over the whole global batch, all ranks
            norm = {k: all_sum(sum(c[k] for c in counts).float()) for k in counts[0]}
            terms = {}
            for k, b in enumerate(micro):
                sync = nullcontext() if world == 1 or k == cfg.grad_accum - 1 else model.no_sync()
                with sync, autocast:
                    out = model(b, norm)
                (out["loss"] * world).backward()  # DDP averages over ranks; the norm already divides by all
                for name, v in out.items():
                    terms[name] = terms.get(name, 0.0) + v.detach().float()
                tokens += int(b["input_ids"].numel() + (b["labels"] != -100).sum())
            terms = {k: all_sum(v).item() for k, v in terms.items()}
            if not math.isfinite(terms["loss"]):
                last = (stage_dir / "latest").read_text().strip() if (stage_dir / "latest").exists() else "none"
                raise FloatingPointError(f"[{stage}] loss is {terms['loss']} at step {step}; stopped without "
                                         f"saving. Last good checkpoint: {stage_dir / last}")
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                dt = time.time() - t0
                rec = {"step": step + 1, **{k: round(v, 5) for k, v in terms.items()},
                       "lr": opt.param_groups[0]["lr"], "ms_per_step": round(1000 * dt / cfg.log_every, 1),
                       "tokens_per_s": round(tokens * world / max(dt, 1e-9))}
                bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=rec["tokens_per_s"])
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                t0, tokens = time.time(), 0
            if (step + 1) % cfg.save_every == 0 and step + 1 < steps and rank == 0:
                save_checkpoint(stage_dir, objective, opt, step + 1, cfg, stage)
    except KeyboardInterrupt:
        if rank == 0:
            save_checkpoint(stage_dir, objective, opt, done, cfg, stage)
            say(f"[{stage}] interrupted: saved step {done} to {stage_dir}; continue with --resume")
        raise SystemExit(130)
    if rank == 0:
        save_checkpoint(stage_dir, objective, opt, steps, cfg, stage)
        if log:
            log.close()


# ----------------------------------------------------------------------------------------------------------------
# Stages


def stage_dirs(cfg: Config) -> dict[str, Path]:
    out = Path(cfg.out)
    return {"suite": Path(cfg.data_dir) if cfg.data_dir else out / "suite", "base": out / "base", "tk": out / "tk",
            "pretrain": out / "pretrain", "finetune": out / "finetune"}


def teachers_dir(cfg: Config, group=None, teacher_input=None) -> Path:
    group, teacher_input = group or cfg.group, teacher_input or cfg.teacher_input
    return Path(cfg.out) / f"teachers-{group}{'-instance' if teacher_input == 'instance' else ''}"


def resolve(cfg: Config) -> Config:
    """Fill the defaults that depend on other settings (data kind, stage)."""
    suite = cfg.data == "suite"
    cfg.group = cfg.group or ("category" if suite else "task")
    cfg.num_pos = cfg.num_pos if cfg.num_pos >= 0 else 0 if suite else 2
    if suite:
        cfg.data_dir = str(stage_dirs(cfg)["suite"])
        if (cfg.max_source_len, cfg.max_target_len, cfg.max_instruction_len) == (1024, 128, 1024):
            cfg.max_source_len, cfg.max_target_len, cfg.max_instruction_len = 256, 32, 256
    elif not cfg.data_dir:
        raise SystemExit(f"--data_dir: required with --data {cfg.data} (a local SNI clone or P3 folder)")
    cfg.rank = cfg.rank or (8 if suite else 32)
    cfg.alpha = cfg.alpha or float(cfg.rank)
    cfg.modules = cfg.modules or ("q,k,v,o,wi_0,wi_1,wo" if suite else "q,v")
    return cfg


def stage_defaults(cfg: Config, stage: str) -> Config:
    steps, lr, bs, warmup = DEFAULTS["suite" if cfg.data == "suite" else "real"][stage]
    c = Config(**asdict(cfg))
    c.steps, c.lr, c.batch_size = cfg.steps or steps, cfg.lr or lr, cfg.batch_size or bs
    c.warmup = warmup if cfg.warmup < 0 else cfg.warmup
    if cfg.recipe == "paper" and stage == "pretrain":  # Table 8: Adafactor in float32
        c.optimizer, c.bf16 = "adafactor", False
    if cfg.quick:  # a smoke run of the whole pipeline (CI): a tenth of the steps, small batches
        c.steps, c.batch_size = max(10, c.steps // 10), cfg.batch_size or min(bs, 16)
    return c


def check_inputs(cfg: Config):
    """What can be checked before any work starts, beyond each flag alone (parse_args): flags that go together, and
    the files they name, cheaply (config.json and safetensors headers, not the weights)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out}: is a file; pass a folder for the run")
    if cfg.stage == "base" and cfg.data != "suite":
        raise SystemExit("--stage base exists only for the built-in suite; real runs pass --model DIR")
    if cfg.data != "suite":
        for part in ("train", "test") if cfg.stage in ("all", "ablations") else ("train",):
            f = Path(cfg.data_dir) / (f"splits/default/{part}_tasks.txt" if cfg.data == "sni" else part)
            if not f.exists():
                raise SystemExit(f"--data_dir {cfg.data_dir}: no {f} there; pass a local "
                                 f"{'SNI clone' if cfg.data == 'sni' else 'P3 folder (train/, test/)'}")
    for flag in ("model", "tk_model"):
        if getattr(cfg, flag):
            check_model_dir(Path(getattr(cfg, flag)))
    if cfg.tokenizer and not Path(cfg.tokenizer).is_file():
        raise SystemExit(f"--tokenizer: no tokenizer at {cfg.tokenizer}; pass a SentencePiece spiece.model")
    for path in filter(None, cfg.text.split(",")):
        if not Path(path).exists():
            raise SystemExit(f"--text {path}: no such file or folder")
    if cfg.ins_mode != "delta" and cfg.init == "offset":
        raise SystemExit(f"--ins_mode {cfg.ins_mode}: compares factors of equal rank, but --init offset generates "
                         "rank 2r; use --ins_mode delta or --init official")
    unknown = sorted(set(cfg.modules.split(",")) - {"q", "k", "v", "o", *FFN})
    if unknown:
        raise SystemExit(f"--modules: unknown {unknown}; choose from q,k,v,o (attention) and {','.join(FFN)} (FFN)")
    if cfg.resume:
        d = teachers_dir(cfg) if cfg.stage == "teachers" else stage_dirs(cfg).get(cfg.stage)
        if not ((d / "latest").exists() if d else any(out.glob("*/latest"))):
            raise SystemExit(f"--resume: {d or out} holds no checkpoint to continue; leave --resume out to start")


def check_model_dir(mdir: Path):
    """A Hugging Face T5 folder, checked cheaply: its config.json reads and every weight file's header is sound."""
    if not (mdir / "config.json").is_file():
        raise SystemExit(f"{mdir / 'config.json'}: not found: no base model at {mdir}; pass --model DIR (a Hugging "
                         "Face T5 folder) or run --stage base")
    T5Config.from_json(mdir / "config.json")
    for f in sorted(mdir.glob("*.safetensors")):
        read_safetensors_header(f)


def base_model_dir(cfg: Config) -> Path:
    if cfg.model:
        return Path(cfg.model)
    own = stage_dirs(cfg)["base"]
    if (own / "model.safetensors").exists() or cfg.data != "suite":
        return own
    return SUITE_BASE


def load_base(cfg: Config, device, mdir: Path | None = None) -> tuple[T5, data.Tokenizer, Path]:
    """The frozen base T5 (or the model in `mdir`, e.g. the tk stage's) and its tokenizer, checked together."""
    mdir = mdir or base_model_dir(cfg)
    check_model_dir(mdir)
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else mdir / "spiece.model"
    if not tok_path.exists():
        raise SystemExit(f"--tokenizer: no tokenizer at {tok_path}; pass --tokenizer PATH/spiece.model")
    tok = data.Tokenizer(tok_path)
    t5 = T5.from_pretrained(mdir).to(device).eval()
    t5.encoder.gradient_checkpointing = t5.decoder.gradient_checkpointing = cfg.grad_checkpointing
    if tok.vocab_size > t5.config.vocab_size:
        raise SystemExit(f"--tokenizer {tok_path}: has {tok.vocab_size} ids but the model {mdir} only "
                         f"{t5.config.vocab_size} embeddings: they do not belong together")
    suite_tok = Path(cfg.data_dir) / "spiece.model"
    if cfg.data == "suite" and suite_tok.read_bytes() != tok_path.read_bytes():
        raise SystemExit(f"{tok_path}: differs from the suite's tokenizer {suite_tok}: the base model was trained "
                         "for another suite")
    return t5, tok, mdir


def task_examples(cfg: Config, part: str = "train"):
    if cfg.data == "p3":
        return data.p3_examples(data.load_p3(Path(cfg.data_dir) / part, cfg.max_instances))
    n = min(cfg.max_instances, 20) if cfg.quick else cfg.max_instances
    tasks = data.load_sni(cfg.data_dir, part=part, max_instances=n, per_category=cfg.tasks_per_category,
                          sample_seed=cfg.seed if cfg.sampling == "random" else None)
    return data.sni_examples(tasks, num_pos=cfg.num_pos)


def batcher(cfg: Config, examples, tok, **kw):
    return data.Batcher(examples, tok, cfg.batch_size, seed=cfg.seed, max_source_len=cfg.max_source_len,
                        max_target_len=cfg.max_target_len, max_instruction_len=cfg.max_instruction_len,
                        random_reference=cfg.sampling == "random", **kw)


def write_stage_info(d: Path, **info):
    atomic_write_text(d / "stage.json", json.dumps(info, indent=2) + "\n")


def run_base(cfg: Config, device):
    """Suite only: train a tiny T5 from scratch on the training tasks' text (held-out tasks never seen) with
    generic denoising objectives (see TextBatcher), standing in for T5-LM-adapt."""
    d = stage_dirs(cfg)["base"]
    tok = data.Tokenizer(Path(cfg.data_dir) / "spiece.model")
    torch.manual_seed(cfg.seed)
    t5 = T5(T5Config.tiny(tok.vocab_size)).to(device)
    t5.encoder.gradient_checkpointing = t5.decoder.gradient_checkpointing = cfg.grad_checkpointing
    tasks = data.load_sni(cfg.data_dir, part="train", max_instances=None)
    docs = [t["Definition"][0] for t in tasks] + [x["input"] + " " + x["output"][0] for t in tasks
                                                  for x in t["Instances"]]
    b = TextBatcher([tok.encode(s, add_eos=False) for s in docs], cfg.batch_size, tok.vocab_size, cfg.seed,
                    warmup=cfg.steps // 8)
    d.mkdir(parents=True, exist_ok=True)
    fit(cfg, "base", d, BaseObjective(t5), b, device)
    if int(os.environ.get("RANK", "0")) == 0:
        t5.save_pretrained(d)
        shutil.copy(Path(cfg.data_dir) / "spiece.model", d / "spiece.model")
        write_stage_info(d, stage="base", config=asdict(cfg))


class TextBatcher:
    """Base-stage batches, a pure function of (seed, step). Each text becomes one of four generic pairs, in equal
    shares: T5 span corruption, prefix LM (input = a first part, target = the rest), reconstruction (BART-style:
    the target is the whole text, the input has its dropped spans replaced by sentinels) or lookup (the input is a
    query token and the text, the target the token that follows the query's first occurrence, or a sentinel saying
    it does not occur: half the queries come from another text). Reconstruction teaches the decoder to copy what
    the encoder sees, lookup to find a named token in it. As in UL2, a mode token opens the input of the last
    three (the three lowest sentinels, which span corruption never reaches here), so the model knows which of the
    four it is asked for instead of guessing. The first `warmup` steps are all plain copying (reconstruction with
    nothing dropped): from scratch, this model learns to copy alone in about 1,000 steps and not at all in a mix,
    and locating a token is learned only once it copies (README "What we tried")."""

    def __init__(self, seqs, batch_size, vocab, seed, warmup=0):
        self.seqs, self.batch_size, self.vocab, self.seed = [s for s in seqs if len(s) >= 2], batch_size, vocab, seed
        self.warmup = warmup

    def batch(self, step, rank=0, world_size=1):
        src, tgt, V = [], [], self.vocab
        per = self.batch_size // world_size
        for j in range(rank * per, (rank + 1) * per):
            rng = random.Random(f"{self.seed}-{step}-{j}")
            ids = self.seqs[rng.randrange(len(self.seqs))]
            kind = rng.randrange(4)
            if step < self.warmup:
                s, t = [V - 99] + ids, ids
            elif kind == 0:
                s, t = span_corrupt(ids, rng, V)
            elif kind == 1:
                cut = rng.randint(1, len(ids) - 1)
                s, t = [V - 100] + ids[:cut], ids[cut:]
            elif kind == 2:
                s, t = [V - 99] + span_corrupt(ids, rng, V)[0], ids
            else:
                absent = [q for q in self.seqs[rng.randrange(len(self.seqs))] if q not in ids]
                q = rng.choice(absent) if absent and rng.random() < 0.5 else rng.choice(ids[:-1])
                s, t = [V - 98, q] + ids, [ids[ids.index(q) + 1] if q in ids else V - 97]
            src.append(s + [1])
            tgt.append(t + [1])
        out = {}
        out["input_ids"], out["attention_mask"] = data.pad(src)
        out["labels"], _ = data.pad(tgt, value=-100)
        return out


def tk_model_dir(cfg: Config) -> Path:
    return Path(cfg.tk_model) if cfg.tk_model else stage_dirs(cfg)["tk"]


def on_tk(cfg: Config) -> bool:
    """Whether this teachers run sits on the tk model (per task/category, as the paper) or on the base."""
    return cfg.group != "all" and cfg.teacher_base == "tk"


def run_tk(cfg: Config, device):
    """Tk-Instruct, in miniature: every base weight finetuned on the training tasks' full prompts."""
    d = stage_dirs(cfg)["tk"]
    t5, tok, mdir = load_base(cfg, device)
    t5.requires_grad_(True)
    b = batcher(cfg, task_examples(cfg, "train"), tok)
    d.mkdir(parents=True, exist_ok=True)
    fit(cfg, "tk", d, BaseObjective(t5, "prompt"), b, device)
    if int(os.environ.get("RANK", "0")) == 0:
        t5.save_pretrained(d)
        shutil.copy(tok.path, d / "spiece.model")
        write_stage_info(d, stage="tk", base_model=str(mdir), config=asdict(cfg))


def run_teachers(cfg: Config, device):
    d = teachers_dir(cfg)
    t5, tok, mdir = load_base(cfg, device, tk_model_dir(cfg) if on_tk(cfg) else None)
    examples = task_examples(cfg, "train")
    b = batcher(cfg, examples, tok)
    keys = {"task": b.tasks, "all": ["all"],
            "category": sorted({e.category for e in examples})}[cfg.group]
    task_key = {e.task: (e.task if cfg.group == "task" else e.category if cfg.group == "category" else "all")
                for e in examples}
    key_of_task = torch.tensor([keys.index(task_key[t]) for t in b.tasks], device=device)
    targets = target_paths(t5, tuple(cfg.modules.split(",")))
    torch.manual_seed(cfg.seed)
    bank = LoRABank(t5, targets, len(keys), cfg.rank, cfg.alpha).to(device)
    d.mkdir(parents=True, exist_ok=True)
    fit(cfg, "teachers", d, TeacherObjective(t5, bank, key_of_task, cfg.teacher_input == "prompt"), b, device)
    if int(os.environ.get("RANK", "0")) == 0:
        save_safetensors(bank.state_dict(), d / "bank.safetensors")
        write_stage_info(d, stage="teachers", keys=keys, group=cfg.group, input=cfg.teacher_input,
                         targets=targets, rank=cfg.rank, alpha=cfg.alpha, base_model=str(mdir), on_tk=on_tk(cfg),
                         config=asdict(cfg))


def load_teachers(d: Path, t5: T5, tasks: list[str], categories: dict[str, str], device):
    """A trained bank and, for each task of `tasks`, the index of its key; refuses a bank for other tasks."""
    bank, info = load_bank(d, t5, device)
    key = {"task": lambda t: t, "category": lambda t: categories[t], "all": lambda t: "all"}[info["group"]]
    missing = sorted({key(t) for t in tasks} - set(info["keys"]))
    if missing:
        raise SystemExit(f"{d}: the teacher bank has no LoRA for {missing[:5]} ({len(missing)} in all): it was "
                         "trained for other tasks; rerun --stage teachers")
    return bank, torch.tensor([info["keys"].index(key(t)) for t in tasks], device=device), info


def tagi_config(cfg: Config) -> TAGIConfig:
    return TAGIConfig(rank=cfg.rank, alpha=cfg.alpha, modules=tuple(cfg.modules.split(",")), hidden=cfg.hidden,
                      fusion=cfg.fusion, ce_weight=cfg.ce_weight, kl_weight=cfg.kl_weight,
                      ins_weight=cfg.ins_weight, temperature=cfg.temperature, ins_mode=cfg.ins_mode,
                      kl_t_squared=cfg.kl_t_squared, kl_positions=cfg.kl_positions, pooling=cfg.pooling,
                      init=cfg.init, student_input=cfg.student_input, reader=cfg.reader)


def load_tk(cfg: Config, device, wanted: bool = True) -> T5 | None:
    """The tk model (the Tk-Instruct analog, or --tk_model), loaded once per stage that reads it; None if not
    wanted."""
    return load_base(cfg, device, tk_model_dir(cfg))[0] if wanted else None


def run_pretrain(cfg: Config, device):
    d = stage_dirs(cfg)["pretrain"]
    t5, tok, mdir = load_base(cfg, device)
    if cfg.text:
        texts = data.iter_texts([p for p in cfg.text.split(",")])
    else:  # the training tasks' own text, as plain text: definitions, examples and instances
        texts = [data.sni_prompt(t, x["input"]) + x["output"][0]
                 for t in data.load_sni(cfg.data_dir, part="train", max_instances=cfg.max_instances,
                                        per_category=cfg.tasks_per_category)
                 for x in t["Instances"]] if cfg.data != "p3" else \
            [e.prompt + " " + e.target for e in task_examples(cfg, "train")]
    b = data.PretrainBatcher.from_texts(texts, tok, max_docs=200_000, batch_size=cfg.batch_size, seed=cfg.seed,
                                        max_a=cfg.max_instruction_len - 1, max_b=cfg.max_source_len - 1,
                                        max_c=cfg.max_target_len - 1)
    torch.manual_seed(cfg.seed)
    tagi = TAGI(t5, replace(tagi_config(cfg), kl_weight=0.0, ins_weight=0.0, ce_weight=1.0),
                load_tk(cfg, device, cfg.reader == "tk"))
    d.mkdir(parents=True, exist_ok=True)
    fit(cfg, "pretrain", d, TAGIObjective(tagi.to(device), None, None), b, device)
    if int(os.environ.get("RANK", "0")) == 0:
        tagi.save(d, base_model=str(mdir.resolve()), tokenizer=str(Path(tok.path).resolve()),
                  reader_model=str(tk_model_dir(cfg).resolve()))
        write_stage_info(d, stage="pretrain", config=asdict(cfg))


def run_finetune(cfg: Config, device):
    d = folder(cfg, "finetune")
    t5, tok, mdir = load_base(cfg, device)
    examples = task_examples(cfg, "train")
    b = batcher(cfg, examples, tok)
    tk = load_tk(cfg, device, cfg.reader == "tk" or bool(cfg.kl_weight and cfg.kl_teacher == "tk"))
    teachers, key_of_task, kl_t5 = None, None, tk if cfg.kl_weight and cfg.kl_teacher == "tk" else None
    if needs_bank(cfg):
        cats = {e.task: e.category for e in examples}
        teachers, key_of_task, info = load_teachers(teachers_dir(cfg, teacher_group(cfg.group), "prompt"), t5, b.tasks,
                                                    cats, device)
        if cfg.kl_weight and cfg.kl_teacher == "lora":
            kl_t5 = load_base(cfg, device, Path(info["base_model"]))[0]
    torch.manual_seed(cfg.seed)
    tagi = TAGI(t5, tagi_config(cfg), tk if cfg.reader == "tk" else None)
    tagi.to(device)
    if not cfg.no_pretrain:
        p = stage_dirs(cfg)["pretrain"]
        read_stage_info(p, "pretrain")
        sd = load_safetensors(p / "tagi.safetensors")
        if {k: v.shape for k, v in sd.items()} != {k: v.shape for k, v in tagi.trainable_state_dict().items()}:
            raise SystemExit(f"{p / 'tagi.safetensors'}: the pretrained hypernetwork has another shape than this "
                             "finetune run asks for (rank, modules, hidden or fusion differ)")
        tagi.load_state_dict(sd, strict=False)
    d.mkdir(parents=True, exist_ok=True)
    fit(cfg, "finetune", d, TAGIObjective(tagi, teachers, key_of_task, kl_t5, cfg.kl_teacher == "lora"), b, device)
    if int(os.environ.get("RANK", "0")) == 0:
        tagi.save(d, base_model=str(mdir.resolve()), tokenizer=str(Path(tok.path).resolve()),
                  reader_model=str(tk_model_dir(cfg).resolve()))
        write_stage_info(d, stage="finetune", config=asdict(cfg))


# ----------------------------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None) -> Config:
    """Every Config field is a flag; its help is the comment beside the field."""
    notes = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(Config), re.M))
    ap = data.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        help = f"{notes.get(f.name, '')} (default: {f.default!r})"
        if f.type in ("bool", bool):
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help)
            continue
        typ, valid = {"int": int, "float": float, "str": str}[str(f.type)], f.metadata.get("valid", "")
        kw = {"choices": valid.split("|")} if "|" in valid else {"type": data.bounded(typ, valid)} if valid else {}
        ap.add_argument(f"--{f.name}", **{"type": typ, "default": f.default, "help": help, **kw})
    args = vars(ap.parse_args(argv))
    given = {a[2:].split("=")[0].removeprefix("no-") for a in (sys.argv[1:] if argv is None else argv)
             if str(a).startswith("--")}
    return Config(**{**args, **{k: v for k, v in RECIPES.get(args["recipe"], {}).items() if k not in given}})


def needs_bank(cfg: Config) -> bool:
    """Whether finetuning needs the teacher LoRAs: for L_ins, or for L_kl when its teacher is a LoRA."""
    return bool(cfg.ins_weight or (cfg.kl_weight and cfg.kl_teacher == "lora"))


def needs_tk(cfg: Config, stage: str) -> bool:
    """Whether `stage` reads the tk model: teachers that sit on it; a tk reader of the instruction (pretrain,
    finetune); finetuning's L_kl teacher, or the teacher LoRAs it needs when they sit on tk."""
    if stage == "teachers":
        return on_tk(cfg)
    return cfg.reader == "tk" or (stage == "finetune" and bool(
        (cfg.kl_weight and cfg.kl_teacher == "tk") or (cfg.teacher_base == "tk" and needs_bank(cfg))))


def folder(cfg: Config, stage: str) -> Path:
    """Where `stage` run with cfg writes: <out>/tk, <out>/teachers-<group>[-instance], <out>/<name or finetune>."""
    if stage == "teachers":
        return teachers_dir(cfg)
    return Path(cfg.out) / (cfg.name or "finetune") if stage == "finetune" else stage_dirs(cfg)[stage]


def prerequisites(cfg: Config, stage: str) -> list[tuple[str, Config]]:
    """The earlier stages `stage` reads, as (stage, its config): the suite's base only when none is committed."""
    out = []
    if stage != "base" and cfg.data == "suite" and not cfg.model and not (SUITE_BASE / "model.safetensors").exists():
        out.append(("base", cfg))
    if stage in ("teachers", "pretrain", "finetune") and needs_tk(cfg, stage) and not cfg.tk_model:
        out.append(("tk", replace(cfg, name="")))
    if stage == "finetune" and not cfg.no_pretrain:
        out.append(("pretrain", replace(cfg, name="")))
    if stage == "finetune" and needs_bank(cfg):
        out.append(("teachers", replace(cfg, name="", group=teacher_group(cfg.group), teacher_input="prompt")))
    return out


def trained(cfg: Config, stage: str) -> bool:
    """Whether folder(cfg, stage) already holds this stage, trained to the end with these very settings."""
    f = folder(cfg, stage) / "stage.json"
    if not f.is_file():
        return False
    ignore = ("stage", "resume", "log_every", "save_every")
    saved, now = json.loads(f.read_text()).get("config", {}), asdict(stage_defaults(cfg, stage))
    return all(saved.get(k) == v for k, v in now.items() if k not in ignore)


def run(cfg: Config, stage: str, device):
    """Run one stage (into folder(cfg, stage)); run_stages has built what it needs first."""
    c = stage_defaults(cfg, stage)
    say(f"[{folder(c, stage).name}] {json.dumps({k: v for k, v in asdict(c).items()})}")
    t0 = time.time()
    {"base": run_base, "tk": run_tk, "teachers": run_teachers, "pretrain": run_pretrain,
     "finetune": run_finetune}[stage](c, device)
    say(f"[{folder(c, stage).name}] done in {time.time() - t0:.0f}s")


def run_stages(jobs: list[tuple[str, Config]], device, rerun: bool = False):
    """Train each (stage, config) of jobs unless already trained with the same settings (rerun: even then), after
    the stages they need that are missing."""
    todo: dict[Path, tuple[str, Config]] = {}

    def add(stage, c, wanted):
        for need, nc in prerequisites(c, stage):
            missing = not (folder(nc, need) / "stage.json").exists()
            if missing and folder(nc, need) not in todo:
                say(f"[{folder(c, stage).name}] needs the {need} stage, which is missing: building it first")
            add(need, nc, missing)
        if wanted and folder(c, stage) not in todo:
            todo[folder(c, stage)] = (stage, c)
    for stage, c in jobs:
        add(stage, c, rerun or not trained(c, stage))
        if folder(c, stage) not in todo:
            say(f"[{folder(c, stage).name}] already trained with these settings: kept")
    for stage, c in todo.values():
        run(c, stage, device)


def pipeline(cfg: Config, ablations: bool = False) -> list[tuple[str, Config]]:
    """The zero-argument pipeline: the tk model, the baselines' LoRAs, pretraining, TAGI and the HINT-like row;
    with ablations, also Table 4's finetune variants (evaluate.ABLATIONS), each in <out>/finetune-<name>."""
    import evaluate
    jobs = [("tk", cfg)] + [("pretrain", cfg)] * (not cfg.no_pretrain) + [
        ("teachers", cfg), ("teachers", replace(cfg, group="all")),
        ("teachers", replace(cfg, group="all", teacher_input="instance"))]
    variants = {"tagi": {}, **evaluate.VARIANTS, **(evaluate.ABLATIONS if ablations else {})}
    return jobs + [("finetune", replace(cfg, name=evaluate.method_dir(Path(cfg.out), n).name, **kw))
                   for n, kw in variants.items()]


def smoke_test(evaluation: bool = True):
    """Every piece of TAGI once, on a toy T5 and toy data, in the order ASSIGNMENTS.md teaches them (milliseconds):
    a piece that is broken, or still to be written in a classroom handout, stops the run here and now rather than
    minutes into it. evaluation: also evaluate.py's. The global RNG state is left as it was."""
    import types
    from hypernet import masked_mean
    from model import attention, lora, relative_position_bucket
    from tagi import kl_loss, lora_distance
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        t5 = T5(T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_decoder_layers=1, num_heads=2,
                         dropout_rate=0.0)).eval()
        x, ids, mask = torch.randn(2, 3, 8), torch.tensor([[3, 4, 1], [5, 1, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
        heads = x.view(2, 3, 2, 4).transpose(1, 2)  # (N, H, L, K)
        t5.encoder.final_layer_norm(x)
        relative_position_bucket(torch.arange(-3, 4), True, 32, 128)
        attention(heads, heads, heads, torch.zeros(1, 1, 3, 3))
        lora(x, torch.randn(1, 2, 8), torch.randn(1, 8, 2))
        t5.generate(ids, mask, max_new_tokens=2)
        masked_mean(x, mask)
        tagi = TAGI(t5, TAGIConfig(rank=2, alpha=2.0, hidden=8, ins_weight=1.0))
        gen = tagi.hypernet(x, mask)
        tagi.student_memory(ids, mask, x, mask, gen)
        labels = ids.masked_fill(mask == 0, -100)
        ce_loss(x, labels)
        kl_loss(x, x, labels, 2.0)
        lora_distance(*gen[tagi.targets[0]], *gen[tagi.targets[0]])
        batch = {"input_ids": ids, "attention_mask": mask, "instruction_ids": ids, "instruction_mask": mask,
                 "prompt_ids": ids, "prompt_mask": mask, "labels": labels, "task_idx": torch.tensor([0, 1])}
        tagi.loss(batch, LoRABank(t5, tagi.targets, 1, 2, 2.0), torch.tensor([0, 0]))
        task = {"name": "t", "Definition": ["Say b"], "Positive Examples": [{"input": "a", "output": "b"}],
                "Instances": [{"input": "a", "output": ["b"]}]}
        data.sni_examples([task], num_pos=1)
        data.sni_prompt(task, "a")
        data.split_abc(list(range(10)), random.Random(0))
        get_lr(0, 10, 1.0, 0.1)
        if not evaluation:
            return
        import evaluate  # deferred, as in main
        evaluate.rank_classification(lambda b: b["labels"].clamp(min=0).sum(1).float(), [
            {"inputs": "a", "choices": ["b", "c"], "answer": 0, "task": "t", "prompt": "p"}],
            types.SimpleNamespace(encode=lambda text: [3, 1]), "cpu")


def main(argv=None):
    cfg = resolve(parse_args(argv))
    check_inputs(cfg)  # all of the command line is checked before anything is written
    smoke_test(cfg.stage in ("all", "ablations"))  # a broken or missing piece (ASSIGNMENTS.md) stops the run now
    rank, world, device = setup_distributed(cfg.device)
    if cfg.data == "suite":
        if rank == 0:
            data.ensure_suite(cfg.data_dir, seed=0)
        if world > 1:
            dist.barrier()
    torch.manual_seed(cfg.seed)
    if device.type == "cpu":  # e.g. the backward of a gather with repeated indices sums in thread order otherwise
        torch.use_deterministic_algorithms(True)
    t0 = time.time()
    if cfg.stage in ("all", "ablations"):
        import evaluate  # the final table (deferred: evaluate.py needs rouge_score, training does not)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)  # the command line, for evaluate.py --seeds / --scaling
        atomic_write_text(Path(cfg.out) / "pipeline.json", json.dumps(
            {"argv": [str(a) for a in (sys.argv[1:] if argv is None else argv)]}) + "\n")
        run_stages(pipeline(cfg, cfg.stage == "ablations"), device)
    else:
        run_stages([(cfg.stage, cfg)], device, rerun=True)
    if cfg.stage in ("all", "ablations") and rank == 0:
        t5, tok, _ = load_base(cfg, device)
        evaluate.compare(cfg, t5, tok, device, ablations=cfg.stage == "ablations")
        say(f"pipeline done in {time.time() - t0:.0f}s")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    data.cli(main)
