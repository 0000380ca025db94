"""The hypernetwork: a task instruction in, LoRA factors for every adapted module of the frozen T5 out (paper Eq. 2).

    I_x  = T5-encoder(instruction)                       (N, s, D)   the student's own frozen encoder
    t    = masked-mean(I_x)                               (N, D)      one vector per task
    h_m  = MLP([W_t t ; e_m])                             (N, M, h)   e_m embeds target m: its layer and its kind
    A_m, B_m = head_A(h_m), head_B(h_m)                   A (N, r, in), B (N, out, r)  (PEFT orientation)

One small network serves every layer; the target embedding tells it which module it is writing. All M targets of
a batch come out of one batched call (one head pair per weight shape), and a task's adapters are generated once
and reused for all of its instances.

Zero at step 0, with exact gradients. LoRA starts from ΔW = 0 by zeroing B, so on the first step only B learns.
Here the heads start random and a frozen copy of them, fed the same h, is subtracted:
    ΔW_m = B_m A_m − B0_m A0_m,   (A, B) = heads(h_m),  (A0, B0) = frozen_heads(h_m)
At initialisation the two heads are equal, so ΔW is 0 for every h: the output is the frozen T5's, and on the first
step both A and B heads learn (the trunk's gradient is exactly 0 then, as with LoRA's B = 0; it flows from the
second step on). The copy is fed h itself, not a stop-gradient: the backward pass is the exact gradient of the
forward (tests/test_tagi.py checks it against finite differences). The adapter handed to T5 is the rank-2r pair
[B, −B0]·[A; A0]; the frozen heads never change. (Paper: not stated; official code: the HyperNets' weights drawn
from N(0, 1e-7), so ΔW ≈ 0 and nothing is exact; here: the frozen-copy offset. See README.)
init="official" instead draws every head weight from N(0, 1e-7) with zero bias and drops the frozen copy: ΔW ≈ 0
(not exactly), the adapter has rank r, and the trunk keeps its init (the official HyperNet's 8-wide hidden Linears
are N(0, 1e-7) too). The official code scales B by 1/√r with no α: that is alpha = √rank here (α/r = 1/√r).

Shapes: N tasks, s instruction length, D d_model, M adapted modules, h hidden width, r rank.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from model import T5, wide

FFN = ("wi", "wi_0", "wi_1", "wo")  # FFN Linears; the others (q, k, v, o) are chosen per attention kind


def target_paths(t5: T5, modules=("q", "v"), stacks=("encoder.SelfAttention", "decoder.SelfAttention",
                                                    "decoder.EncDecAttention")) -> list[str]:
    """Hugging Face paths of the Linears to adapt, e.g. q and v of encoder self-, decoder self- and decoder
    cross-attention (the paper's choice). FFN names ("wi", "wo", ...) select the FFN of every block."""
    out = []
    for path in t5.adaptable():
        stack, _, _, _, _, sub, name = path.split(".")  # e.g. encoder.block.3.layer.0.SelfAttention.q
        if name in modules and (name in FFN or f"{stack}.{sub}" in stacks):
            out.append(path)
    return out


def target_kind(path: str) -> tuple[int, str]:
    """("decoder.block.3.layer.1.EncDecAttention.q") -> (3, "decoder.EncDecAttention.q")."""
    stack, _, layer, _, _, sub, name = path.split(".")
    return int(layer), f"{stack}.{sub}.{name}"


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, s, D), (N, s) -> (N, D): the mean over real tokens only, padding excluded.
    mask holds 1 for a real token and 0 for padding (long, bool or float); the result has x's dtype. A row without
    a real token gives 0, not NaN (divide by the count, at least 1). This is the task vector t of Eq. 2."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class Heads(nn.Module):
    """One linear map per weight shape: h (N, M_g, hidden) -> A (N, M_g, r, in), B (N, M_g, out, r)."""

    def __init__(self, hidden: int, shapes: list[tuple[int, int]], rank: int):
        super().__init__()
        self.r, self.shapes = rank, shapes
        self.A = nn.ModuleList([nn.Linear(hidden, rank * d_in) for d_in, _ in shapes])
        self.B = nn.ModuleList([nn.Linear(hidden, d_out * rank) for _, d_out in shapes])
        for lin, (d_in, d_out) in zip(self.A, shapes):  # A ~ PEFT's kaiming scale 1/sqrt(in); B small
            nn.init.normal_(lin.weight, std=1 / math.sqrt(hidden * d_in))
            nn.init.zeros_(lin.bias)
        for lin, (d_in, d_out) in zip(self.B, shapes):
            nn.init.normal_(lin.weight, std=1 / math.sqrt(hidden * rank))
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor, g: int):
        N, Mg, _ = h.shape
        d_in, d_out = self.shapes[g]
        return (self.A[g](h).view(N, Mg, self.r, d_in),   # (N, M_g, r, in)
                self.B[g](h).view(N, Mg, d_out, self.r))  # (N, M_g, out, r)


class HyperNetwork(nn.Module):
    """Instruction states -> {module path: (A, B)} for every target (Eq. 2). `scale` (= α/r) is folded into B."""

    def __init__(self, t5: T5, targets: list[str], rank: int = 32, alpha: float = 32.0, hidden: int = 256,
                 init: str = "offset"):
        super().__init__()
        if init not in ("offset", "official"):
            raise ValueError(f"HyperNetwork: init must be 'offset' or 'official', not {init!r}")
        D, lins = t5.config.d_model, t5.adaptable()
        self.targets, self.rank, self.scale = list(targets), rank, alpha / rank
        shapes = sorted({(lins[p].in_features, lins[p].out_features) for p in self.targets})
        group = [shapes.index((lins[p].in_features, lins[p].out_features)) for p in self.targets]
        self.groups = [[i for i, gi in enumerate(group) if gi == g] for g in range(len(shapes))]  # targets per shape
        kinds = sorted({target_kind(p)[1] for p in self.targets})
        layers = [target_kind(p)[0] for p in self.targets]
        self.register_buffer("layer_ids", torch.tensor(layers), persistent=False)
        self.register_buffer("kind_ids", torch.tensor([kinds.index(target_kind(p)[1]) for p in self.targets]),
                             persistent=False)
        self.task_proj = nn.Linear(D, hidden)
        self.layer_emb = nn.Embedding(max(layers) + 1, hidden)
        self.kind_emb = nn.Embedding(len(kinds), hidden)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = Heads(hidden, shapes, rank)
        if init == "official":  # N(0, 1e-7) weights (biases are 0 already), no frozen copy: ΔW ≈ 0, rank r
            for lin in [*self.heads.A, *self.heads.B]:
                nn.init.normal_(lin.weight, std=1e-7)
        self.heads0 = None if init == "official" else \
            copy.deepcopy(self.heads).requires_grad_(False)  # the frozen offset, see the docstring

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """states (N, s, D) from the frozen encoder, mask (N, s) -> {path: (A (N, 2r, in), B (N, out, 2r))}.

        Eq. 2 for all M targets (self.targets) at once, as the module docstring draws it:
          t   = masked_mean(wide(states), mask)                        (N, D)    the task vector
          z   = task_proj(t)                                           (N, h)
          e_m = layer_emb(layer_ids[m]) + kind_emb(kind_ids[m])        (M, h)    which module target m is
          h_m = mlp([z ; e_m]), concatenated on the feature axis       (N, M, h)
        then per weight-shape group g (self.groups[g]: its target indices, in order): (A, B) = heads(h of those
        targets, g) and (A0, B0) = heads0(the same h, g), and target m gets the rank-2r pair [A ; A0] (rank axis)
        and [B , -B0] · scale, so that its update is scale · (B A - B0 A0): exactly 0 while heads equal heads0 (at
        initialisation; why a frozen copy fed the same h: see the module docstring). Hint: expand z and e to
        (N, M, h) before concatenating, and split a group's factors per target with unbind: its backward is one
        copy, where indexing target by target (A[:, j]) writes a full-size zero tensor per target (this step was
        1.2x faster for it). init "official" (heads0 None): the rank-r pair (A, B · scale)."""
        z = self.task_proj(masked_mean(wide(states), mask))              # (N, h)
        e = self.layer_emb(self.layer_ids) + self.kind_emb(self.kind_ids)  # (M, h)
        N, M = z.shape[0], e.shape[0]
        h = self.mlp(torch.cat([z[:, None].expand(N, M, -1), e[None].expand(N, M, -1)], -1))  # (N, M, h)
        out = {}
        for g, idx in enumerate(self.groups):
            A, B = self.heads(h[:, idx], g)              # (N, M_g, r, in), (N, M_g, out, r)
            if self.heads0 is not None:
                A0, B0 = self.heads0(h[:, idx], g)       # same input: ΔW = 0 at init
                A, B = torch.cat([A, A0], 2), torch.cat([B, -B0], 3)  # rank 2r: [B, -B0]·[A; A0]
            B = B * self.scale
            for i, a, b in zip(idx, A.unbind(1), B.unbind(1)):  # unbind, not A[:, j]: see the Hint
                out[self.targets[i]] = (a, b)
        return out


class LoRABank(nn.Module):
    """Static LoRAs, one per key (a task, a category, or a single shared one), all trained at once: each example
    gathers its own key's factors and model.py applies them per example. PEFT initialisation: A kaiming-uniform,
    B zero, scale α/r. These are the teachers of "Training with Instance" (paper §3.3)."""

    def __init__(self, t5: T5, targets: list[str], num: int, rank: int = 32, alpha: float = 32.0):
        super().__init__()
        lins = t5.adaptable()
        self.targets, self.rank, self.scale, self.num = list(targets), rank, alpha / rank, num
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        for p in self.targets:
            A = torch.empty(num, rank, lins[p].in_features)
            for a in A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A.append(nn.Parameter(A))                                       # (num, r, in)
            self.B.append(nn.Parameter(torch.zeros(num, lins[p].out_features, rank)))  # (num, out, r)

    def forward(self, idx: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """idx (N,) of keys -> {path: (A (N, r, in), B (N, out, r))}; None gives every key (num, ...)."""
        pick = (lambda t: t) if idx is None else (lambda t: t[idx])
        return {p: (pick(A), pick(B) * self.scale) for p, A, B in zip(self.targets, self.A, self.B)}

    def get(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The adapter of one key as a static (N = 1) mapping."""
        return self(torch.tensor([i], device=self.A[0].device))
