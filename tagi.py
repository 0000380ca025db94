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

import copy
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hypernet import HyperNetwork, LoRABank, target_paths
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
    temperature: float = 2.0            # T of L_kl (Eq. 5; the paper has none, the official code 3)
    kl_t_squared: bool = True           # L_kl scaled by T² (ours, Hinton et al.); the paper and official code: no
    kl_positions: str = "tokens"        # L_kl averaged over "tokens" (real targets) | "all" positions (official)
    student_input: str = "instance"     # the student encoder reads the "instance" | the teacher's "prompt"
    reader: str = "base"                # the instruction is read by the "base" encoder (paper) | "tk" (official)
    ins_mode: str = "delta"             # L_ins (Eq. 4): "delta" ||ΔW_gen - ΔW_t||_F^2 | "params" | "official"
    pooling: str = "mean"               # task vector: "mean" of I_x over real tokens | "first_last" (official code)
    init: str = "offset"                # heads minus a frozen copy (ΔW = 0, rank 2r) | "official": N(0, 1e-7), rank r


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
    """Eq. 3 (L_pred): mean token cross-entropy over real target tokens. logits (N, T, V), labels (N, T) with -100.
    n_tokens: the divisor when this batch is a shard of a larger one (default: its own real tokens).
    L_ce = sum over real (n, t) of -log softmax(logits[n, t])[labels[n, t]], divided by that count (at least 1,
    so a batch without a real token gives 0). Hint: model.token_nll gives the per-token NLL, 0 at -100."""
    return token_nll(logits, labels).sum() / ((labels != -100).sum().clamp(min=1) if n_tokens is None else n_tokens)


def kl_loss(student, teacher, labels, T: float, n_tokens=None, t_squared: bool = True, positions: str = "tokens"):
    """Eq. 5 (L_kl): T^2 · KL(softmax(z_t/T) || softmax(z_s/T)) per target token, averaged over real tokens only.
    student, teacher (N, T, V) logits on the same target positions; labels (N, T) marks padding with -100.
    With p = softmax(z / T): KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v)), the teacher's distribution
    as the reference. Select the real tokens before the softmax, so that nothing at padding (not even NaN)
    reaches the result; compute in at least float32 (`wide`); divide the sum over tokens as ce_loss does.
    Switches (defaults: ours): t_squared=False drops T² (the paper's Eq. 5 and the official code have none);
    positions="all" averages over every decoder position, padding included, as the official code's
    torch.mean does (n_tokens is then the number of positions)."""
    if positions == "all":
        keep = torch.ones_like(labels, dtype=torch.bool)
        n_tokens = labels.numel() if n_tokens is None else n_tokens
    else:
        keep = labels != -100  # select real tokens first: whatever sits at padding cannot leak in (not even NaN)
    log_s = F.log_softmax(wide(student[keep]) / T, -1)  # (n, V)
    log_t = F.log_softmax(wide(teacher[keep]) / T, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (n,)
    return (T * T if t_squared else 1.0) * kl.sum() / (keep.sum().clamp(min=1) if n_tokens is None else n_tokens)


def lora_distance(A1, B1, A2, B2):
    """||B1 A1 - B2 A2||_F^2 per example, from r x r Gram matrices, never forming an (out, in) matrix:
    tr(B1ᵀB1·A1A1ᵀ) - 2 tr(B1ᵀB2·A2A1ᵀ) + tr(B2ᵀB2·A2A2ᵀ). A (N, r, in), B (N, out, r) -> (N,).
    The two pairs may have different ranks (generated 2r, teacher r). ‖M‖²_F = tr(MᵀM), and tr(X Y) is the sum
    of X ⊙ Yᵀ, so each term costs O(r² (in + out)); compute in at least float32 (`wide`) and clamp the rounding
    below 0 to 0. Behind L_ins (Eq. 4, "delta" mode)."""
    def tr(Ba, Bb, Aa, Ab):  # tr(Baᵀ Bb · Ab Aaᵀ) = sum((BaᵀBb) ⊙ (Aa Abᵀ))
        return ((Ba.mT @ Bb) * (Aa @ Ab.mT)).sum((1, 2))
    A1, B1, A2, B2 = wide(A1), wide(B1), wide(A2), wide(B2)
    return (tr(B1, B1, A1, A1) - 2 * tr(B1, B2, A1, A2) + tr(B2, B2, A2, A2)).clamp(min=0)


def ins_loss(gen: dict, teacher: dict, mode: str, rank: int):
    """Eq. 4 (L_ins): distance between generated adapters and the teacher LoRA, per task (U,).
    gen/teacher: {path: (A (U, r, in), B (U, out, r))} with α/r already folded into B (so scales match).
    "delta": the gauge-invariant ||B A - Bt At||_F^2 between the updates, summed over targets.
    "params": MSE(A, At) + MSE(B, Bt) of the factors that are applied, summed over targets; needs equal ranks
    (init "official": rank r; TAGI refuses the offset init's 2r).
    "official": the official code's term (src/ni_trainer.py:165-226), 1000·[MSE(A_gen, B_t) + MSE(B_gen, A_t)]
    in its x·A·B orientation, where A_gen = Aᵀ (in, r) and B_gen = Bᵀ (r, out): here 1000·[MSE(Aᵀ, Bt) +
    MSE(Bᵀ, At)], averaged over targets (it stacks them). It pulls B A towards (Bt At)ᵀ, the transpose of the
    teacher's update, and needs equal ranks and in = out (q, v of T5). The official code reads the teacher's raw
    factors, ignoring PEFT's α/r = 2; our teachers have α = r, so Bt is their raw factor. rank: the configured r
    (for error messages)."""
    total = 0.0
    for p, (A, B) in gen.items():
        At, Bt = teacher[p]
        if mode == "delta":
            total = total + lora_distance(A, B, At, Bt)
        elif mode in ("params", "official"):
            for x, y in ([(A, At), (B, Bt)] if mode == "params" else [(A.mT, Bt), (B.mT, At)]):
                if x.shape != y.shape:
                    raise ValueError(f"ins_mode {mode!r}: {p}: generated factor {tuple(x.shape[1:])} vs teacher "
                                     f"{tuple(y.shape[1:])} (rank {rank}): needs equal shapes (init 'official')")
                mse = (wide(x) - wide(y)).pow(2).mean((1, 2))  # (U,)
                total = total + (mse if mode == "params" else 1000 * mse / len(gen))
        else:
            raise ValueError(f"ins_mode must be 'delta', 'params' or 'official', not {mode!r}")
    return total


def combined_loss(cfg: TAGIConfig, logits, labels, t_logits=None, gen=None, t_ad=None, inv=None, n_tokens=None,
                  n_examples=None, n_positions=None) -> dict:
    """Eq. 6: L = w_ce·L_ce + λ1·L_kl + λ2·L_ins with the weights of cfg (ce_weight, kl_weight, ins_weight); a term
    whose weight is 0 is neither computed nor returned (the paper's Table 4 ablations). logits (N, T, V) of the
    student, labels (N, T) with -100; t_logits (N, T, V) of the teacher (for L_kl, at cfg.temperature); gen / t_ad
    {path: (A (U, ·, in), B (U, out, ·))} per distinct task and inv (N,) example -> task (for L_ins, cfg.ins_mode).
    L_ins is per task (U,): weight each task by its examples in the batch (sum over examples, divide by N, or by
    n_examples for a shard); n_tokens is the L_ce / L_kl divisor for a shard. Returns {"ce", ["kl",] ["ins",]
    "loss"}: every term, so each can be logged. ins_mode "official" enters as σ(L)·L, as the official code adds it
    (ni_trainer.py:271), σ of this batch's own mean L (on a shard: that σ times the shard's share of the mean).
    L_kl compares the first min(V_student, V_teacher) logits (T5-LM files hold 32,128 rows, Tk-Instruct's 32,100), with
    cfg.kl_t_squared and cfg.kl_positions (then n_positions, not n_tokens, divides a shard)."""
    out = {"ce": ce_loss(logits, labels, n_tokens)}
    if cfg.kl_weight:
        V = min(logits.shape[-1], t_logits.shape[-1])  # Tk-Instruct files hold 32,100 rows, T5-LM's 32,128
        out["kl"] = kl_loss(logits[..., :V], t_logits[..., :V], labels, cfg.temperature,
                            n_positions if cfg.kl_positions == "all" else n_tokens, cfg.kl_t_squared, cfg.kl_positions)
    if cfg.ins_weight:
        per_task = ins_loss(gen, t_ad, cfg.ins_mode, cfg.rank)  # (U,), weighted by each task's examples
        out["ins"] = per_task[inv].sum() / (len(inv) if n_examples is None else n_examples)
    ins = out.get("ins", 0.0)
    if cfg.ins_weight and cfg.ins_mode == "official":  # official code: loss += σ(L)·L
        ins = torch.sigmoid(per_task[inv].mean()) * ins
    out["loss"] = (cfg.ce_weight * out["ce"] + cfg.kl_weight * out.get("kl", 0.0)
                   + cfg.ins_weight * ins)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The model


class TAGI(nn.Module):
    """reader: the frozen model whose encoder reads the instruction when cfg.reader is "tk" (the official code
    encodes it with the teacher, Tk-Instruct); it is not part of the checkpoint."""

    def __init__(self, t5: T5, cfg: TAGIConfig = TAGIConfig(), reader: T5 | None = None):
        super().__init__()
        if (cfg.reader == "tk") != (reader is not None):
            raise ValueError(f"TAGIConfig.reader is {cfg.reader!r}: pass the tk model as reader exactly when 'tk'")
        if cfg.fusion not in ("concat", "encoder", "none"):
            raise ValueError(f"fusion must be 'concat', 'encoder' or 'none', not {cfg.fusion!r}")
        if cfg.pooling not in ("mean", "first_last"):
            raise ValueError(f"TAGIConfig.pooling must be 'mean' or 'first_last', not {cfg.pooling!r}")
        if cfg.ins_mode not in ("delta", "params", "official"):
            raise ValueError(f"TAGIConfig.ins_mode must be 'delta', 'params' or 'official', not {cfg.ins_mode!r}")
        if cfg.ins_mode != "delta" and cfg.init == "offset":
            raise ValueError(f"TAGIConfig.ins_mode {cfg.ins_mode!r} compares factors of equal rank, but init 'offset' "
                             "generates rank 2r: use ins_mode 'delta' or init 'official'")
        self.cfg, self.t5 = cfg, t5.requires_grad_(False)
        self.reader = (reader or t5,)  # a tuple: not a submodule, so neither trained nor saved
        self.targets = target_paths(t5, tuple(cfg.modules))
        self.hypernet = HyperNetwork(t5, self.targets, cfg.rank, cfg.alpha, cfg.hidden, cfg.init)
        self.fusion = nn.ModuleList([FusionLayer(t5) for _ in t5.encoder.block]) if cfg.fusion == "encoder" \
            else None

    def train(self, mode=True):  # the frozen T5 stays in eval mode: no dropout noise in the teacher or the base
        super().train(mode)
        self.t5.eval()
        return self

    def trainable_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("t5.")}

    @torch.no_grad()
    def encode_instruction(self, ids, mask, return_first=False):
        """I_x: the instruction read by the student's own frozen encoder, no adapters. (U, s) -> (U, s, D)
        [, block 0's output (U, s, D) with return_first]."""
        return self.reader[0].encode(ids, mask, return_first=return_first)

    def task_adapters(self, instruction_ids, instruction_mask):
        """Per distinct task: (I_x, mask, adapters {path: (A (U, 2r, in), B (U, out, 2r))}; rank r under init
        "official"). Eq. 2. Pooling "first_last" is the official first_last_avg (ni_collator.py:271-287): the
        hypernetwork reads (I_x + block 0's output) averaged over ALL s positions, padding included; fusion still
        gets I_x."""
        if self.cfg.pooling == "first_last":
            states, first = self.encode_instruction(instruction_ids, instruction_mask, return_first=True)
            return states, instruction_mask, self.hypernet(states + first, torch.ones_like(instruction_mask))
        states = self.encode_instruction(instruction_ids, instruction_mask)
        return states, instruction_mask, self.hypernet(states, instruction_mask)

    def student_memory(self, input_ids, attention_mask, states, smask, adapters):
        """Encode the instance with adapters (and encoder fusion); return what the decoder cross-attends to.
        Eq. 1: concat / encoder modes put the instruction states beside the instance states: [I_x ; enc(x)].

        input_ids, attention_mask (N, S): the instance alone; states (N, s, D) = I_x and smask (N, s) of its
        task's instruction; adapters: per-example {path: (A, B)}. Fusion "encoder" (self.fusion: one FusionLayer
        per encoder block): fuse = one callable per block, x -> f(x, states, additive_mask(smask, states.dtype));
        else fuse = None. enc = self.t5.encode(input_ids, attention_mask, adapters, fuse) (N, S, D). Returns
        (memory, its mask): (enc, attention_mask) for fusion "none"; else [states ; enc] along the length axis,
        in enc's dtype (N, s + S, D), with [smask ; attention_mask] (N, s + S)."""
        fuse = None
        if self.fusion is not None:
            bias = additive_mask(smask, states.dtype)
            fuse = [lambda x, f=f: f(x, states, bias) for f in self.fusion]
        enc = self.t5.encode(input_ids, attention_mask, adapters, fuse)  # (N, S, D)
        if self.cfg.fusion == "none":
            return enc, attention_mask
        return torch.cat([states.to(enc.dtype), enc], 1), torch.cat([smask, attention_mask], 1)  # (N, s+S, D)

    def example_adapters(self, batch):
        """Adapters once per distinct task of the batch (Eq. 2), gathered per example. Returns (I_x, its mask,
        per-task adapters, tasks (U,), inv (N,): example -> task, per-example adapters)."""
        tasks, first, inv = unique_first(batch["task_idx"])
        states, smask, gen = self.task_adapters(batch["instruction_ids"][first], batch["instruction_mask"][first])
        return states, smask, gen, tasks, inv, {p: (A.index_select(0, inv), B.index_select(0, inv))  # not A[inv]:
                                                   for p, (A, B) in gen.items()}   # a 3x faster backward

    def read(self, batch):
        """example_adapters, and the instance encoded with them (Eq. 1). Returns (memory, its mask, per-example
        adapters, per-task adapters, tasks (U,), inv (N,))."""
        states, smask, gen, tasks, inv, per_ex = self.example_adapters(batch)
        mem, mmask = self.student_memory(*self.student_input(batch), states[inv], smask[inv], per_ex)
        return mem, mmask, per_ex, gen, tasks, inv

    def student_input(self, batch):
        """(ids, mask) the student's encoder reads: the instance, or the full prompt (official custom_model: under
        Def, the definition and the instance)."""
        if self.cfg.student_input == "prompt":
            return batch["prompt_ids"], batch["prompt_mask"]
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def generate_adapters_only(self, batch, max_new_tokens=128):
        """What an exported PEFT adapter computes (tagi.py adapter): the frozen T5 with each example's generated
        adapters on the student's input, but no fusion: the decoder does not see the instruction states."""
        per_ex = self.example_adapters(batch)[-1]  # no memory: generate encodes the input itself
        return self.t5.generate(*self.student_input(batch), max_new_tokens, adapters=per_ex)

    def student(self, batch, return_inverse=False):
        """The student on instance-only inputs. Returns (logits (N, T, V), generated adapters per distinct task,
        task index (U,)[, example -> task (N,)])."""
        mem, mmask, per_ex, gen, tasks, inv = self.read(batch)
        logits = self.t5.decode(shift_right(batch["labels"]), mem, mmask, per_ex)
        return (logits, gen, tasks, inv) if return_inverse else (logits, gen, tasks)

    def loss(self, batch, teachers=None, teacher_of_task=None, n_tokens=None, n_examples=None, kl_teacher=None,
             n_positions=None):
        """Eq. 6. teachers: a LoRABank; teacher_of_task: (num_tasks,) long tensor mapping task_idx -> bank key.
        kl_teacher: batch -> teacher logits (N, T, V) for L_kl, e.g. the Tk-Instruct analog on the full prompt
        (paper §4.2); default: the frozen base with each task's LoRA from `teachers`, on the full prompt.
        Returns every term (so each can be logged) and "loss", the weighted sum of the terms switched on.
        n_tokens / n_examples / n_positions: divisors when the batch is a shard of a larger one (DDP, accumulation)."""
        c = self.cfg
        logits, gen, tasks, inv = self.student(batch, return_inverse=True)
        if ((c.kl_weight and kl_teacher is None) or c.ins_weight) and teachers is None:
            raise ValueError("kl_weight / ins_weight need a teacher (train.py --stage tk / teachers)")
        t_logits = t_ad = None
        with torch.no_grad():
            if c.kl_weight:
                t_logits = kl_teacher(batch) if kl_teacher is not None else self.t5(
                    batch["prompt_ids"], batch["prompt_mask"], labels=batch["labels"],
                    adapters=teachers(teacher_of_task[batch["task_idx"]])).logits
            if c.ins_weight:
                t_ad = teachers(teacher_of_task[tasks])
        return combined_loss(c, logits, batch["labels"], t_logits, gen, t_ad, inv, n_tokens, n_examples, n_positions)

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
    def load(cls, ckpt_dir, t5: T5, reader: T5 | None = None) -> "TAGI":
        ckpt_dir = Path(ckpt_dir)
        meta = json.loads((ckpt_dir / "tagi.json").read_text())
        cfg = TAGIConfig(**{**meta["config"], "modules": tuple(meta["config"]["modules"])})
        if cfg.reader == "tk" and reader is None:  # the tk model the checkpoint was trained with
            reader = T5.from_pretrained(meta["reader_model"]).to(t5.shared.weight.device).eval()
        model = cls(t5, cfg, reader)
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
# Finished stages on disk: train.py writes them, evaluate.py and the CLI below read them (so neither imports train)


def read_stage_info(d: Path, stage: str) -> dict:
    """<d>/stage.json, written when a stage finishes; refuses a folder holding no finished `stage`."""
    f = Path(d) / "stage.json"
    if not f.is_file():
        raise ValueError(f"{f}: not found: {d} holds no finished {stage} stage (run train.py --stage {stage})")
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: unreadable file or broken JSON ({e})") from None
    if not isinstance(info, dict) or info.get("stage") != stage:
        raise ValueError(f"{f}: field 'stage' is {info.get('stage') if isinstance(info, dict) else info!r}, "
                         f"expected {stage!r}")
    return info


def load_bank(d: Path, t5: T5, device) -> tuple[LoRABank, dict]:
    """A finished teachers stage: its LoRA bank on `t5`, and its stage.json (keys, group, input, targets, ...)."""
    info = read_stage_info(d, "teachers")
    bank = LoRABank(t5, info["targets"], len(info["keys"]), info["rank"], info["alpha"]).to(device)
    bank.load_state_dict(load_safetensors(Path(d) / "bank.safetensors"))
    return bank, info


def teacher_group(group: str) -> str:
    """The teachers a finetune distils from: per task or per category (a shared "all" LoRA teaches nothing
    task-specific, so it falls back to per task)."""
    return group if group != "all" else "task"


def base_of(ckpt_dir: Path, device="cpu") -> tuple[T5, dict]:
    """The base T5 a finished pretrain/finetune stage was trained on, and its tagi.json (which names the base
    model and the tokenizer)."""
    f = Path(ckpt_dir) / "tagi.json"
    if not f.is_file():
        raise ValueError(f"{f}: not found: {ckpt_dir} is not a finished pretrain/finetune stage of train.py")
    try:
        info = json.loads(f.read_text())
        base, _ = info["base_model"], info["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: broken JSON or no field 'base_model' / 'tokenizer' ({e!r})") from None
    return T5.from_pretrained(base).to(device).eval(), info


# ----------------------------------------------------------------------------------------------------------------
# CLI: instruction -> PEFT adapter


def main(argv=None):
    from data import ArgumentParser, Tokenizer  # the CLI alone needs them (tagi.py itself imports nothing upward)
    ap = ArgumentParser(description="TAGI utilities")
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("adapter", help="turn an instruction into a PEFT LoRA adapter directory")
    a.add_argument("--checkpoint", required=True, help="a pretrain/finetune stage directory written by train.py")
    a.add_argument("--instruction", required=True, help="the task instruction (text, or @file to read it)")
    a.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SystemExit(f"--out {args.out}: is a file; pass a folder for the adapter")
    if args.instruction.startswith("@") and not Path(args.instruction[1:]).is_file():
        raise SystemExit(f"--instruction {args.instruction}: no such file (@FILE reads the instruction from FILE)")
    text = Path(args.instruction[1:]).read_text() if args.instruction.startswith("@") else args.instruction
    if not text.strip():
        raise SystemExit("--instruction: empty; pass the task's instruction (text, or @file)")
    t5, info = base_of(Path(args.checkpoint))
    model = TAGI.load(args.checkpoint, t5).eval()
    ids = torch.tensor([Tokenizer(info["tokenizer"]).encode(text)])
    with torch.no_grad():
        _, _, gen = model.task_adapters(ids, torch.ones_like(ids))
    out = export_peft(gen, args.out, base_model=info["base_model"])
    print(f"wrote {out}: {len(gen)} modules, rank {next(iter(gen.values()))[0].shape[1]}")
    for line in export_caveats(model.cfg):
        print(f"note: {line}")


def export_caveats(cfg: TAGIConfig) -> list[str]:
    """What a PEFT LoRA cannot hold of a TAGI model trained with these settings: the exported adapter alone is
    then another model than the one evaluated (README: the `tagi-adapter` row measures what that costs)."""
    notes = []
    if cfg.fusion != "none":
        notes.append(f"this checkpoint was trained with --fusion {cfg.fusion}: TAGI's "
                     f"{'encoder and ' if cfg.fusion == 'encoder' else ''}decoder also read the instruction states, "
                     "which a PEFT LoRA cannot hold; the adapter alone is the `tagi-adapter` row of the results, "
                     "not the `tagi` row (exact only for --fusion none)")
    if cfg.student_input == "prompt":
        notes.append("this student read the full prompt: feed the adapted model the prompt, not the instance alone")
    return notes


if __name__ == "__main__":
    from data import cli
    cli(main)
