"""The switches that reproduce the official TAGI code (issue 10): pooling "first_last", init "official", and the
L_ins modes "params" and "official" (with σ(L)·L in the loss). Each test checks what its switch changes, against a
hand computation or transformers' T5 (the official code's own encoder)."""
import json

import pytest
import torch
import torch.nn.functional as F

import train
from conftest import random_hf_t5
from hypernet import LoRABank
from model import T5, T5Config, load_safetensors
from tagi import TAGI, TAGIConfig, combined_loss, ins_loss

F64 = torch.float64
VOCAB = 64
KW = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
          dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # q, v: 32 -> 32


def tiny(seed=0, dtype=F64, **kw):
    """A float64 TAGI on a random tiny T5 (rank 4); kw go to TAGIConfig."""
    torch.manual_seed(seed)
    t5 = T5(T5Config(**KW)).eval()
    torch.manual_seed(seed + 1)
    return TAGI(t5, TAGIConfig(rank=4, alpha=8.0, hidden=16, **kw)).to(dtype).eval()


def instructions(pad=0, seed=0):
    """Two instructions (U = 2, s = 7), the second with 3 padding positions; `pad` more padding columns."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    ids, mask = F.pad(ids.masked_fill(mask == 0, 0), (0, pad)), F.pad(mask, (0, pad))
    return ids, mask


def perturb(module, scale=0.05, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def assert_close(got, want, tol):
    assert got.shape == want.shape and (got - want).abs().max().item() <= tol, (got - want).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# pooling


def test_first_last_pooling_is_block0_plus_final_averaged_over_all_positions():
    model = tiny(pooling="first_last")
    t5, (ids, mask) = model.t5, instructions()
    with torch.no_grad():  # block 0 by hand: embeddings, the encoder's position bias and padding mask, block[0]
        bias = t5.encoder.block[0].layer[0].SelfAttention.position_bias(7, 7, True, t5.config).double()
        bias = bias + (1.0 - mask[:, None, None, :].double()) * torch.finfo(F64).min
        block0 = t5.encoder.block[0](t5.shared(ids), bias)
        pooled = (t5.encode(ids, mask) + block0).mean(1)  # (U, D): every position, padding included
        got = model.task_adapters(ids, mask)[2]
        want = model.hypernet(pooled[:, None], torch.ones(2, 1))  # a one-position "instruction" holding the vector
    for p in model.targets:
        assert_close(got[p][0], want[p][0], 1e-12)


def test_first_last_pooling_equals_the_official_line_on_transformers(hf_float64):
    """The official collator: (hidden_states[-1] + hidden_states[1]).mean(dim=1) of transformers' T5 encoder."""
    hf = random_hf_t5(KW, std=0.3).double()
    model = tiny(pooling="first_last")
    model.t5.load_state_dict(hf.state_dict())
    ids, mask = instructions()
    with torch.no_grad():
        hs = hf.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = model.task_adapters(ids, mask)[2]
        want = model.hypernet((hs[-1] + hs[1]).mean(dim=1)[:, None], torch.ones(2, 1))
    for p in model.targets:
        assert_close(got[p][0], want[p][0], 1e-10)


def test_first_last_pooling_sees_padding_and_mean_pooling_does_not():
    ids, mask = instructions()
    long_ids, long_mask = instructions(pad=5)
    for pooling, moves in (("mean", False), ("first_last", True)):
        model = tiny(pooling=pooling)
        with torch.no_grad():
            short, long = model.task_adapters(ids, mask), model.task_adapters(long_ids, long_mask)
        assert_close(long[0][:, :7], short[0], 1e-12)  # I_x itself (fusion's input) ignores padding either way
        change = max((long[2][p][0] - short[2][p][0]).abs().max().item() for p in model.targets)
        assert (change > 1e-4) if moves else (change < 1e-12), (pooling, change)


# ----------------------------------------------------------------------------------------------------------------
# init


def test_official_init_draws_heads_from_1e_7_without_frozen_copy_and_gives_rank_r():
    model, offset = tiny(init="official"), tiny()
    hn = model.hypernet
    w = torch.cat([lin.weight.flatten() for lin in [*hn.heads.A, *hn.heads.B]])
    assert 0.9e-7 < w.std().item() < 1.1e-7 and w.abs().max().item() < 1e-6
    assert all((lin.bias == 0).all() for lin in [*hn.heads.A, *hn.heads.B])
    assert hn.heads0 is None and not any("heads0" in k for k in model.state_dict())
    assert any("heads0" in k for k in offset.state_dict())
    ids, mask = instructions()
    with torch.no_grad():
        gen, gen_offset = model.task_adapters(ids, mask)[2], offset.task_adapters(ids, mask)[2]
    for p, (A, B) in gen.items():
        lin = model.t5.adaptable()[p]
        assert A.shape == (2, 4, lin.in_features) and B.shape == (2, lin.out_features, 4)  # rank r, not 2r
        assert gen_offset[p][0].shape[1] == 8
        delta = (B @ A).abs().max().item()
        assert 0 < delta < 1e-10, delta  # ΔW ≈ 0, not exactly 0
    # B carries the scale α/r (the official 1/√r is alpha = √rank): doubling alpha doubles B, leaves A
    twice = TAGI(model.t5, TAGIConfig(rank=4, alpha=16.0, hidden=16, init="official")).double()
    twice.load_state_dict(model.state_dict())
    with torch.no_grad():
        gen2 = twice.task_adapters(ids, mask)[2]
    for p in gen:
        assert_close(gen2[p][0], gen[p][0], 0.0)
        assert_close(gen2[p][1], 2 * gen[p][1], 1e-20)


def test_save_load_round_trip_official_init(tmp_path):
    model = tiny(dtype=torch.float32, init="official", pooling="first_last", ins_mode="params")  # stored as is
    perturb(model.hypernet)
    model.save(tmp_path / "ckpt")
    assert not any("heads0" in k for k in load_safetensors(tmp_path / "ckpt" / "tagi.safetensors"))
    assert json.loads((tmp_path / "ckpt" / "tagi.json").read_text())["config"]["init"] == "official"
    back = TAGI.load(tmp_path / "ckpt", model.t5).eval()
    assert (back.cfg.init, back.cfg.pooling, back.cfg.ins_mode) == ("official", "first_last", "params")
    ids, mask = instructions()
    with torch.no_grad():
        a, b = model.task_adapters(ids, mask)[2], back.task_adapters(ids, mask)[2]
    for p in a:
        assert_close(b[p][0], a[p][0], 0.0)
        assert_close(b[p][1], a[p][1], 0.0)


# ----------------------------------------------------------------------------------------------------------------
# L_ins modes


@pytest.mark.parametrize("mode", ["params", "official"])
def test_factor_modes_refuse_the_offset_init(mode):
    with pytest.raises(ValueError, match="use ins_mode 'delta' or init 'official'"):
        tiny(ins_mode=mode, ins_weight=1.0)
    tiny(ins_mode=mode, init="official")  # accepted


def bank_for(model, seed=3):
    bank = LoRABank(model.t5, model.targets, 2, rank=4, alpha=4.0).double()
    perturb(bank, 0.3, seed)
    return bank.requires_grad_(False)


def test_params_mode_is_the_factor_mse_of_what_is_applied():
    model = tiny(init="official", ins_mode="params")
    perturb(model.hypernet, 0.2)
    bank, ids, mask = bank_for(model), *instructions()
    with torch.no_grad():
        gen, t_ad = model.task_adapters(ids, mask)[2], bank()
        got = ins_loss(gen, t_ad, "params", 4)
    want = torch.zeros(2, dtype=F64)
    for u in range(2):
        for p in model.targets:
            (A, B), (At, Bt) = gen[p], t_ad[p]
            want[u] += ((A[u] - At[u]) ** 2).sum() / At[u].numel() + ((B[u] - Bt[u]) ** 2).sum() / Bt[u].numel()
    assert_close(got, want, 1e-12)


def official_case(seed=0, scale=1.0):
    """Hand-built factors in PEFT orientation: 2 tasks, 3 targets with in = out = 6, rank 2."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: scale * torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    gen = {f"m{i}": (r(2, 2, 6), r(2, 6, 2)) for i in range(3)}   # A (U, r, in), B (U, out, r)
    t_ad = {f"m{i}": (r(2, 2, 6), r(2, 6, 2)) for i in range(3)}
    return gen, t_ad


def test_official_mode_is_the_official_loramse_on_its_stacked_tensors():
    gen, t_ad = official_case()
    # the official cal_loramse, per example: x·A_gen·B_gen with A_gen = Aᵀ (in, r), B_gen = Bᵀ (r, out) stacked
    # over targets on dim 1, against the teacher's PEFT lora_A (r, in) / lora_B (out, r) stacked the same way
    param_A = torch.cat([A.mT.unsqueeze(1) for A, _ in gen.values()], 1)   # (U, M, in, r)
    param_B = torch.cat([B.mT.unsqueeze(1) for _, B in gen.values()], 1)   # (U, M, r, out)
    lora_A = torch.cat([At.unsqueeze(1) for At, _ in t_ad.values()], 1)   # (U, M, r, in)
    lora_B = torch.cat([Bt.unsqueeze(1) for _, Bt in t_ad.values()], 1)   # (U, M, out, r)
    for u in range(2):
        want = (F.mse_loss(param_A[u], lora_B[u]) + F.mse_loss(param_B[u], lora_A[u])) * 1000
        assert_close(ins_loss(gen, t_ad, "official", 2)[u], want, 1e-9)
    # it is 0 when B A is the transpose of the teacher's update, not when it is the update
    transposed = {p: (Bt.mT, At.mT) for p, (At, Bt) in t_ad.items()}
    assert ins_loss(transposed, t_ad, "official", 2).abs().max() == 0
    assert ins_loss(t_ad, t_ad, "official", 2).min() > 1
    with pytest.raises(ValueError, match="needs equal shapes"):
        ins_loss({p: (A[:, :1], B[:, :, :1]) for p, (A, B) in gen.items()}, t_ad, "official", 2)


def test_official_mode_enters_the_loss_as_sigmoid_L_times_L():
    gen, t_ad = official_case(scale=0.02)  # L of order 1, where σ(L) is far from 0 and 1
    g = torch.Generator().manual_seed(1)
    logits, labels, inv = torch.randn(3, 2, 5, generator=g, dtype=F64), torch.tensor([[1, 2], [3, -100], [0, 4]]), \
        torch.tensor([0, 1, 0])
    per_task = ins_loss(gen, t_ad, "official", 2)
    L = (2 * per_task[0] + per_task[1]) / 3
    assert 0.2 < torch.sigmoid(L) < 0.9 and 0.2 < torch.sigmoid(per_task).min() < torch.sigmoid(per_task).max() < 0.95
    for mode, term in (("official", torch.sigmoid(L) * L), ("delta", None)):
        cfg = TAGIConfig(rank=2, kl_weight=0.0, ins_weight=0.5, ins_mode=mode, init="official")
        out = combined_loss(cfg, logits, labels, None, gen, t_ad, inv)
        if mode == "official":
            assert_close(out["ins"], L, 1e-9)
            assert_close(out["loss"], out["ce"] + 0.5 * term, 1e-9)
        else:  # the default keeps the plain λ2·L
            assert_close(out["loss"], out["ce"] + 0.5 * out["ins"], 0.0)
    # a shard of 3 of 6 examples: σ of its own mean, times its share of the global mean
    out = combined_loss(TAGIConfig(rank=2, kl_weight=0.0, ins_weight=1.0, ins_mode="official", init="official"),
                        logits, labels, None, gen, t_ad, inv, n_tokens=10, n_examples=6)
    assert_close(out["loss"] - out["ce"], torch.sigmoid(L) * L / 2, 1e-9)


def test_official_mode_through_TAGI_loss():
    model = tiny(init="official", ins_mode="official", ins_weight=2.0, kl_weight=0.0)
    perturb(model.hypernet, 0.01)
    bank, (ids, mask) = bank_for(model), instructions()
    g = torch.Generator().manual_seed(4)
    task_idx = torch.tensor([0, 1, 1])
    batch = dict(input_ids=torch.randint(2, VOCAB, (3, 5), generator=g), attention_mask=torch.ones(3, 5).long(),
                 instruction_ids=ids[task_idx], instruction_mask=mask[task_idx],
                 labels=torch.randint(2, VOCAB, (3, 4), generator=g), task_idx=task_idx)
    with torch.no_grad():
        for B in bank.B:  # a teacher close to the generated factors: L of order 1, where σ(L) is not 0 or 1
            B.mul_(0.01)
        for A in bank.A:
            A.mul_(0.02)
        out = model.loss(batch, bank, torch.tensor([1, 0]))
        per_task = ins_loss(model.task_adapters(ids, mask)[2], bank(torch.tensor([1, 0])), "official", 4)
    L = (per_task[0] + 2 * per_task[1]) / 3
    assert 0.2 < torch.sigmoid(L) < 0.9, L
    assert_close(out["ins"], L, 1e-9)
    assert_close(out["loss"], out["ce"] + 2.0 * torch.sigmoid(L) * L, 1e-9)


# ----------------------------------------------------------------------------------------------------------------
# train.py


def test_train_flags_reach_the_tagi_config():
    t = train.tagi_config(train.parse_args(["--pooling", "first_last", "--init", "official", "--ins_mode", "official"]))
    assert (t.pooling, t.init, t.ins_mode) == ("first_last", "official", "official")
    d = train.tagi_config(train.parse_args([]))
    assert (d.pooling, d.init, d.ins_mode) == ("mean", "offset", "delta")
    for flag, bad in (("--pooling", "max"), ("--init", "zero"), ("--ins_mode", "nope")):
        with pytest.raises(SystemExit):
            train.parse_args([flag, bad])
