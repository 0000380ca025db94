"""Tests of the classroom exercises (ASSIGNMENTS.md, tests/exercises.json), in course order.

Every test carries exactly one marker, the id of its exercise, and only calls the functions of that exercise (and
of the exercises it declares in `depends_on`). The oracles never call the code under test: closed forms, hand-built
tensors, hand-written strings, brute force in float64, and fakes that stand in for the rest of the model. Product
modules are imported inside each test, so a file a student breaks fails its own tests, never the collection of
the others. Run them with `python tests/assignments.py grade [E3 ...]`, or `python -m pytest -m E3 tests/test_exercises.py`.
"""
import importlib
import itertools
import math
import random

import pytest
import torch

F64 = torch.float64


def mod(name):
    """A product module, imported when a test needs it."""
    return importlib.import_module(name)


def close(got, want, tol, what):
    """Assert |got - want| <= tol everywhere; the message names the worst entry, where it is and the tolerance."""
    got, want = (x if torch.is_tensor(x) else torch.tensor(x, dtype=F64) for x in (got, want))
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"{what}: shape {tuple(got.shape)} instead of {tuple(want.shape)}")
    d = (got.detach().double() - want.double()).abs().nan_to_num(nan=math.inf)
    if d.numel() and d.max() > tol:
        i = int(d.argmax())
        at = f" at {[int(j) for j in torch.unravel_index(torch.tensor(i), d.shape)]}" if d.dim() else ""
        g, w = got.detach().double().flatten()[i].item(), want.double().flatten()[i].item()
        raise AssertionError(f"{what}: max |Δ| {d.max().item():.3g}{at} (tolerance {tol:g}): got {g:.6g}, "
                             f"expected {w:.6g}")


def same_text(got, want, what):
    """Assert two strings are equal; the message shows where they first differ."""
    if got != want:
        i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise AssertionError(f"{what}: differs at character {i}: got {got[max(0, i - 20):i + 20]!r}, expected "
                             f"{want[max(0, i - 20):i + 20]!r} (lengths {len(got)} and {len(want)})")


def tiny_t5(**kw):
    """A randomly initialised toy T5 (its weights do not matter where it is used here)."""
    m = mod("model")
    torch.manual_seed(0)
    return m.T5(m.T5Config(**{**dict(vocab_size=12, d_model=8, d_kv=4, d_ff=12, num_layers=2, num_decoder_layers=2,
                                     num_heads=2, dropout_rate=0.0), **kw}))


# --------------------------------------------------------------------------------------------- E1 RMSNorm
@pytest.mark.E1
def test_rmsnorm_rows_with_known_rms():
    """(3, 4, 0, 0) has RMS 2.5, (1, -1, 1, -1) RMS 1, (2, 2, 2, 2) RMS 2 (a LayerNorm would give 0 there)."""
    norm = mod("model").RMSNorm(4, eps=0.0).double()
    w = torch.tensor([0.5, 1.0, 2.0, -1.0], dtype=F64)
    with torch.no_grad():
        norm.weight.copy_(w)
        got = norm(torch.tensor([[[3, 4, 0, 0], [1, -1, 1, -1], [2, 2, 2, 2]]], dtype=F64))
    want = torch.tensor([[[1.2, 1.6, 0, 0], [1, -1, 1, -1], [1, 1, 1, 1]]], dtype=F64) * w
    close(got, want, 1e-12, "RMSNorm(x) with eps = 0, weight (0.5, 1, 2, -1)")


@pytest.mark.E1
def test_rmsnorm_eps_inside_the_square_root():
    norm = mod("model").RMSNorm(4, eps=3.0)
    with torch.no_grad():
        got = norm(torch.ones(2, 4))
    close(got, torch.full((2, 4), 0.5), 1e-6, "RMSNorm(ones) with eps = 3 must be 1 / sqrt(1 + 3)")


@pytest.mark.E1
def test_rmsnorm_float16_statistics_in_float32():
    """300² = 90000 overflows float16 (max 65504): the mean of squares must be taken in float32."""
    norm = mod("model").RMSNorm(4, eps=1e-6).half()
    with torch.no_grad():
        got = norm(torch.tensor([[300, -300, 300, 300]], dtype=torch.float16))
    assert got.dtype == torch.float16, f"dtype {got.dtype}: with a float16 weight the result is float16"
    close(got, [[1.0, -1.0, 1.0, 1.0]], 1e-3, "RMSNorm of (300, -300, 300, 300) in float16")


# --------------------------------------------------------------------------------- E2 relative position buckets
REL = [-300, -128, -127, -64, -33, -20, -16, -9, -8, -7, -1, 0, 1, 7, 8, 9, 16, 20, 33, 64, 127, 128, 300]
BUCKETS = {  # (bidirectional, num_buckets, max_distance) -> the bucket of each REL, worked out by hand from
    # T5's definition (tests/test_assignments.py checks them against transformers' T5Attention when installed)
    (True, 32, 128): [15, 15, 15, 14, 12, 10, 10, 8, 8, 7, 1, 0, 17, 23, 24, 24, 26, 26, 28, 30, 31, 31, 31],
    (False, 32, 128): [31, 31, 31, 26, 21, 17, 16, 9, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    (True, 8, 20): [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 1, 0, 5, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
    (False, 16, 40): [15, 15, 15, 15, 15, 12, 11, 8, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
}


@pytest.mark.E2
@pytest.mark.parametrize("key", list(BUCKETS), ids=lambda k: f"{'enc' if k[0] else 'dec'}-{k[1]}-{k[2]}")
def test_relative_position_buckets(key):
    bidirectional, num_buckets, max_distance = key
    got = mod("model").relative_position_bucket(torch.tensor(REL), bidirectional, num_buckets, max_distance)
    assert got.dtype == torch.long and got.shape == (len(REL),), f"got {got.dtype} {tuple(got.shape)}, expected " \
        f"torch.int64 ({len(REL)},)"
    for rel, b, want in zip(REL, got.tolist(), BUCKETS[key]):
        assert b == want, (f"bucket {b} instead of {want} for rel = key - query = {rel} ("
                           f"{'bidirectional' if bidirectional else 'causal'}, {num_buckets} buckets, max distance "
                           f"{max_distance})")


@pytest.mark.E2
def test_relative_position_buckets_keep_the_shape():
    """A (query, key) grid, as position_bias passes it."""
    table = dict(zip(REL, BUCKETS[True, 32, 128]))
    rel = torch.tensor([[0, 1, 7, 300], [-1, -8, -300, 20]])
    got = mod("model").relative_position_bucket(rel, True, 32, 128)
    want = torch.tensor([[table[r] for r in row] for row in rel.tolist()])
    assert got.shape == rel.shape and torch.equal(got, want), f"buckets {got.tolist()}, expected {want.tolist()}"


# ------------------------------------------------------------------------------------------------ E3 attention
@pytest.mark.E3
def test_attention_hand_built_weights():
    """K = 4, q = (1, 1, 1, 1), k_j = (ln j / 4)·(1, 1, 1, 1): the scores q·k_j are ln 1 .. ln 4. The bias adds ln 2
    to key 2 and masks key 4, so the weights are 1 : 4 : 3 : 0 (over 8) and the output is (18, 2.25)."""
    q = torch.ones(1, 1, 1, 4, dtype=F64)
    k = (torch.log(torch.arange(1.0, 5.0, dtype=F64)) / 4)[:, None].expand(4, 4)[None, None]
    v = torch.tensor([[8.0, 1.0], [16.0, 2.0], [24.0, 3.0], [1e6, 1e6]], dtype=F64)[None, None]
    bias = torch.tensor([0.0, math.log(2.0), 0.0, torch.finfo(F64).min], dtype=F64)[None, None, None]
    got = mod("model").attention(q, k, v, bias)
    w = torch.tensor([1.0, 2 * math.sqrt(2.0), math.sqrt(3.0)], dtype=F64)  # what a 1/sqrt(K) = 1/2 scaling gives
    scaled = (w / w.sum()) @ v[0, 0, :3]
    hint = " (that is the 1/sqrt(K)-scaled answer: T5 does not scale)" if got.shape == (1, 1, 1, 2) and \
        torch.allclose(got.double().flatten(), scaled, atol=1e-6) else ""
    close(got, torch.tensor([[[[18.0, 2.25]]]], dtype=F64), 1e-10, "attention output" + hint)


@pytest.mark.E3
def test_attention_matches_the_softmax_formula_with_bias_and_padding():
    g = torch.Generator().manual_seed(0)
    N, H, Lq, Lk, K = 2, 3, 4, 5, 6
    q, k, v = (torch.randn(N, H, L, K, generator=g, dtype=F64) for L in (Lq, Lk, Lk))
    v[1, :, 3:] = 1e6  # example 1 has two padding keys: their values must not leak
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    pos = torch.randn(1, H, Lq, Lk, generator=g, dtype=F64)
    neg = (~keep)[:, None, None, :].to(F64) * torch.finfo(F64).min  # (N, 1, 1, Lk)
    attn = mod("model").attention
    for bias, what in ((pos + neg, "position bias + padding mask (N, H, Lq, Lk)"), (neg, "padding mask only "
                                                                                            "(N, 1, 1, Lk)")):
        scores = torch.einsum("nhid,nhjd->nhij", q, k) + bias.expand(N, H, Lq, Lk)
        weights = torch.softmax(scores.masked_fill(~keep[:, None, None, :], -math.inf), -1)
        want = torch.einsum("nhij,nhjd->nhid", weights, v)
        close(attn(q, k, v, bias), want, 1e-10, f"attention with {what}, float64")
    q32, k32, v32 = q.float(), k.float(), v.float()
    got = attn(q32, k32, v32, pos.float() + (~keep)[:, None, None, :].float() * torch.finfo(torch.float32).min)
    assert got.dtype == torch.float32, f"dtype {got.dtype}: float32 q gives a float32 result"
    scores = torch.einsum("nhid,nhjd->nhij", q, k) + pos
    want = torch.einsum("nhij,nhjd->nhid", torch.softmax(scores.masked_fill(~keep[:, None, None, :], -math.inf), -1),
                        v)
    close(got, want, 1e-3, "attention in float32 (padding values are 1e6)")


# ----------------------------------------------------------------------------------------------------- E4 lora
@pytest.mark.E4
def test_lora_hand_built():
    """r = 1: A x is one number per row, (1, 3)·(1, 2) = 7 and (1, 3)·(0, -1) = -3, which B = (3, 4, 5) scales."""
    x = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]], dtype=F64)
    A = torch.tensor([[[1.0, 3.0]]], dtype=F64)              # (1, r=1, in=2)
    B = torch.tensor([[[3.0], [4.0], [5.0]]], dtype=F64)     # (1, out=3, r=1)
    close(mod("model").lora(x, A, B), [[[21.0, 28.0, 35.0], [-9.0, -12.0, -15.0]]], 1e-12, "lora(x, A, B)")


@pytest.mark.E4
def test_lora_per_example_equals_the_merged_update():
    g = torch.Generator().manual_seed(1)
    N, L, d_in, d_out, r = 3, 4, 5, 6, 2
    x = torch.randn(N, L, d_in, generator=g, dtype=F64)
    A, B = torch.randn(N, r, d_in, generator=g, dtype=F64), torch.randn(N, d_out, r, generator=g, dtype=F64)
    lora = mod("model").lora
    want = torch.stack([x[n] @ (B[n] @ A[n]).T for n in range(N)])  # ΔW_n = B_n A_n, (out, in)
    close(lora(x, A, B), want, 1e-12, "lora with one adapter per example vs x ΔW_nᵀ")
    close(lora(x, A[:1], B[:1]), x @ (B[0] @ A[0]).T, 1e-12, "lora with one adapter (N = 1) for the whole batch")
    got = lora(x.float(), A, B)
    assert got.dtype == torch.float32, f"dtype {got.dtype}: the result has x's dtype (float32)"
    close(got, want, 1e-4, "lora in float32")


# ------------------------------------------------------------------------------------------------- E5 generate
SCRIPT = [[7, 3, 1, 9, 9, 9], [4, 1, 6, 6, 6, 6], [2, 8, 6, 1, 9, 9]]  # eos (1) at steps 2, 1 and 3


class FakeDecoder:
    """Stands in for T5.decode: example n emits SCRIPT[n][t] at its step t, which it reads from how many tokens its
    cache has been fed (as a real KV cache knows); it records every call."""

    def __init__(self, vocab=12):
        self.vocab, self.calls = vocab, []

    def __call__(self, ids, enc, enc_mask, adapters=None, cache=None):
        self.calls.append({"ids": ids.clone(), "enc": enc, "enc_mask": enc_mask, "adapters": adapters, "cache": cache})
        seen = ids.shape[1] + (cache[0]["self"].get("fake_seen", 0) if cache else 0)
        if cache:
            cache[0]["self"]["fake_seen"] = seen
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        for n in range(ids.shape[0]):
            logits[n, -1, SCRIPT[n][min(seen - 1, 5)]] = 2.0
            logits[n, -1, 10] = 1.5  # a runner-up: greedy takes the argmax
        return logits


def generating_t5():
    t5 = tiny_t5(decoder_start_token_id=5)
    enc = torch.randn(3, 4, 8)
    encodes, fake = [], FakeDecoder()
    t5.encode = lambda *a, **kw: encodes.append((a, kw)) or enc
    t5.decode = fake
    return t5, enc, encodes, fake


def check_protocol(fake, out, enc, mask, adapters, n_blocks=2):
    """Each step feeds (N, 1): the start token, then the previous step's tokens; one cache, one dict per block."""
    for t, call in enumerate(fake.calls):
        assert call["ids"].shape == (3, 1), (f"decode was fed ids of shape {tuple(call['ids'].shape)} at step {t}: "
                                             "with the KV cache, feed only the newest token (N, 1)")
        prev = [5, 5, 5] if t == 0 else out[:, t - 1].tolist()
        for n in range(3):
            if t == 0 or 1 not in out[n, :t].tolist():
                assert call["ids"][n, 0] == prev[n], (f"step {t} fed token {int(call['ids'][n, 0])} to example {n}"
                                                      f" instead of {prev[n]} (the start token "
                                                      "config.decoder_start_token_id = 5, then the last output)")
        assert call["enc"] is enc, "decode must get the encoder output"
        assert torch.equal(torch.as_tensor(call["enc_mask"]), mask), "decode must get the encoder's mask"
        assert call["adapters"] is adapters, "decode must get the adapters"
        cache = call["cache"]
        assert isinstance(cache, list) and len(cache) == n_blocks and all(
            isinstance(c, dict) and set(c) == {"self", "cross"} for c in cache), \
            f"the cache must be one {{'self': {{}}, 'cross': {{}}}} per decoder block ({n_blocks}), got {cache!r}"[:300]
        assert cache is fake.calls[0]["cache"], f"step {t} got a new cache: make it once, before the loop"


@pytest.mark.E5
def test_generate_greedy_until_every_sequence_ends():
    t5, enc, encodes, fake = generating_t5()
    ids, mask, adapters = torch.ones(3, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]] * 2)[:3], {}
    out = t5.generate(ids, mask, max_new_tokens=6, adapters=adapters)
    assert len(encodes) == 1, f"encode was called {len(encodes)} times: once is enough"
    a, kw = encodes[0]
    got = dict(zip(("input_ids", "attention_mask", "adapters"), a), **kw)
    assert got.get("input_ids") is ids and got.get("attention_mask") is mask and got.get("adapters") is adapters, \
        "encode must get (input_ids, attention_mask, adapters)"
    check_protocol(fake, out, enc, mask, adapters)
    want = [[7, 3, 1, 0], [4, 1, 0, 0], [2, 8, 6, 1]]
    assert out.dtype == torch.long and out.tolist() == want, (
        f"generated {out.tolist()}, expected {want}: greedy tokens, pad (0) after eos (1), stop once all have "
        "ended")
    assert len(fake.calls) == 4, f"{len(fake.calls)} decode steps for 4 tokens"


@pytest.mark.E5
def test_generate_stops_at_max_new_tokens_and_takes_encoder_states():
    t5, enc, encodes, fake = generating_t5()
    out = t5.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)
    assert out.tolist() == [[7, 3], [4, 1], [2, 8]], f"generated {out.tolist()} with max_new_tokens = 2"
    t5, enc, encodes, fake = generating_t5()
    given = torch.randn(3, 4, 8)
    out = t5.generate(encoder_hidden_states=given, max_new_tokens=6)
    assert not encodes, "with encoder_hidden_states there is nothing to encode"
    check_protocol(fake, out, given, torch.ones(3, 4, dtype=torch.long), None)
    assert out.tolist() == [[7, 3, 1, 0], [4, 1, 0, 0], [2, 8, 6, 1]], f"generated {out.tolist()}"
    t5, *_ = generating_t5()
    out = t5.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=0)
    assert out.shape == (3, 0) and out.dtype == torch.long, f"max_new_tokens = 0 gave {out.dtype} {tuple(out.shape)}"


# --------------------------------------------------------------------------------------------- E6 masked mean
@pytest.mark.E6
def test_masked_mean_hand_built():
    x = torch.tensor([[[1, 10], [3, 30], [100, 100], [-7, 7]], [[2, 4], [4, 8], [6, 12], [8, 16]],
                      [[5, 5], [5, 5], [5, 5], [5, 5]]], dtype=F64)
    masked_mean = mod("hypernet").masked_mean
    want = torch.tensor([[2, 20], [5, 10], [0, 0]], dtype=F64)  # the last row has no real token: 0, not NaN
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    for m, kind in ((mask, "long"), (mask.bool(), "bool"), (mask.float(), "float")):
        got = masked_mean(x, m)
        assert got.dtype == F64, f"dtype {got.dtype}: the result has x's dtype"
        close(got, want, 1e-12, f"masked_mean with a {kind} mask")


# ----------------------------------------------------------------------------------------------- E7 hypernet
def hypernet_by_hand(hn, states, mask):
    """Eq. 2 written out target by target, in float64, from the network's own weights (init "official": no frozen
    copy, the rank-r pair)."""
    def lin(layer, v):
        return layer.weight.double() @ v + layer.bias.double()
    out = {p: ([], []) for p in hn.targets}
    r = hn.rank
    for n in range(states.shape[0]):
        real = [states[n, j].double() for j in range(states.shape[1]) if mask[n, j]]
        z = lin(hn.task_proj, sum(real) / max(1, len(real)))
        for g, idx in enumerate(hn.groups):
            d_in, d_out = hn.heads.shapes[g]
            for i in idx:
                e = hn.layer_emb.weight[hn.layer_ids[i]].double() + hn.kind_emb.weight[hn.kind_ids[i]].double()
                h = torch.relu(lin(hn.mlp[2], torch.relu(lin(hn.mlp[0], torch.cat([z, e])))))
                A, B = lin(hn.heads.A[g], h).view(r, d_in), lin(hn.heads.B[g], h).view(d_out, r)
                if hn.heads0 is not None:
                    A0, B0 = lin(hn.heads0.A[g], h).view(r, d_in), lin(hn.heads0.B[g], h).view(d_out, r)
                    A, B = torch.cat([A, A0], 0), torch.cat([B, -B0], 1)
                out[hn.targets[i]][0].append(A)
                out[hn.targets[i]][1].append(B * hn.scale)
    return {p: (torch.stack(a), torch.stack(b)) for p, (a, b) in out.items()}


def tiny_hypernet(perturb: bool, **kw):
    hypernet = mod("hypernet")
    t5 = tiny_t5()
    targets = hypernet.target_paths(t5, ("q", "v", "wo"))  # two weight shapes: (8 -> 8) and (12 -> 8)
    torch.manual_seed(1)
    hn = hypernet.HyperNetwork(t5, targets, rank=2, alpha=6.0, hidden=5, **kw).double()
    if perturb:  # trained heads differ from their frozen copy (and from N(0, 1e-7) for init "official")
        with torch.no_grad():
            for p in hn.heads.parameters():
                p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    states = torch.randn(2, 4, 8, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    states[mask == 0] = 1e3  # padding must not count
    return hn, states, mask


@pytest.mark.E7
@pytest.mark.parametrize("init", ["offset", "official"])
def test_hypernetwork_matches_eq2_by_hand(init):
    hn, states, mask = tiny_hypernet(perturb=True, init=init)
    got, want = hn(states, mask), hypernet_by_hand(hn, states, mask)
    assert set(got) == set(want), f"paths {sorted(got)}, expected every target {sorted(want)}"
    pair = ("[A ; A0], (N, 2r, in)", "[B , -B0]·α/r, (N, out, 2r)") if init == "offset" else \
        ("A, (N, r, in)", "B·α/r, (N, out, r)")
    for p in hn.targets:
        close(got[p][0], want[p][0], 1e-10, f"A of {p} ({pair[0]}, init {init!r})")
        close(got[p][1], want[p][1], 1e-10, f"B of {p} ({pair[1]}, init {init!r})")


@pytest.mark.E7
def test_hypernetwork_update_is_zero_at_initialisation():
    """heads == heads0 at initialisation, so [B, -B0]·[A; A0] = B A - B0 A0 = 0 for every instruction."""
    hn, states, mask = tiny_hypernet(perturb=False)
    for p, (A, B) in hn(states, mask).items():
        close(B @ A, torch.zeros(B.shape[0], B.shape[1], A.shape[2]), 1e-12,
              f"update B·A of {p} at initialisation (the frozen copy must cancel the heads)")


# -------------------------------------------------------------------------------------------- E8 fusion memory
class FakeFusion(torch.nn.Module):
    """Stands in for a FusionLayer: records its inputs and adds a constant."""

    def __init__(self, i):
        super().__init__()
        self.i, self.seen = i, []

    def forward(self, x, ctx, ctx_bias):
        self.seen.append((x, ctx, ctx_bias))
        return torch.full_like(x, float(self.i + 1))


def memory_case(fusion):
    tagi = mod("tagi")
    model = tagi.TAGI(tiny_t5(), tagi.TAGIConfig(rank=2, alpha=2.0, hidden=4, fusion=fusion))
    calls, enc = [], torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    probe = torch.randn(2, 3, 8)

    def encode(input_ids, attention_mask=None, adapters=None, fuse=None):
        calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "adapters": adapters, "fuse": fuse,
                      "fused": None if fuse is None else [f(probe) for f in fuse]})
        return enc
    model.t5.encode = encode
    if fusion == "encoder":
        model.fusion = torch.nn.ModuleList([FakeFusion(i) for i in range(len(model.t5.encoder.block))])
    g = torch.Generator().manual_seed(3)
    args = dict(input_ids=torch.tensor([[4, 5, 1], [6, 1, 0]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
                states=torch.randn(2, 2, 8, generator=g, dtype=F64), smask=torch.tensor([[1, 1], [1, 0]]),
                adapters={"sentinel": None})
    return model, args, calls, enc, probe


def check_encode_call(calls, args):
    assert len(calls) == 1, f"t5.encode was called {len(calls)} times"
    c = calls[0]
    assert c["input_ids"] is args["input_ids"] and c["attention_mask"] is args["attention_mask"], \
        "t5.encode must get the instance (input_ids, attention_mask)"
    assert c["adapters"] is args["adapters"], "t5.encode must get the adapters"
    return c


@pytest.mark.E8
@pytest.mark.parametrize("fusion", ["concat", "encoder"])
def test_student_memory_puts_the_instruction_beside_the_instance(fusion):
    model, args, calls, enc, probe = memory_case(fusion)
    mem, mmask = model.student_memory(**args)
    c = check_encode_call(calls, args)
    if fusion == "concat":
        assert c["fuse"] is None, "fusion 'concat' passes fuse=None to the encoder"
    else:
        assert c["fuse"] is not None and len(c["fuse"]) == 2, "fusion 'encoder': one fuse callable per encoder block"
        neg = torch.finfo(F64).min
        for i, (f, fused) in enumerate(zip(model.fusion, c["fused"])):
            close(fused, torch.full((2, 3, 8), float(i + 1)), 0, f"fuse[{i}](x) must be fusion layer {i}'s output")
            x, ctx, bias = f.seen[0]
            assert x is probe and ctx is args["states"], f"fuse[{i}](x) must call fusion[{i}](x, states, bias)"
            close(bias, torch.tensor([[[[0.0, 0.0]]], [[[0.0, neg]]]], dtype=F64), 0,
                  f"the bias fusion[{i}] gets (additive_mask of smask: 0 for real tokens, finfo.min for padding)")
    assert mem.dtype == torch.float32, f"memory dtype {mem.dtype}: the instruction states take enc's dtype"
    assert mem.shape == (2, 5, 8), f"memory shape {tuple(mem.shape)}, expected (N, s + S, D) = (2, 5, 8)"
    close(mem[:, :2], args["states"].float(), 0, "memory[:, :s] must be the instruction states I_x")
    close(mem[:, 2:], enc, 0, "memory[:, s:] must be the encoded instance")
    close(mmask, [[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], 0, "the memory's mask [smask ; attention_mask]")


@pytest.mark.E8
def test_student_memory_without_fusion_is_the_encoder_output():
    model, args, calls, enc, _ = memory_case("none")
    mem, mmask = model.student_memory(**args)
    c = check_encode_call(calls, args)
    assert c["fuse"] is None, "fusion 'none' passes fuse=None"
    assert mem is enc and mmask is args["attention_mask"], "fusion 'none': (enc, attention_mask), no instruction"


# ------------------------------------------------------------------------------------------- E9 - E12 losses
LN = math.log


def ce_case():
    """Four real tokens whose NLL is known by hand, padding holding large logits."""
    logits = torch.zeros(2, 3, 4, dtype=F64)
    logits[0, 1] = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64))  # target 2: -ln(3/10)
    logits[0, 2] = 1e4                                                        # padding
    logits[1, 0] = 5 + torch.log(torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=F64))  # target 3: -ln(4/8)
    logits[1, 1] = torch.tensor([1e4, -1e4, 0, 0])                            # padding
    logits[1, 2] = torch.tensor([0.0, 10.0, 0.0, 0.0])                        # target 1: ln(1 + 3 e^-10)
    labels = torch.tensor([[2, 2, -100], [3, -100, 1]])                       # [0, 0]: uniform, target 2: ln 4
    total = LN(4) + LN(10 / 3) + LN(2) + math.log1p(3 * math.exp(-10))
    return logits, labels, total


@pytest.mark.E9
def test_ce_loss_hand_built():
    logits, labels, total = ce_case()
    ce_loss = mod("tagi").ce_loss
    close(ce_loss(logits, labels), total / 4, 1e-12, "L_ce, the mean over the 4 real tokens")
    close(ce_loss(logits, labels, n_tokens=10), total / 10, 1e-12, "L_ce of a shard (n_tokens = 10)")
    close(ce_loss(logits.float(), labels), total / 4, 1e-5, "L_ce from float32 logits")
    close(ce_loss(logits, torch.full_like(labels, -100)), 0.0, 0, "L_ce of a batch without a real token")


def kl_case():
    """Two real tokens with known distributions at T = 2 (teacher logits T·ln p_t + 3, student T·ln p_s - 1)."""
    T = 2.0
    p_t = torch.tensor([[0.8, 0.1, 0.1], [1 / 3, 1 / 3, 1 / 3]], dtype=F64)
    p_s = torch.tensor([[0.4, 0.4, 0.2], [0.5, 0.25, 0.25]], dtype=F64)
    teacher, student = torch.full((1, 3, 3), 7.0, dtype=F64), torch.full((1, 3, 3), -7.0, dtype=F64)
    teacher[0, [0, 2]], student[0, [0, 2]] = T * torch.log(p_t) + 3, T * torch.log(p_s) - 1
    labels = torch.tensor([[4, -100, 0]])
    kl = [0.5 * LN(2), LN(32 / 27) / 3]              # KL(p_t || p_s) of each token
    reverse = [0.6 * LN(2), 0.5 * LN(9 / 8)]         # KL(p_s || p_t): the wrong direction
    return student, teacher, labels, T, T * T * sum(kl), T * T * sum(reverse)


@pytest.mark.E10
def test_kl_loss_hand_built():
    student, teacher, labels, T, total, reverse = kl_case()
    got = mod("tagi").kl_loss(student, teacher, labels, T)
    d = float(got) if got.numel() == 1 else math.nan
    hint = " (that is KL(p_s || p_t): the direction is reversed)" if abs(d - reverse / 2) < 1e-9 else \
        " (that is without the T² factor)" if abs(d - total / 8) < 1e-9 else ""
    close(got, total / 2, 1e-12, "L_kl = T²·KL(p_t || p_s) averaged over the 2 real tokens, T = 2" + hint)
    close(mod("tagi").kl_loss(student, teacher, labels, T, n_tokens=5), total / 5, 1e-12, "L_kl of a shard "
          "(n_tokens = 5)")
    close(mod("tagi").kl_loss(student.float(), teacher.float(), labels, T), total / 2, 1e-5, "L_kl from float32")


@pytest.mark.E10
def test_kl_loss_switches():
    """t_squared=False drops T²; positions="all" averages over every position, padding included (the padding row
    here is uniform for both, so its KL is 0)."""
    student, teacher, labels, T, total, _ = kl_case()
    kl_loss = mod("tagi").kl_loss
    close(kl_loss(student, teacher, labels, T, t_squared=False), total / T ** 2 / 2, 1e-12, "L_kl without T²")
    close(kl_loss(student, teacher, labels, T, positions="all"), total / 3, 1e-12,
          "L_kl over all 3 positions (positions='all')")
    close(kl_loss(student, teacher, labels, T, n_tokens=6, positions="all"), total / 6, 1e-12,
          "L_kl over all positions of a shard (n_tokens = 6 positions)")


@pytest.mark.E10
def test_kl_loss_ignores_even_nan_at_padding():
    student, teacher, labels, T, total, _ = kl_case()
    student[0, 1], teacher[0, 1] = math.nan, math.nan
    close(mod("tagi").kl_loss(student, teacher, labels, T), total / 2, 1e-12,
          "L_kl with NaN logits at the padding position (select the real tokens before the softmax)")


@pytest.mark.E11
def test_lora_distance_hand_built():
    """B1 A1 = [[2, 0], [0, 0]], B2 A2 = [[0, 0], [0, 1]]: the squared distance is 4 + 1."""
    A1, B1 = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[2.0], [0.0]]])
    A2, B2 = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[0.0], [1.0]]])
    close(mod("tagi").lora_distance(A1, B1, A2, B2), [5.0], 1e-6, "||B1 A1 - B2 A2||²_F")


def delta_by_brute_force(A1, B1, A2, B2):
    return torch.stack([((b1 @ a1 - b2 @ a2) ** 2).sum() for a1, b1, a2, b2 in zip(A1, B1, A2, B2)])


@pytest.mark.E11
def test_lora_distance_matches_the_materialised_update():
    g = torch.Generator().manual_seed(4)
    N, d_in, d_out = 2, 30, 40
    A1, B1 = torch.randn(N, 3, d_in, generator=g, dtype=F64), torch.randn(N, d_out, 3, generator=g, dtype=F64)
    A2, B2 = torch.randn(N, 2, d_in, generator=g, dtype=F64), torch.randn(N, d_out, 2, generator=g, dtype=F64)
    lora_distance = mod("tagi").lora_distance
    close(lora_distance(A1, B1, A2, B2), delta_by_brute_force(A1, B1, A2, B2), 1e-9,
          "lora_distance (ranks 3 and 2) vs the materialised ΔW")
    same = lora_distance(A1.float(), B1.float(), A1.float(), B1.float())
    assert (same >= 0).all() and same.abs().max() < 1e-2, f"distance of an adapter to itself: {same.tolist()}"


@pytest.mark.E11
def test_lora_distance_never_forms_the_update():
    """in = out = 2^20: one (out, in) float32 matrix would take 4 TiB. B1 A1 = J (all ones), B2 A2 = 2 J, so the
    distance is ||J||² = 2^40."""
    n = 2 ** 20
    ones = torch.ones(1, 1, n)
    try:
        got = mod("tagi").lora_distance(ones, ones.mT, ones, 2 * ones.mT)
    except NotImplementedError:
        raise
    except RuntimeError as e:  # the allocator refuses 4 TiB
        raise AssertionError(f"lora_distance of (2^20 x 2^20) updates failed ({str(e)[:90]}): work with the r x r "
                             "Gram matrices, never an (out, in) matrix") from None
    close(got / 2.0 ** 40, [1.0], 1e-5, "lora_distance / 2^40 for B1 A1 = J, B2 A2 = 2 J (n = 2^20)")


def losses_case():
    g = torch.Generator().manual_seed(5)
    logits, t_logits = torch.randn(3, 2, 5, generator=g, dtype=F64), torch.randn(3, 2, 5, generator=g, dtype=F64)
    labels = torch.tensor([[1, 2], [3, -100], [0, 4]])
    shapes = {"p1": (6, 5), "p2": (3, 4)}  # path -> (in, out)
    gen = {p: (torch.randn(2, 4, i, generator=g, dtype=F64), torch.randn(2, o, 4, generator=g, dtype=F64))
           for p, (i, o) in shapes.items()}
    t_ad = {p: (torch.randn(2, 2, i, generator=g, dtype=F64), torch.randn(2, o, 2, generator=g, dtype=F64))
            for p, (i, o) in shapes.items()}
    inv = torch.tensor([0, 1, 0])  # task 0 has two of the three examples
    # the terms by brute force: sums over the 5 real tokens, per-task distances of the materialised updates
    real = [(n, t) for n in range(3) for t in range(2) if labels[n, t] != -100]
    ce_sum = sum(-torch.log_softmax(logits[n, t], -1)[labels[n, t]] for n, t in real)
    kl_sum = 4 * sum((torch.softmax(t_logits[n, t] / 2, -1) * (torch.log_softmax(t_logits[n, t] / 2, -1)
                                                             - torch.log_softmax(logits[n, t] / 2, -1))).sum()
                     for n, t in real)
    per_task = sum(delta_by_brute_force(*gen[p], *t_ad[p]) for p in shapes)
    return (logits, labels, t_logits, gen, t_ad, inv), ce_sum, kl_sum, per_task


NOTES = {"ce": "the mean token NLL", "kl": "T²·KL(p_t || p_s) per real token", "loss": "the weighted sum",
         "ins": "each task's distance weighted by its examples: (2 d_0 + d_1) / N, tasks of inv = (0, 1, 0)"}


def check_terms(out, want, what):
    assert isinstance(out, dict) and set(out) == set(want), \
        f"{what}: returned {sorted(out) if isinstance(out, dict) else type(out)}, expected the keys {sorted(want)}"
    for k, v in want.items():
        close(out[k], v, 1e-10, f"{what}: {k!r} ({NOTES[k]})")


@pytest.mark.E12
def test_combined_loss_weights_every_term():
    tagi = mod("tagi")
    cfg = tagi.TAGIConfig(rank=2, ce_weight=0.7, kl_weight=0.5, ins_weight=0.25, temperature=2.0, ins_mode="delta")
    args, ce_sum, kl_sum, per_task = losses_case()
    ins = (2 * per_task[0] + per_task[1]) / 3  # each task weighted by its examples in the batch
    want = {"ce": ce_sum / 5, "kl": kl_sum / 5, "ins": ins}
    want["loss"] = 0.7 * want["ce"] + 0.5 * want["kl"] + 0.25 * ins
    check_terms(tagi.combined_loss(cfg, *args), want, "Eq. 6 with every term on")
    want = {"ce": ce_sum / 8, "kl": kl_sum / 8, "ins": (2 * per_task[0] + per_task[1]) / 6}
    want["loss"] = 0.7 * want["ce"] + 0.5 * want["kl"] + 0.25 * want["ins"]
    check_terms(tagi.combined_loss(cfg, *args, n_tokens=8, n_examples=6), want, "a shard (n_tokens 8, n_examples 6)")


@pytest.mark.E12
def test_combined_loss_switches_terms_off():
    tagi = mod("tagi")
    args, ce_sum, kl_sum, per_task = losses_case()
    logits, labels, t_logits, gen, t_ad, inv = args
    ins = (2 * per_task[0] + per_task[1]) / 3
    cfg = tagi.TAGIConfig(rank=2, ce_weight=1.0, kl_weight=2.0, ins_weight=3.0, temperature=2.0)
    check_terms(tagi.combined_loss(cfg, *args), {"ce": ce_sum / 5, "kl": kl_sum / 5, "ins": ins,
                                                 "loss": ce_sum / 5 + 2 * kl_sum / 5 + 3 * ins}, "every term on")
    off = tagi.combined_loss(tagi.TAGIConfig(rank=2, kl_weight=0.0, ins_weight=3.0), logits, labels, None, gen, t_ad,
                             inv)
    check_terms(off, {"ce": ce_sum / 5, "ins": ins, "loss": ce_sum / 5 + 3 * ins}, "kl_weight = 0 (no teacher logits)")
    off = tagi.combined_loss(tagi.TAGIConfig(rank=2, ce_weight=0.0, kl_weight=2.0, ins_weight=0.0), logits, labels,
                             t_logits)
    check_terms(off, {"ce": ce_sum / 5, "kl": kl_sum / 5, "loss": 2 * kl_sum / 5},
                "ce_weight = 0 (L_ce still logged), ins_weight = 0 (no adapters)")
    wide_teacher = torch.cat([t_logits, torch.full((3, 2, 3), 50.0, dtype=F64)], -1)  # 3 more vocabulary rows
    off = tagi.combined_loss(tagi.TAGIConfig(rank=2, kl_weight=2.0, ins_weight=0.0), logits, labels, wide_teacher)
    check_terms(off, {"ce": ce_sum / 5, "kl": kl_sum / 5, "loss": ce_sum / 5 + 2 * kl_sum / 5},
                "a teacher with 3 more vocabulary rows (compare the common V)")


# ------------------------------------------------------------------------------------------ E13 Tk-Instruct prompt
TASK = {
    "name": "task7_reverse",
    "Definition": ["  Write the word backwards  ", "A second definition is never used"],
    "Positive Examples": [{"input": "cat", "output": "tac", "explanation": "Letters reversed"},
                          {"input": " Is it dog? ", "output": ["god", "GOD"], "explanation": "d-o-g backwards!"},
                          {"input": "third", "output": "driht"}],
    "Negative Examples": [{"input": "sun", "output": "sun", "explanation": "Not reversed"}],
}
POS1 = " Positive Example 1 -\nInput: cat.\n Output: tac.\n\n"
POS2 = " Positive Example 2 -\nInput: Is it dog?\n Output: god.\n\n"


@pytest.mark.E13
def test_dot_and_instance_text():
    data = mod("data")
    for piece, want in (("Input: cat", "Input: cat."), ("Is it?", "Is it?"), ("a;", "a;"), ("x)", "x)"),
                        ("kurz…", "kurz…."), ("", ".")):
        same_text(data._dot(piece), want, f"_dot({piece!r})")
    same_text(data.instance_text("  bird "), "Now complete the following example -\nInput: bird.\nOutput: ",
              "instance_text('  bird ')")
    same_text(data.instance_text("why?"), "Now complete the following example -\nInput: why?\nOutput: ",
              "instance_text('why?')")


@pytest.mark.E13
def test_prompt_blocks():
    data = mod("data")
    head, blocks = data.prompt_blocks(TASK, num_pos=2, num_neg=1, add_task_name=True, add_explanation=True)
    same_text(head, "task7_reverse. Definition: Write the word backwards.\n\n", "the head (task name on)")
    want = [" Positive Example 1 -\nInput: cat.\n Output: tac.\n Explanation: Letters reversed.\n\n",
            " Positive Example 2 -\nInput: Is it dog?\n Output: god.\n Explanation: d-o-g backwards!\n\n",
            " Negative Example 1 -\nInput: sun.\n Output: sun.\n Explanation: Not reversed.\n\n"]
    assert len(blocks) == 3, f"{len(blocks)} blocks, expected 2 positive + 1 negative"
    for k, (got, w) in enumerate(zip(blocks, want)):
        same_text(got, w, f"block {k} (explanations on)")
    head, blocks = data.prompt_blocks({k: v for k, v in TASK.items() if k != "Negative Examples"}, num_pos=5,
                                      num_neg=1)
    same_text(head, "Definition: Write the word backwards.\n\n", "the head (no task name)")
    assert len(blocks) == 3, f"{len(blocks)} blocks for num_pos=5 on a task with 3 positives and no negatives"
    same_text(blocks[2], " Positive Example 3 -\nInput: third.\n Output: driht.\n\n", "block 2")


@pytest.mark.E13
def test_sni_prompt():
    data = mod("data")
    tail = "Now complete the following example -\nInput: hello world.\nOutput: "
    same_text(data.sni_prompt(TASK, "  hello world "), "Definition: Write the word backwards.\n\n" + POS1 + POS2 + tail,
              "sni_prompt(task, x) (Def + 2 positive examples)")
    same_text(data.sni_prompt(TASK, "x", num_pos=0), "Definition: Write the word backwards.\n\nNow complete the "
              "following example -\nInput: x.\nOutput: ", "sni_prompt(task, x, num_pos=0)")
    same_text(data.sni_prompt(TASK, "x!", num_pos=1, num_neg=1, add_task_name=True, add_explanation=True),
              "task7_reverse. Definition: Write the word backwards.\n\n"
              " Positive Example 1 -\nInput: cat.\n Output: tac.\n Explanation: Letters reversed.\n\n"
              " Negative Example 1 -\nInput: sun.\n Output: sun.\n Explanation: Not reversed.\n\n"
              "Now complete the following example -\nInput: x!\nOutput: ", "sni_prompt with every option on")


# ------------------------------------------------------------------------------------------------ E14 split_abc
@pytest.mark.E14
def test_split_abc_reaches_every_cut_and_only_allowed_ones():
    ids, caps = list(range(100, 110)), (6, 5, 4)
    allowed = {(a, b, 10 - a - b) for a, b in itertools.product(range(1, 7), range(1, 6)) if 1 <= 10 - a - b <= 4}
    seen = set()
    split_abc = mod("data").split_abc
    for seed in range(3000):
        a, b, c = split_abc(ids, random.Random(seed), *caps)
        assert list(a) + list(b) + list(c) == ids, f"seed {seed}: a + b + c = {list(a) + list(b) + list(c)} is not " \
            f"the whole sequence {ids} (it fits the caps {caps})"
        seen.add((len(a), len(b), len(c)))
    assert not seen - allowed, f"cuts (len a, len b, len c) outside the caps {caps} or empty: {sorted(seen - allowed)}"
    assert not allowed - seen, (f"allowed cuts never drawn in 3000 splits: {sorted(allowed - seen)} (an off-by-one in "
                                "a bound? rng.randint includes both ends)")


@pytest.mark.E14
def test_split_abc_places_a_window_in_a_long_sequence():
    ids, split_abc = list(range(20)), mod("data").split_abc
    starts = set()
    for seed in range(800):
        a, b, c = split_abc(ids, random.Random(seed), 3, 3, 3)
        assert (len(a), len(b), len(c)) == (3, 3, 3), f"lengths {(len(a), len(b), len(c))} with caps (3, 3, 3)"
        w = list(a) + list(b) + list(c)
        assert w == ids[w[0]:w[0] + 9], f"a + b + c = {w} is not a contiguous window of the sequence"
        starts.add(w[0])
    assert starts == set(range(12)), f"window starts never drawn: {sorted(set(range(12)) - starts)}"
    rng = random.Random(0)
    for n, caps in ((3, (1, 1, 1)), (50, (7, 2, 30)), (200, (40, 40, 5))):
        a, b, c = split_abc(list(range(n)), rng, *caps)
        assert all(1 <= len(p) <= m for p, m in zip((a, b, c), caps)), f"n {n}, caps {caps}: lengths " \
            f"{(len(a), len(b), len(c))}"
    for bad in (([1, 2], (5, 5, 5)), ([1, 2, 3], (0, 5, 5))):
        with pytest.raises(ValueError):
            split_abc(bad[0], random.Random(0), *bad[1])


# --------------------------------------------------------------------------------------------------- E15 get_lr
@pytest.mark.E15
def test_get_lr_landmarks():
    get_lr = mod("train").get_lr
    cos = 2.0 * (0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))
    for step, steps, lr, warmup, want, what in (
            (0, 100, 2.0, 0.1, 0.2, "first warmup step: lr·1/w"), (4, 100, 2.0, 0.1, 1.0, "warmup step 5 of 10"),
            (9, 100, 2.0, 0.1, 2.0, "last warmup step reaches lr"), (10, 100, 2.0, 0.1, 2.0, "cosine starts at lr"),
            (55, 100, 2.0, 0.1, 1.1, "half-way down: (lr + lr/10) / 2"), (99, 100, 2.0, 0.1, cos, "one step before "
                                                                          "the end"),
            (100, 100, 2.0, 0.1, 0.2, "would end at lr / 10"), (0, 50, 1.0, 0.0, 1.0, "no warmup: w = 1"),
            (0, 25, 1.0, 0.1, 0.5, "w = int(2.5) = 2"), (1, 25, 1.0, 0.1, 1.0, "w = int(2.5) = 2"),
            (0, 1, 3.0, 0.5, 3.0, "one step")):
        got = get_lr(step, steps, lr, warmup)
        close(got, want, 1e-12, f"get_lr(step={step}, steps={steps}, lr={lr}, warmup={warmup}) ({what})")
    for step, want in ((3, 0.8), (9, 2.0), (10, 2.0), (99, 2.0)):
        close(get_lr(step, 100, 2.0, 0.1, schedule="constant"), want, 1e-12,
              f"get_lr(step={step}, steps=100, lr=2.0, warmup=0.1, schedule='constant')")


# ---------------------------------------------------------------------------------------- E16 rank classification
class WordTokenizer:
    """Just enough of data.Tokenizer: one id per known word (3 ...), then eos (1)."""
    words = "q1 q2 q3 q4 q5 x yy z aaa b read-me pick-one p1 p2".split()

    def encode(self, text):
        return [3 + self.words.index(w) for w in text.split()] + [1]

    def decode(self, ids):
        return " ".join(self.words[i - 3] for i in ids if i >= 3)


ITEMS = [  # task A: prompts p1 (one item) and p2 (two items); task B: prompt p1 (two items)
    {"inputs": "q1", "choices": ["x", "yy", "z"], "answer": 1, "task": "A", "prompt": "p1", "instruction": "read-me"},
    {"inputs": "q2", "choices": ["x", "yy"], "answer": 0, "task": "A", "prompt": "p2"},
    {"inputs": "q3", "choices": ["x", "yy"], "answer": 1, "task": "A", "prompt": "p2"},
    {"inputs": "q4", "choices": ["aaa", "b"], "answer": 0, "task": "B", "prompt": "p1", "instruction": "pick-one"},
    {"inputs": "q5", "choices": ["aaa", "b"], "answer": 1, "task": "B", "prompt": "p1", "instruction": "pick-one"},
]
SCORES = {("q1", "x"): 2.0, ("q1", "yy"): 0.5, ("q1", "z"): 0.7, ("q2", "x"): 0.9, ("q2", "yy"): 1.0,
          ("q3", "x"): 0.3, ("q3", "yy"): 0.3, ("q4", "aaa"): 0.1, ("q4", "b"): 0.2, ("q5", "aaa"): 0.3,
          ("q5", "b"): 0.35}  # q3 is a tie (the first choice wins: wrong); q5 picks the wrong choice
PREDICTIONS = [1, 0, 0, 0, 0]
# A: p1 100 %, p2 50 % -> 75; B: p1 50 % -> 50; accuracy (75 + 50) / 2


def rank_nll(rows):
    """A scorer that reads each row back from the batch, checks what it was given, and looks its score up."""
    tok = WordTokenizer()

    def nll(b):
        n = len(b["labels"])
        for key in ("input_ids", "attention_mask", "prompt_ids", "prompt_mask", "instruction_ids", "instruction_mask",
                    "labels", "task_idx"):
            assert key in b and torch.is_tensor(b[key]) and len(b[key]) == n, f"the batch needs a tensor {key!r} " \
                f"with one row per (item, choice)"
        assert torch.equal(b["prompt_ids"], b["input_ids"]), "prompt_ids must equal input_ids (P3 bakes the prompt in)"
        out = []
        for j in range(n):
            i = int(b["task_idx"][j])
            it = ITEMS[i]
            x = tok.decode(b["input_ids"][j][b["attention_mask"][j].bool()].tolist())
            ins = tok.decode(b["instruction_ids"][j][b["instruction_mask"][j].bool()].tolist())
            lab = b["labels"][j]
            choice = tok.decode(lab[lab != -100].tolist())
            assert x == it["inputs"], f"row {len(rows)}: input {x!r} for item {i} ({it['inputs']!r})"
            assert ins == it.get("instruction", it["prompt"]), f"row {len(rows)}: instruction {ins!r} for item {i}"
            assert b["task_names"][j] == f"{it['task']}/{it['prompt']}" and b["categories"][j] == it["task"], \
                f"row {len(rows)}: task_names / categories {b['task_names'][j]!r} / {b['categories'][j]!r}"
            rows.append((i, choice))
            out.append(SCORES[it["inputs"], choice])
        return torch.tensor(out)
    return nll


@pytest.mark.E16
@pytest.mark.parametrize("batch_size", [64, 2])
def test_rank_classification(batch_size):
    rows = []
    res = mod("evaluate").rank_classification(rank_nll(rows), ITEMS, WordTokenizer(), "cpu", batch_size=batch_size)
    want_rows = [(i, c) for i, it in enumerate(ITEMS) for c in it["choices"]]
    assert sorted(rows) == sorted(want_rows), f"scored rows {rows}, expected every (item, choice) once: {want_rows}"
    for i, (got, want) in enumerate(zip(res["predictions"], PREDICTIONS)):
        assert got == want, (f"choice {got} chosen instead of {want} for item {i} (scores "
                             f"{[SCORES[ITEMS[i]['inputs'], c] for c in ITEMS[i]['choices']]}: the lowest wins, the "
                             "first on a tie)")
    assert len(res["predictions"]) == len(ITEMS), f"{len(res['predictions'])} predictions for {len(ITEMS)} items"
    assert list(res["per_task"]) == ["A", "B"], f"per_task keys {list(res['per_task'])}"
    close(torch.tensor([res["per_task"]["A"], res["per_task"]["B"]], dtype=F64), [75.0, 50.0], 1e-9,
          "per-task accuracy % (A: mean of its prompts 100 and 50; B: 50)")
    close(res["accuracy"], 62.5, 1e-9, "accuracy % (the mean over tasks)")
