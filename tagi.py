"""TAGI: a frozen T5, a hypernetwork that writes its LoRA adapters from the task instruction, instruction fusion,
and the three distillation losses (Liao et al., 2024, §3, Eqs. 1-6).

    student:  T5(instance only ; adapters = H(instruction) ; decoder also reads the instruction)   -- trainable: H, fusion
    teacher:  T5(full Tk-Instruct prompt ; the task's own LoRA, trained on instances)              -- frozen
    L = L_ce + λ1·L_kl + λ2·L_ins                                                                  (Eq. 6)

Also: adapter export/import in Hugging Face PEFT's format, and a CLI that turns an instruction into a PEFT adapter:
    python tagi.py adapter --checkpoint runs/default/finetune --instruction "Definition: ..." --out my_adapter

Shapes: N examples, U distinct tasks in a batch, S source len, s instruction len, T target len, D d_model, V vocab.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hypernet import HyperNetwork, target_paths
from model import Attention, RMSNorm, T5, atomic_write_text, load_safetensors, save_safetensors, shift_right, \
    token_nll, wide


@dataclass
class TAGIConfig:
    rank: int = 32                      # LoRA rank r (paper 32; official scripts 16)
    alpha: float = 32.0                 # LoRA α; the update is (α/r)·B·A
    modules: tuple = ("q", "v")         # which Linears to adapt (q, v of every attention in the paper)
    hidden: int = 256                   # hypernetwork width
    fusion: str = "concat"              # "concat" (official code) | "encoder" (paper Eq. 1) | "none" (ablation)
    ce_weight: float = 1.0              # Eq. 6 weights; 0 switches a term off
    kl_weight: float = 1.0
    ins_weight: float = 0.0
    temperature: float = 2.0            # T of Eq. 4
    ins_mode: str = "delta"             # "delta": ||ΔW_gen - ΔW_teacher||_F^2, "params": factor MSE (Eq. 5)


# ----------------------------------------------------------------------------------------------------------------
# Fusion (Eq. 1)


class FusionLayer(nn.Module):
    """Cross-attention from the instance's encoder states to the instruction states I_x, added as a residual
    sub-layer after each encoder block's self-attention. Like the hypernetwork heads, it is itself minus a frozen
    copy of itself fed the same inputs: it adds exactly 0 at step 0 (and passes no gradient to x or ctx then), and
    its backward pass is the exact gradient of its forward."""

    def __init__(self, t5: T5):
        super().__init__()
        cfg = replace(t5.config, dropout_rate=0.0)  # no dropout: it would break the exact cancellation
        self.norm, self.attn = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon), Attention(cfg, has_bias=False)
        self.frozen = copy.deepcopy(nn.ModuleList([self.norm, self.attn])).requires_grad_(False)

    def forward(self, x, ctx, ctx_bias):
        """x (N, S, D) attends to ctx (N, s, D) under ctx_bias (N, 1, 1, s) -> (N, S, D)."""
        norm0, attn0 = self.frozen
        return self.attn(self.norm(x), ctx_bias, kv=ctx) - attn0(norm0(x), ctx_bias, kv=ctx)


def additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """(N, s) of 1/0 -> (N, 1, 1, s) of 0 / -inf (finite)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


# ----------------------------------------------------------------------------------------------------------------
# Losses (Eqs. 3-5), each its own function


def ce_loss(logits, labels, n_tokens=None):
    """Eq. 3: mean token cross-entropy over real target tokens. logits (N, T, V), labels (N, T) with -100.
    n_tokens: the divisor when this batch is a shard of a larger one (default: its own real tokens)."""
    return token_nll(logits, labels).sum() / ((labels != -100).sum().clamp(min=1) if n_tokens is None else n_tokens)


def kl_loss(student, teacher, labels, T: float, n_tokens=None):
    """Eq. 4: T^2 · KL(softmax(z_t/T) || softmax(z_s/T)) per target token, averaged over real tokens only.
    student, teacher (N, T, V) logits on the same target positions; labels (N, T) marks padding with -100."""
    keep = labels != -100  # select real tokens first: whatever sits at padding cannot leak in (not even NaN)
    log_s = F.log_softmax(wide(student[keep]) / T, -1)  # (n, V)
    log_t = F.log_softmax(wide(teacher[keep]) / T, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (n,)
    return T * T * kl.sum() / (keep.sum().clamp(min=1) if n_tokens is None else n_tokens)


def lora_distance(A1, B1, A2, B2):
    """||B1 A1 - B2 A2||_F^2 per example, from r x r Gram matrices, never forming an (out, in) matrix:
    tr(B1ᵀB1·A1A1ᵀ) - 2 tr(B1ᵀB2·A2A1ᵀ) + tr(B2ᵀB2·A2A2ᵀ). A (N, r, in), B (N, out, r) -> (N,)."""
    def tr(Ba, Bb, Aa, Ab):  # tr(Baᵀ Bb · Ab Aaᵀ) = sum((BaᵀBb) ⊙ (Aa Abᵀ))
        return ((Ba.mT @ Bb) * (Aa @ Ab.mT)).sum((1, 2))
    A1, B1, A2, B2 = wide(A1), wide(B1), wide(A2), wide(B2)
    return (tr(B1, B1, A1, A1) - 2 * tr(B1, B2, A1, A2) + tr(B2, B2, A2, A2)).clamp(min=0)


def ins_loss(gen: dict, teacher: dict, mode: str, rank: int):
    """Eq. 5: distance between generated adapters and the teacher LoRA, summed over targets, per task (U,).
    gen/teacher: {path: (A (U, r, in), B (U, out, r))} with α/r already folded into B (so scales match).
    "params": factor MSE between the hypernetwork's trainable rank-r half and the teacher's factors (the official
    code pairs A with B transposed; we do not). "delta": the gauge-invariant distance between the updates."""
    total = 0.0
    for p, (A, B) in gen.items():
        At, Bt = teacher[p]
        if mode == "delta":
            total = total + lora_distance(A, B, At, Bt)
        elif mode == "params":
            total = total + (A[:, :rank].float() - At.float()).pow(2).mean((1, 2)) + \
                (B[:, :, :rank].float() - Bt.float()).pow(2).mean((1, 2))
        else:
            raise ValueError(f"ins_mode must be 'delta' or 'params', not {mode!r}")
    return total


# ----------------------------------------------------------------------------------------------------------------
# The model


class TAGI(nn.Module):
    def __init__(self, t5: T5, cfg: TAGIConfig = TAGIConfig()):
        super().__init__()
        if cfg.fusion not in ("concat", "encoder", "none"):
            raise ValueError(f"fusion must be 'concat', 'encoder' or 'none', not {cfg.fusion!r}")
        self.cfg, self.t5 = cfg, t5.requires_grad_(False)
        self.targets = target_paths(t5, tuple(cfg.modules))
        self.hypernet = HyperNetwork(t5, self.targets, cfg.rank, cfg.alpha, cfg.hidden)
        self.fusion = nn.ModuleList([FusionLayer(t5) for _ in t5.encoder.block]) if cfg.fusion == "encoder" \
            else None

    def train(self, mode=True):  # the frozen T5 stays in eval mode: no dropout noise in the teacher or the base
        super().train(mode)
        self.t5.eval()
        return self

    def trainable_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("t5.")}

    @torch.no_grad()
    def encode_instruction(self, ids, mask):
        """I_x: the instruction read by the student's own frozen encoder, no adapters. (U, s) -> (U, s, D)."""
        return self.t5.encode(ids, mask)

    def task_adapters(self, instruction_ids, instruction_mask):
        """Per distinct task: (I_x, mask, adapters {path: (A (U, 2r, in), B (U, out, 2r))}). Eq. 2."""
        states = self.encode_instruction(instruction_ids, instruction_mask)
        return states, instruction_mask, self.hypernet(states, instruction_mask)

    def student_memory(self, input_ids, attention_mask, states, smask, adapters):
        """Encode the instance with adapters (and encoder fusion); return what the decoder cross-attends to.
        Eq. 1: concat / encoder modes put the instruction states beside the instance states: [I_x ; enc(x)]."""
        fuse = None
        if self.fusion is not None:
            bias = additive_mask(smask, states.dtype)
            fuse = [lambda x, f=f: f(x, states, bias) for f in self.fusion]
        enc = self.t5.encode(input_ids, attention_mask, adapters, fuse)  # (N, S, D)
        if self.cfg.fusion == "none":
            return enc, attention_mask
        return torch.cat([states.to(enc.dtype), enc], 1), torch.cat([smask, attention_mask], 1)  # (N, s+S, D)

    def read(self, batch):
        """Adapters once per distinct task of the batch (Eq. 2), gathered per example, and the instance encoded
        with them (Eq. 1). Returns (memory, its mask, per-example adapters, per-task adapters, tasks (U,), inv (N,))."""
        tasks, first, inv = unique_first(batch["task_idx"])
        states, smask, gen = self.task_adapters(batch["instruction_ids"][first], batch["instruction_mask"][first])
        per_ex = {p: (A[inv], B[inv]) for p, (A, B) in gen.items()}
        mem, mmask = self.student_memory(batch["input_ids"], batch["attention_mask"], states[inv], smask[inv], per_ex)
        return mem, mmask, per_ex, gen, tasks, inv

    def student(self, batch, return_inverse=False):
        """The student on instance-only inputs. Returns (logits (N, T, V), generated adapters per distinct task,
        task index (U,)[, example -> task (N,)])."""
        mem, mmask, per_ex, gen, tasks, inv = self.read(batch)
        logits = self.t5.decode(shift_right(batch["labels"]), mem, mmask, per_ex)
        return (logits, gen, tasks, inv) if return_inverse else (logits, gen, tasks)

    def loss(self, batch, teachers=None, teacher_of_task=None, n_tokens=None, n_examples=None):
        """Eq. 6. teachers: a LoRABank; teacher_of_task: (num_tasks,) long tensor mapping task_idx -> bank key.
        Returns every term (so each can be logged) and "loss", the weighted sum of the terms switched on.
        n_tokens / n_examples: divisors when the batch is a shard of a larger one (DDP, accumulation)."""
        c = self.cfg
        logits, gen, tasks, inv = self.student(batch, return_inverse=True)
        out = {"ce": ce_loss(logits, batch["labels"], n_tokens)}
        if (c.kl_weight or c.ins_weight) and teachers is None:
            raise ValueError("kl_weight / ins_weight need a teacher bank (train.py --stage teachers)")
        if c.kl_weight:
            with torch.no_grad():
                key = teacher_of_task[batch["task_idx"]]
                t_logits = self.t5(batch["prompt_ids"], batch["prompt_mask"], labels=batch["labels"],
                                   adapters=teachers(key)).logits
            out["kl"] = kl_loss(logits, t_logits, batch["labels"], c.temperature, n_tokens)
        if c.ins_weight:
            with torch.no_grad():
                t_ad = teachers(teacher_of_task[tasks])
            per_task = ins_loss(gen, t_ad, c.ins_mode, c.rank)  # (U,), weighted by each task's examples
            out["ins"] = per_task[inv].sum() / (len(inv) if n_examples is None else n_examples)
        out["loss"] = c.ce_weight * out["ce"] + c.kl_weight * out.get("kl", 0.0) + c.ins_weight * out.get("ins", 0.0)
        return out

    @torch.no_grad()
    def generate(self, batch, max_new_tokens=128):
        mem, mmask, per_ex, *_ = self.read(batch)
        return self.t5.generate(attention_mask=mmask, encoder_hidden_states=mem, adapters=per_ex,
                                max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self, out_dir, **info):
        """tagi.safetensors (hypernetwork + fusion, with their frozen offsets) + tagi.json (config and info)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        sd = self.trainable_state_dict()
        save_safetensors(sd, out_dir / "tagi.safetensors")
        atomic_write_text(out_dir / "tagi.json", json.dumps({"config": asdict(self.cfg), **info}, indent=2) + "\n")

    @classmethod
    def load(cls, ckpt_dir, t5: T5) -> "TAGI":
        ckpt_dir = Path(ckpt_dir)
        meta = json.loads((ckpt_dir / "tagi.json").read_text())
        cfg = TAGIConfig(**{**meta["config"], "modules": tuple(meta["config"]["modules"])})
        model = cls(t5, cfg)
        sd = load_safetensors(ckpt_dir / "tagi.safetensors")
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("t5.")]
        if missing or unexpected:
            raise ValueError(f"{ckpt_dir / 'tagi.safetensors'}: not a TAGI checkpoint of this configuration: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model


def unique_first(task_idx: torch.Tensor):
    """Distinct tasks of a batch: (tasks (U,), index of each task's first example (U,), example -> task (N,))."""
    tasks, inv = torch.unique(task_idx, return_inverse=True)
    first = torch.full_like(tasks, task_idx.numel()).scatter_reduce(
        0, inv, torch.arange(task_idx.numel(), device=task_idx.device), "amin")
    return tasks, first, inv


# ----------------------------------------------------------------------------------------------------------------
# PEFT interchange: adapter_config.json + adapter_model.safetensors


def export_peft(adapters: dict, out_dir, base_model: str = "") -> Path:
    """Write one adapter set {path: (A (r, in) | (1, r, in), B (out, r) | (1, out, r))}, α/r folded into B, as a PEFT
    LoRA directory. lora_alpha = r, so PEFT's scale is 1 and it computes exactly B·A."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, ranks = {}, set()
    for path, (A, B) in adapters.items():
        A, B = (A[0], B[0]) if A.dim() == 3 else (A, B)
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"export_peft: adapter {path!r} holds a batch of factors; export one task at a time")
        tensors[f"base_model.model.{path}.lora_A.weight"] = A.detach().float().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = B.detach().float().contiguous()
        ranks.add(A.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"export_peft: every module needs the same rank, got {sorted(ranks)}")
    r = ranks.pop()
    config = {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": str(base_model),
              "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted(adapters), "inference_mode": True, "use_rslora": False}
    save_safetensors(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


def load_peft(adapter_dir) -> dict:
    """Read a PEFT LoRA directory into {path: (A (1, r, in), B (1, out, r))} with PEFT's scale folded into B."""
    adapter_dir = Path(adapter_dir)
    cfg_path, st_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_path}: cannot read adapter config ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: field 'peft_type' is {cfg.get('peft_type')!r}, expected 'LORA'")
    for k in ("r", "lora_alpha"):
        if not isinstance(cfg.get(k), (int, float)):
            raise ValueError(f"{cfg_path}: field {k!r} is missing or not a number")
    factors: dict[str, dict] = {}
    for key, t in load_safetensors(st_path).items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{st_path}: tensor {key!r} is not a PEFT LoRA factor name")
        factors.setdefault(m.group(1), {})[m.group(2)] = t.float()
    out = {}
    for path, f in factors.items():
        if set(f) != {"A", "B"}:
            raise ValueError(f"{st_path}: module {path!r} lacks lora_{'A' if 'A' not in f else 'B'}")
        r = f["A"].shape[0]
        alpha = next((v for k, v in (cfg.get("alpha_pattern") or {}).items() if re.match(rf"(.*\.)?({k})$", path)),
                     cfg["lora_alpha"])
        scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        out[path] = (f["A"][None], (f["B"] * scale)[None])
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLI: instruction -> PEFT adapter


def main(argv=None):
    ap = argparse.ArgumentParser(description="TAGI utilities")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("adapter", help="turn an instruction into a PEFT LoRA adapter directory")
    a.add_argument("--checkpoint", required=True, help="a pretrain/finetune stage directory written by train.py")
    a.add_argument("--instruction", required=True, help="the task instruction (text, or @file to read it)")
    a.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from data import Tokenizer  # the CLI alone needs the tokenizer (tagi.py itself imports nothing upward)
    ckpt = Path(args.checkpoint)
    info = json.loads((ckpt / "tagi.json").read_text())
    t5 = T5.from_pretrained(info["base_model"]).eval()
    model = TAGI.load(ckpt, t5).eval()
    text = Path(args.instruction[1:]).read_text() if args.instruction.startswith("@") else args.instruction
    ids = torch.tensor([Tokenizer(info["tokenizer"]).encode(text)])
    with torch.no_grad():
        _, _, gen = model.task_adapters(ids, torch.ones_like(ids))
    out = export_peft(gen, args.out, base_model=info["base_model"])
    print(f"wrote {out}: {len(gen)} modules, rank {next(iter(gen.values()))[0].shape[1]}")


if __name__ == "__main__":
    main()
