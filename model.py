"""T5 from scratch, computing exactly what Hugging Face's T5ForConditionalGeneration computes.

TAGI (Liao et al., 2024, §3) keeps a pretrained T5 frozen and changes its behaviour only through LoRA adapters
that a hypernetwork writes from the task instruction. This file is that frozen T5:

    encoder:  x -> [RMSNorm -> self-attention -> (+) -> RMSNorm -> FFN -> (+)] x L -> RMSNorm
    decoder:  y -> [self-attention (causal) -> cross-attention to the encoder -> FFN] x L -> RMSNorm -> lm_head

T5 details that are easy to get wrong (see DESIGN.md §2): no 1/sqrt(d) scaling of attention scores, a learned
relative position bias that lives in block 0 and is shared by all blocks of its stack, RMSNorm without mean or bias,
relu FFN (v1.0) or gated gelu-tanh FFN (v1.1 / lm-adapt / flan), and for tied embeddings (v1.0) the decoder output is
scaled by d_model^-0.5 before the lm_head. Module names equal Hugging Face's, so state dicts move both ways.

Adapters (§3.2): every nn.Linear here can take a LoRA update per example,
    y = W x + B (A x),     A: (N|1, r, in), B: (N|1, out, r)   (PEFT orientation; the α/r scale is folded into B)
passed to forward as `adapters = {"encoder.block.0.layer.0.SelfAttention.q": (A, B), ...}`. Two batched matmuls,
never a loop over examples nor a materialised per-example weight.

Also here: greedy generation with a KV cache, per-example NLL for rank classification, and a safetensors reader and
writer written from the format (no pickle anywhere).

Shapes: N batch, S source length, T target length, D d_model, H heads, K d_kv, F d_ff, V vocab, r LoRA rank.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (v1.0) or "gated-gelu" (v1.1, lm-adapt, flan)
    tie_word_embeddings: bool = True  # lm_head IS the shared embedding (v1.0, and every transformers-5 T5)
    scale_decoder_outputs: bool | None = None  # decoder output * d_model^-0.5 before lm_head (v1.0); None: = tie
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.scale_decoder_outputs is None:  # transformers 4's rule: one flag both ties and scales
            self.scale_decoder_outputs = self.tie_word_embeddings

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @classmethod
    def from_json(cls, path) -> "T5Config":
        """Read a Hugging Face config.json; unknown keys are ignored, missing ones take T5's defaults (so a
        transformers-4 file, without scale_decoder_outputs, scales iff tie_word_embeddings)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read config JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not a JSON object")
        for f in fields(cls):  # a wrong type or size would fail only deep inside T5(cfg), as a traceback
            v, want = raw.get(f.name), bool if f.default is None else type(f.default)
            size = want is int and not f.name.endswith("_id")
            if v is not None and not ((type(v) is bool) == (want is bool) and
                                      isinstance(v, (int, float) if want is float else want) and (not size or v > 0)):
                raise ValueError(f"{path}: field {f.name!r} is {v!r}; expected a{' positive' * size} {want.__name__}")
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in known and v is not None})
        if raw.get("num_decoder_layers") is None:
            cfg.num_decoder_layers = cfg.num_layers
        if activation(cfg.feed_forward_proj) not in ACTIVATIONS:
            raise ValueError(f"{path}: field 'feed_forward_proj' = {cfg.feed_forward_proj!r} is not supported")
        return cfg

    def to_hf_dict(self) -> dict:
        """config.json for T5.save_pretrained: tie_word_embeddings only for v1.0 (tied and scaled), see there."""
        return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
                **asdict(self), "tie_word_embeddings": self.tie_word_embeddings and self.scale_decoder_outputs}

    @classmethod
    def tiny(cls, vocab_size: int) -> "T5Config":
        """The small model of the built-in suite (trained from scratch by `train.py --stage base`)."""
        return cls(vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=384, num_layers=3, num_decoder_layers=3,
                   num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


def activation(feed_forward_proj: str) -> str:
    """"gated-gelu" means the tanh approximation ("gelu_new"), as in the T5 v1.1 code; "gated-X" otherwise X."""
    return "gelu_new" if feed_forward_proj == "gated-gelu" else feed_forward_proj.split("-")[-1]


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (float64 stays float64, so gradient checks in float64 are exact)."""
    return x if x.dtype == torch.float64 else x.float()


def lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """B (A x) for a batch: x (N, L, in), A (N|1, r, in), B (N|1, out, r) -> (N, L, out). Per-example factors
    broadcast through batched matmul (bmm): O(N L r (in + out)) work, no (out, in) matrix per example.
    PEFT orientation: the update ΔW = B A is (out, in), so ΔW applied to every row of x is (x Aᵀ) Bᵀ; the α/r
    scale is already folded into B. The result has x's dtype (cast the factors to it). Hint: .mT transposes the
    last two axes, and a factor with N = 1 broadcasts over the batch by itself."""
    return (x @ A.to(x.dtype).mT) @ B.to(x.dtype).mT  # (N, L, r) -> (N, L, out)


class Linear(nn.Linear):
    """A bias-free linear layer that applies the adapter stored under its own module path, if any."""

    path = ""  # set by T5.__init__ to the Hugging Face module path, e.g. "encoder.block.0.layer.0.SelfAttention.q"

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x, adapters=None):
        y = F.linear(x, self.weight)
        if adapters and self.path in adapters:
            y = y + lora(x, *adapters[self.path])
        return y


class RMSNorm(nn.Module):
    """T5's layer norm: w * x / sqrt(mean(x^2) + eps), statistics in fp32, no mean subtraction, no bias."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        """x (..., D) -> weight * x / sqrt(mean of x² over the last axis + eps): no mean subtraction, no bias.
        The statistics are taken in at least float32 (float16 x² overflows from |x| ≈ 256; float64 stays float64,
        see `wide`); the result is cast back to the weight's dtype when that is float16 / bfloat16 (as transformers
        does). Hint: torch.rsqrt, and keepdim=True keeps the mean broadcastable."""
        x = x * torch.rsqrt(wide(x).pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """Map key_pos - query_pos to a bucket: exact for small distances, logarithmic up to max_distance, clamped.
    The encoder gives half the buckets to each direction; the decoder only looks back and uses all of them.

    rel: long tensor of relative positions (any shape) -> long tensor of buckets in [0, num_buckets), same shape.
    bidirectional: halve num_buckets, send keys after the query (rel > 0) to the upper half (offset by the halved
    count) and go on with the distance n = |rel|; otherwise only the past has distinct buckets: n = max(-rel, 0).
    With E = num_buckets // 2 (after halving): a distance n < E is its own bucket; a larger one gets
    E + int(log(n / E) / log(max_distance / E) · (num_buckets - E)), at most num_buckets - 1 (T5, Raffel et al.
    §2.1). Hint: compute both branches for every entry and let torch.where choose; take the log of n as float."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    exact = num_buckets // 2
    log_bucket = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact)
                          * (num_buckets - exact)).long()
    return bucket + torch.where(rel < exact, rel, torch.clamp(log_bucket, max=num_buckets - 1))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout_p: float = 0.0):
    """T5's attention core: softmax(q kᵀ + bias) v over the keys, with NO 1/sqrt(K) scaling (T5 folds it into the
    initialisation of q). q (N, H, Lq, K), k and v (N, H, Lk, K), bias (N|1, H|1, Lq, Lk) = the learned position
    bias plus the padding / causal mask (0 where a key may be seen, a large negative number where not), added to
    the scores before the softmax -> (N, H, Lq, K), in q's dtype (cast the bias to it). dropout_p: dropout on the
    attention weights (training only). Hint: three lines (scores, softmax over the last axis, weighted sum), or
    torch's fused scaled_dot_product_attention told not to scale."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v, o projections (each adaptable) and no score scaling."""

    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = Linear(cfg.d_model, inner), Linear(cfg.d_model, inner), Linear(cfg.d_model, inner)
        self.o = Linear(inner, cfg.d_model)
        self.H, self.K, self.p = cfg.num_heads, cfg.d_kv, cfg.dropout_rate
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def heads(self, x):  # (N, L, H*K) -> (N, H, L, K)
        return x.view(x.shape[0], x.shape[1], self.H, self.K).transpose(1, 2)

    def forward(self, x, bias, kv=None, adapters=None, cache=None):
        """x (N, Lq, D); kv (N, Lk, D) for cross-attention; bias (N|1, H|1, Lq, Lk) = position bias + mask.
        cache: a dict holding this layer's past keys/values; self-attention appends, cross-attention reuses."""
        q = self.heads(self.q(x, adapters))  # (N, H, Lq, K)
        if cache is not None and kv is not None and "k" in cache:  # cross-attention: encoder k, v computed once
            k, v = cache["k"], cache["v"]
        else:
            src = x if kv is None else kv
            k, v = self.heads(self.k(src, adapters)), self.heads(self.v(src, adapters))  # (N, H, Lk, K)
            if cache is not None:
                if kv is None and "k" in cache:
                    k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                cache["k"], cache["v"] = k, v
        out = attention(q, k, v, bias, self.p if self.training else 0.0)  # (N, H, Lq, K)
        return self.o(out.transpose(1, 2).flatten(2), adapters)  # (N, Lq, D)

    def position_bias(self, q_len: int, k_len: int, bidirectional: bool, cfg: T5Config, offset: int = 0):
        """(1, H, q_len, k_len) learned bias for query positions offset..offset+q_len-1 over keys 0..k_len-1."""
        ctx = torch.arange(offset, offset + q_len, device=self.relative_attention_bias.weight.device)[:, None]
        mem = torch.arange(k_len, device=ctx.device)[None, :]
        b = relative_position_bucket(mem - ctx, bidirectional, cfg.relative_attention_num_buckets,
                                     cfg.relative_attention_max_distance)
        return self.relative_attention_bias(b).permute(2, 0, 1).unsqueeze(0)  # (1, H, q, k)


class SubLayer(nn.Module):
    """A pre-norm residual sub-layer: its `layer_norm` and one module under the Hugging Face name `name`."""

    def __init__(self, cfg: T5Config, name: str, module: nn.Module):
        super().__init__()
        self.add_module(name, module)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class FeedForward(nn.Module):
    """relu: wo(relu(wi x)); gated: wo(act(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated, self.act = cfg.gated, ACTIVATIONS[activation(cfg.feed_forward_proj)]
        if self.gated:
            self.wi_0, self.wi_1 = Linear(cfg.d_model, cfg.d_ff), Linear(cfg.d_model, cfg.d_ff)
        else:
            self.wi = Linear(cfg.d_model, cfg.d_ff)
        self.wo, self.p = Linear(cfg.d_ff, cfg.d_model), cfg.dropout_rate

    def forward(self, x, adapters=None):
        h = self.act(self.wi_0(x, adapters)) * self.wi_1(x, adapters) if self.gated else self.act(self.wi(x, adapters))
        return self.wo(F.dropout(h, self.p, self.training), adapters)  # (N, L, F) -> (N, L, D)


class Block(nn.Module):
    """Pre-norm residual block: self-attention, [cross-attention], FFN. `fuse` is an optional extra residual
    sub-layer after self-attention (TAGI's encoder fusion, Eq. 1); plain T5 has none."""

    def __init__(self, cfg: T5Config, is_decoder: bool, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([SubLayer(cfg, "SelfAttention", Attention(cfg, has_bias))] +
                                   ([SubLayer(cfg, "EncDecAttention", Attention(cfg, False))] if is_decoder else []) +
                                   [SubLayer(cfg, "DenseReluDense", FeedForward(cfg))])
        self.p = cfg.dropout_rate

    def forward(self, x, bias, enc=None, enc_bias=None, adapters=None, cache=None, fuse=None):
        drop = lambda h: F.dropout(h, self.p, self.training)  # noqa: E731
        sa = self.layer[0]
        x = x + drop(sa.SelfAttention(sa.layer_norm(x), bias, adapters=adapters,
                                      cache=None if cache is None else cache["self"]))
        if fuse is not None:
            x = x + fuse(x)
        if enc is not None:
            ca = self.layer[1]
            x = x + drop(ca.EncDecAttention(ca.layer_norm(x), enc_bias, kv=enc, adapters=adapters,
                                            cache=None if cache is None else cache["cross"]))
        ff = self.layer[-1]
        return x + drop(ff.DenseReluDense(ff.layer_norm(x), adapters))


class Stack(nn.Module):
    def __init__(self, cfg: T5Config, embed: nn.Embedding, is_decoder: bool):
        super().__init__()
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.embed_tokens, self.cfg, self.is_decoder = embed, cfg, is_decoder
        self.block = nn.ModuleList([Block(cfg, is_decoder, has_bias=i == 0) for i in range(n)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def forward(self, ids, mask=None, enc=None, enc_mask=None, adapters=None, cache=None, fuse=None,
                return_first=False):
        """ids (N, L) -> hidden states (N, L, D). mask (N, L) of 1/0 for the encoder; the decoder is causal and
        attends to enc (N, S, D) under enc_mask (N, S). cache: per-layer dicts for incremental decoding.
        return_first: also return block 0's output (N, L, D) (Hugging Face's hidden_states[1] given 2+ blocks)."""
        x = F.dropout(self.embed_tokens(ids), self.cfg.dropout_rate, self.training)
        L, past = ids.shape[1], (cache[0]["self"]["k"].shape[2] if cache and "k" in cache[0]["self"] else 0)
        attn0 = self.block[0].layer[0].SelfAttention
        bias = attn0.position_bias(L, past + L, not self.is_decoder, self.cfg, offset=past)  # (1, H, L, past+L)
        neg = torch.finfo(bias.dtype).min
        if self.is_decoder:
            causal = torch.ones(L, past + L, dtype=torch.bool, device=ids.device).tril(past)
            bias = bias.masked_fill(~causal, neg)
        if mask is not None:
            bias = bias + (1.0 - mask[:, None, None, :].to(bias.dtype)) * neg  # (N, H, L, L)
        enc_bias = None if enc is None else (1.0 - enc_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # cast the bias once, not per layer
            dt = torch.get_autocast_dtype(x.device.type)
            bias, enc_bias = bias.to(dt), None if enc_bias is None else enc_bias.to(dt)
        for i, blk in enumerate(self.block):
            args = (x, bias, enc, enc_bias, adapters, None if cache is None else cache[i],
                    None if fuse is None else fuse[i])
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(blk, *args, use_reentrant=False)
            else:
                x = blk(*args)
            first = x if i == 0 else first
        out = F.dropout(self.final_layer_norm(x), self.cfg.dropout_rate, self.training)
        return (out, first) if return_first else out


# ----------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class Seq2SeqOutput:
    logits: torch.Tensor  # (N, T, V)
    loss: torch.Tensor | None = None


def shift_right(labels: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Teacher forcing: decoder input = [start, y_1 .. y_{T-1}], with -100 (ignored) positions read as pad 0."""
    dec = torch.full_like(labels, start)
    dec[:, 1:] = labels[:, :-1].clamp(min=0)
    return dec


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, T, V), (N, T) -> (N, T) negative log-likelihood, 0 where labels == -100."""
    return F.cross_entropy(wide(logits).flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="none").view(labels.shape)


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) mean NLL over each example's real target tokens: the rank-classification score (lower wins)."""
    return token_nll(logits, labels).sum(1) / (labels != -100).sum(1).clamp(min=1)


class T5(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder, self.decoder = Stack(cfg, self.shared, False), Stack(cfg, self.shared, True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        for name, m in self.named_modules():
            if isinstance(m, Linear):
                m.path = name
        self.apply(self._init)

    def _init(self, m):
        """T5's (Mesh TensorFlow) initialisation; used only when training from scratch."""
        c = self.config
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1.0)
        elif isinstance(m, Attention):
            nn.init.normal_(m.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
            for w in (m.k.weight, m.v.weight):
                nn.init.normal_(w, std=c.d_model ** -0.5)
            nn.init.normal_(m.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
        elif isinstance(m, FeedForward):
            for w in ([m.wi_0.weight, m.wi_1.weight] if m.gated else [m.wi.weight]):
                nn.init.normal_(w, std=c.d_model ** -0.5)
            nn.init.normal_(m.wo.weight, std=c.d_ff ** -0.5)
        elif m is self.lm_head and not c.tie_word_embeddings:
            nn.init.normal_(m.weight, std=1.0)

    def adaptable(self) -> dict[str, Linear]:
        """Every module path an adapter may target -> its Linear."""
        return {m.path: m for m in self.modules() if isinstance(m, Linear)}

    def encode(self, input_ids, attention_mask=None, adapters=None, fuse=None, return_first=False):
        """(N, S) -> (N, S, D) [, block 0's output (N, S, D) with return_first]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.encoder(input_ids, attention_mask, adapters=adapters, fuse=fuse, return_first=return_first)

    def logits(self, hidden):
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model ** -0.5
        return self.lm_head(hidden)  # (N, T, V)

    def decode(self, decoder_input_ids, enc, enc_mask, adapters=None, cache=None):
        """(N, T) decoder inputs attending to enc (N, S, D) -> logits (N, T, V)."""
        return self.logits(self.decoder(decoder_input_ids, enc=enc, enc_mask=enc_mask, adapters=adapters,
                                        cache=cache))

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, labels=None, adapters=None,
                encoder_hidden_states=None):
        """Logits (N, T, V) and, given labels (N, T) with -100 for ignored positions, the mean token cross-entropy.
        encoder_hidden_states replaces the encoder pass (then attention_mask is its mask)."""
        enc = encoder_hidden_states if encoder_hidden_states is not None else \
            self.encode(input_ids, attention_mask, adapters)
        if attention_mask is None:
            attention_mask = torch.ones(enc.shape[:2], dtype=torch.long, device=enc.device)
        if decoder_input_ids is None:
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id)
        logits = self.decode(decoder_input_ids, enc, attention_mask, adapters)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqOutput(logits, loss)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=128, adapters=None,
                 encoder_hidden_states=None):
        """Greedy decoding with a KV cache. Returns (N, <= max_new_tokens) ids without the start token; a sequence
        that has produced eos is padded with 0 afterwards; stops when every sequence has ended.

        Encode once (or take encoder_hidden_states; attention_mask, all ones by default, is then their mask). The
        cache is one {"self": {}, "cross": {}} per decoder block, which self.decode fills: after the first step feed
        only the newest token, self.decode(tok (N, 1), enc, attention_mask, adapters, cache) -> logits (N, 1, V).
        Start from config.decoder_start_token_id; each step takes the argmax of the last position; a sequence that is
        done gets config.pad_token_id instead, and is done once it has emitted config.eos_token_id. Long ids on enc's
        device; max_new_tokens = 0 gives an empty (N, 0) tensor."""
        enc = encoder_hidden_states if encoder_hidden_states is not None else \
            self.encode(input_ids, attention_mask, adapters)
        N, dev = enc.shape[0], enc.device
        if attention_mask is None:
            attention_mask = torch.ones(enc.shape[:2], dtype=torch.long, device=dev)
        cache = [{"self": {}, "cross": {}} for _ in self.decoder.block]
        tok = torch.full((N, 1), self.config.decoder_start_token_id, dtype=torch.long, device=dev)
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        out = []
        for _ in range(max_new_tokens):
            tok = self.decode(tok, enc, attention_mask, adapters, cache)[:, -1].argmax(-1)  # (N,)
            tok = tok.masked_fill(done, self.config.pad_token_id)
            out.append(tok)
            done |= tok == self.config.eos_token_id
            tok = tok[:, None]
            if done.all():
                break
        return torch.stack(out, 1) if out else torch.zeros(N, 0, dtype=torch.long, device=dev)

    @torch.no_grad()
    def score(self, input_ids, attention_mask, labels, adapters=None, encoder_hidden_states=None):
        """Mean per-token NLL of each target (N,): the rank-classification score (lower is better)."""
        return mean_nll(self(input_ids, attention_mask, labels=labels, adapters=adapters,
                             encoder_hidden_states=encoder_hidden_states).logits, labels)

    # -------------------------------------------------------------------------------- Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu") -> "T5":
        """Load a Hugging Face T5 directory: config.json + model.safetensors (or a sharded index)."""
        path = Path(path)
        cfg = T5Config.from_json(path / "config.json")
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise ValueError(f"{index}: bad or missing field 'weight_map' ({e})") from None
            sd = {k: v for s in shards for k, v in load_safetensors(path / s).items()}
        elif (path / "model.safetensors").exists():
            sd = load_safetensors(path / "model.safetensors")
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        src = path / ("model.safetensors.index.json" if index.exists() else "model.safetensors")
        if "shared.weight" not in sd:  # some files keep only the encoder's alias of the embedding
            for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
                if alias in sd:
                    sd["shared.weight"] = sd[alias]
                    break
        for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                  "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"):
            sd.pop(k, None)
        if "shared.weight" in sd:
            cfg.vocab_size = sd["shared.weight"].shape[0]
        gated = any(".wi_0." in k for k in sd)  # trust the weights over config.json
        if gated != cfg.gated:
            cfg.feed_forward_proj = "gated-gelu" if gated else "relu"
        # The weights say whether the head is tied (transformers 5 writes tie_word_embeddings=true always): no
        # lm_head.weight, or a copy of shared, is tied; a different one is used as is, as transformers 5 does.
        head = sd.get("lm_head.weight")
        cfg.tie_word_embeddings = head is None or ("shared.weight" in sd and torch.equal(head, sd["shared.weight"]))
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items() if k not in
                    ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") and
                    not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        wrong = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(s)}" for k, s in expected.items()
                       if k in sd and sd[k].shape != s)
        if missing or unexpected or wrong:
            raise ValueError(f"{src}: weights do not match the config. missing: {missing}; unexpected: "
                             f"{unexpected}; shape mismatch: {wrong}")
        sd = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
              for k, v in sd.items()}
        model.load_state_dict(sd, strict=False, assign=True)
        model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.shared.weight
        return model

    def save_pretrained(self, path):
        """Write config.json + model.safetensors that transformers 4 and 5 read back to our logits. transformers 4
        ties and scales iff tie_word_embeddings; 5 scales iff scale_decoder_outputs and uses a stored lm_head.weight
        that differs from shared. So lm_head.weight is left out only for v1.0 (tied + scaled); a tied unscaled head
        (transformers 5's v1.1) is stored as a copy with tie_word_embeddings=false: exact for both, and read back
        tied. An untied scaled head is exact for us and transformers 5; transformers 4 would read it unscaled."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        v10 = self.config.tie_word_embeddings and self.config.scale_decoder_outputs
        sd = {k: v for k, v in self.state_dict().items()
              if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
              and not (v10 and k == "lm_head.weight")}
        save_safetensors(sd, path / "model.safetensors", metadata={"format": "pt"})
        atomic_write_text(path / "config.json", json.dumps(self.config.to_hf_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# safetensors: [8-byte little-endian header size N][N bytes of JSON header][data buffer]

# In the safetensors package's own dtype order: its writer puts tensors of later dtypes first.
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
          "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "F16": torch.float16, "BF16": torch.bfloat16,
          "I32": torch.int32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the bound the safetensors package uses


def atomic_write_bytes(path, chunks) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, [text.encode()])


def read_safetensors_header(path) -> tuple[dict, dict, int]:
    """Validate the header of a safetensors file. Returns (tensor entries, metadata, data start)."""
    def bad(msg):
        return ValueError(f"{path}: not a valid safetensors file: {msg}")
    size = os.path.getsize(path)
    if size < 8:
        raise bad(f"only {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise bad(f"header length {n} exceeds the {MAX_HEADER}-byte limit")
        if 8 + n > size:
            raise bad(f"header length {n} runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"header is not UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("field '__metadata__' must map strings to strings")
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise bad(f"tensor {name!r} needs the fields 'dtype', 'shape', 'data_offsets'")
        if e["dtype"] not in DTYPES:
            raise bad(f"tensor {name!r}: field 'dtype' = {e['dtype']!r} is not supported")
        shape, offs = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: field 'shape' must be a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1] <= size - 8 - n):
            raise bad(f"tensor {name!r}: field 'data_offsets' {offs} is outside the data buffer")
        if offs[1] - offs[0] != math.prod(shape) * DTYPES[e["dtype"]].itemsize:
            raise bad(f"tensor {name!r}: {offs[1] - offs[0]} bytes do not match shape {shape} x {e['dtype']}")
        spans.append((offs[0], offs[1], name))
    end = 0
    for b, e, name in sorted(spans):
        if b != end:
            raise bad(f"tensor {name!r}: data_offsets {[b, e]} {'overlap' if b < end else 'leave a gap'}")
        end = e
    if end != size - 8 - n:
        raise bad(f"data buffer has {size - 8 - n} bytes, tensors cover {end}")
    return header, meta, 8 + n


def load_safetensors(path, device="cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file. The file is memory-mapped (copy-on-write), so a large checkpoint
    is not read twice into memory; tensors are views of the mapping until moved or converted."""
    header, _, start = read_safetensors_header(path)
    size = os.path.getsize(path)
    if size == start:
        buf = torch.empty(0, dtype=torch.uint8)
    else:
        buf = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    out = {}
    for name, e in header.items():
        b, t = start + e["data_offsets"][0], DTYPES[e["dtype"]]
        raw = buf[b:start + e["data_offsets"][1]]
        if b % t.itemsize:  # misaligned (not written by us or the safetensors package): copy to align
            raw = raw.clone()
        out[name] = raw.view(t).reshape(e["shape"]).to(device)
    return out


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors in the byte layout of the safetensors package: tensors ordered by dtype (DTYPES, last first),
    then name; compact JSON header padded with spaces to a multiple of 8; written atomically."""
    rank = {t: i for i, t in enumerate(DTYPES.values())}
    items = sorted(tensors.items(), key=lambda kv: (-rank.get(kv[1].dtype, -1), kv[0]))
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        blob = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    h += b" " * (-len(h) % 8)
    atomic_write_bytes(path, [struct.pack("<Q", len(h)), h, *blobs])
