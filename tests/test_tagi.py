"""TAGI (tagi.py): step-0 equivalence with the base T5, the three losses against brute-force references, which
parameters learn, adapters generated once per task, the teacher bank's independence, and checkpoints."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import tagi
from hypernet import LoRABank
from model import T5, T5Config
from tagi import TAGI, TAGIConfig, kl_loss, lora_distance

VOCAB = 64


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    t5 = T5(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
                     dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)).eval()
    with torch.no_grad():
        t5.lm_head.weight.mul_(0.2)  # logits of order 1-5, as a trained model's
    return t5


def tiny_tagi(fusion="concat", seed=0, **kw):
    t5 = tiny_t5(seed)
    torch.manual_seed(seed + 1)
    return TAGI(t5, TAGIConfig(rank=4, alpha=8.0, hidden=32, fusion=fusion, **kw))


def make_batch(task_idx, seed=0, S=9, s=7, P=14, T=6):
    """Examples of several tasks: each task has one instruction (padded to different lengths), each example an
    instance input, the full prompt (for the teacher) and labels, all padded; labels padded with -100."""
    g = torch.Generator().manual_seed(seed)
    task_idx = torch.tensor(task_idx)
    N, U = len(task_idx), int(task_idx.max()) + 1

    def padded(n, L, lengths):
        ids = torch.randint(2, VOCAB, (n, L), generator=g)
        mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
        return ids.masked_fill(mask == 0, 0), mask

    ins, ins_mask = padded(U, s, [s - (u % 3) * 2 for u in range(U)])
    x, mask = padded(N, S, [S - (i % 4) * 2 for i in range(N)])
    prompt, prompt_mask = padded(N, P, [P - (i % 3) * 3 for i in range(N)])
    labels = torch.randint(2, VOCAB, (N, T), generator=g)
    labels[1, 3:] = -100
    labels[-1, 5:] = -100
    return dict(input_ids=x, attention_mask=mask, instruction_ids=ins[task_idx], instruction_mask=ins_mask[task_idx],
                prompt_ids=prompt, prompt_mask=prompt_mask, labels=labels, task_idx=task_idx)


def teacher_bank(model, num, seed=3):
    bank = LoRABank(model.t5, model.targets, num, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for B in bank.B:  # PEFT starts B at zero; a trained teacher's is not
            B.copy_(torch.randn(B.shape, generator=g) * 0.3)
    return bank.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Step 0: the student is the base T5 with the instruction in its cross-attention memory


def base_logits(t5, b, fusion):
    """What the student computes at initialisation, written with plain T5 calls (no adapters, no fusion)."""
    with torch.no_grad():
        if fusion == "none":
            return t5(b["input_ids"], b["attention_mask"], labels=b["labels"]).logits
        mem = torch.cat([t5.encode(b["instruction_ids"], b["instruction_mask"]),
                         t5.encode(b["input_ids"], b["attention_mask"])], 1)  # (N, s + S, D): [I_x ; enc(x)]
        mmask = torch.cat([b["instruction_mask"], b["attention_mask"]], 1)
        return t5(attention_mask=mmask, encoder_hidden_states=mem, labels=b["labels"]).logits


@pytest.mark.parametrize("fusion", ["none", "concat", "encoder"])
def test_student_equals_base_t5_at_init(fusion):
    model = tiny_tagi(fusion).eval()
    b = make_batch([0, 1, 0, 2, 1])
    with torch.no_grad():
        logits, gen, tasks = model.student(b)
    ref = base_logits(model.t5, b, fusion)
    # the generated update B A - B0 A0 is 0 in exact arithmetic, ~1e-7 relative in float32 (measured ~1e-6 here)
    assert (logits - ref).abs().max().item() <= 1e-5
    if fusion != "none":  # the instruction really is in the memory: the comparison tells fusion modes apart
        assert (ref - base_logits(model.t5, b, "none")).abs().max().item() > 1e-2
    assert torch.equal(tasks, torch.tensor([0, 1, 2]))
    assert set(gen) == set(model.targets) and len(model.targets) == 12
    for p, (A, B) in gen.items():  # (U, 2r, in), (U, out, 2r)
        assert A.shape[:2] == (3, 8) and B.shape[0] == 3 and B.shape[2] == 8
        dW = (B.double() @ A.double()).flatten(1).norm(dim=1)  # materialised, per task
        bound = B.double().flatten(1).norm(dim=1) * A.double().flatten(1).norm(dim=1)
        assert (bound > 0).all() and (dW <= 1e-6 * bound).all(), p


# ----------------------------------------------------------------------------------------------------------------
# What learns and what does not


TRUNK = ("hypernet.task_proj", "hypernet.layer_emb", "hypernet.kind_emb", "hypernet.mlp")


@pytest.mark.parametrize("fusion", ["concat", "encoder"])
def test_what_learns_at_step_0_and_after_and_base_stays_frozen(fusion):
    """ΔW ≡ 0 at init for every instruction, so step 0 trains only the heads (A and B, as LoRA's B = 0 trains B)
    and the fusion weights; the trunk's gradient is exactly 0 then. After one step every trainable weight learns."""
    model = tiny_tagi(fusion, kl_weight=0.5, ins_weight=0.1).train()
    bank = teacher_bank(model, 3)
    b = make_batch([0, 1, 0, 2, 1])
    t5_before = {k: v.clone() for k, v in model.t5.state_dict().items()}
    frozen = [model.hypernet.heads0] + ([f.frozen for f in model.fusion] if fusion == "encoder" else [])
    frozen_before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # everything, as a careless user would
    for step in range(2):
        opt.zero_grad()
        out = model.loss(b, bank, torch.tensor([2, 0, 1]))
        assert {"ce", "kl", "ins", "loss"} <= set(out) and out["kl"] > 0 and out["ins"] > 0
        out["loss"].backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert {n.split(".")[0] for n, _ in trainable} == ({"hypernet", "fusion"} if fusion == "encoder" else
                                                            {"hypernet"})
        for n, p in trainable:
            if step == 0 and n.startswith(TRUNK):
                assert p.grad is None or p.grad.abs().max() == 0, n
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, (step, n)
        for n, p in model.t5.named_parameters():
            assert not p.requires_grad and p.grad is None, n
        assert all(p.grad is None for p in bank.parameters()) and all(
            p.grad is None for m in frozen for p in m.parameters())
        opt.step()
    for k, v in model.t5.state_dict().items():
        assert torch.equal(v, t5_before[k]), k
    for m, before in zip(frozen, frozen_before):  # the frozen offsets (hypernetwork heads, fusion copies) too
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
    assert not torch.equal(model.hypernet.heads.B[0].weight, model.hypernet.heads0.B[0].weight)


def directional_derivatives(f, tensors, seed=0, eps=1e-6):
    """(autograd, central finite difference) of f along one random direction in the given float64 tensors."""
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in tensors]
    auto = sum((gr * v).sum() for gr, v in zip(torch.autograd.grad(f(), tensors), vs)).item()
    with torch.no_grad():
        def shifted(c):
            for t, v in zip(tensors, vs):
                t.add_(c * eps * v)
            return f().item()
        fd = (shifted(1) - shifted(-2)) / (2 * eps)
        shifted(1)
    return auto, fd


def moved_tagi(fusion):
    """A float64 TAGI whose trainable weights have moved away from their frozen offsets (as after training)."""
    model = tiny_tagi(fusion).double().train()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 * p.std() if p.numel() > 1 else 0.1))
    return model


@pytest.mark.parametrize("group", ["trunk", "heads", "fusion"])
def test_gradients_equal_finite_differences(group):
    """The backward pass is the gradient of the forward: autograd against central differences in float64, through
    the whole student (hypernetwork -> adapters -> encoder with fusion -> decoder), for the trunk, the heads and
    the fusion weights. (Feeding the frozen copies a stop-gradient made the trunk's gradient 10-40 % wrong.)"""
    model = moved_tagi("encoder")
    b = make_batch([0, 1, 0, 2, 1])
    w = torch.randn(b["labels"].shape + (VOCAB,), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    prefix = {"trunk": TRUNK, "heads": ("hypernet.heads.",), "fusion": ("fusion.",)}[group]
    tensors = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)]
    assert tensors
    auto, fd = directional_derivatives(lambda: (model.student(b)[0] * w).sum(), tensors)
    assert abs(auto - fd) <= 1e-6 * abs(fd) and abs(fd) > 1e-3, (auto, fd)


def test_fusion_layer_input_gradients_equal_finite_differences():
    """The gradient FusionLayer passes to the instance states x and the instruction states (which reach earlier
    encoder layers and their adapters) is exact too."""
    f = moved_tagi("encoder").fusion[0]
    g = torch.Generator().manual_seed(2)
    x, ctx = (torch.randn(3, n, 32, generator=g, dtype=torch.float64, requires_grad=True) for n in (5, 4))
    bias = tagi.additive_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]), torch.float64)
    w = torch.randn(3, 5, 32, generator=g, dtype=torch.float64)
    for t in (x, ctx):
        auto, fd = directional_derivatives(lambda: (f(x, ctx, bias) * w).sum(), [t])
        assert abs(auto - fd) <= 1e-6 * abs(fd) and abs(fd) > 1e-3, (auto, fd)


# ----------------------------------------------------------------------------------------------------------------
# The loss terms against brute-force references


def test_kl_loss_matches_brute_force_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    N, T, V, temp = 3, 5, 11, 2.5
    s, t = torch.randn(N, T, V, generator=g) * 3, torch.randn(N, T, V, generator=g) * 3
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, 3:], labels[2, 1:] = -100, -100
    pad = labels == -100
    s[pad] = torch.randn(int(pad.sum()), V, generator=g) * 1e4  # garbage where there is no target
    t[pad] = -torch.randn(int(pad.sum()), V, generator=g) * 1e4
    total, count = 0.0, 0
    for i in range(N):
        for j in range(T):
            if labels[i, j] == -100:
                continue
            p_t = torch.distributions.Categorical(logits=t[i, j].double() / temp)
            p_s = torch.distributions.Categorical(logits=s[i, j].double() / temp)
            total += torch.distributions.kl_divergence(p_t, p_s).item()
            count += 1
    ref = temp ** 2 * total / count
    got = kl_loss(s, t, labels, temp).item()
    assert abs(got - ref) <= 1e-5 * ref
    assert kl_loss(t, t, labels, temp).item() == 0.0


def test_kl_loss_ignores_nonfinite_padding():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[3, 4, -100, -100], [1, 2, 5, -100]])
    with torch.no_grad():
        ref = kl_loss(s, t, labels, 2.0)
        t[labels == -100] = float("nan")
        s[labels == -100] = float("inf")
    got = kl_loss(s, t, labels, 2.0)
    got.backward()
    assert torch.allclose(got, ref) and torch.isfinite(s.grad).all()


def test_lora_distance_equals_materialised_frobenius():
    g = torch.Generator().manual_seed(0)
    N, d_in, d_out, r1, r2 = 3, 20, 24, 6, 3
    A1, B1 = torch.randn(N, r1, d_in, generator=g), torch.randn(N, d_out, r1, generator=g)
    A2, B2 = torch.randn(N, r2, d_in, generator=g), torch.randn(N, d_out, r2, generator=g)
    ref = (B1.double() @ A1.double() - B2.double() @ A2.double()).pow(2).sum((1, 2))  # (N,)
    got = lora_distance(A1, B1, A2, B2)
    assert got.shape == (N,)
    assert ((got.double() - ref).abs() <= 1e-5 * ref).all()
    # gauge invariance: the same update written with other factors is at distance ~0 (relative to ||ΔW||²)
    G = torch.randn(N, r1, r1, generator=g) + 3 * torch.eye(r1)
    same = lora_distance(A1, B1, G @ A1, B1 @ torch.linalg.inv(G))
    assert (same <= 1e-5 * (B1 @ A1).pow(2).sum((1, 2))).all()


def test_loss_is_the_weighted_sum_and_terms_switch_off(monkeypatch):
    model = tiny_tagi("concat", kl_weight=0.3, ins_weight=0.7).eval()
    bank, tmap = teacher_bank(model, 3), torch.tensor([1, 2, 0])
    b = make_batch([0, 1, 0, 2, 1], seed=4)
    teacher_calls = []
    model.t5.register_forward_hook(lambda m, i, o: teacher_calls.append(1))  # only the teacher calls t5(...)
    with torch.no_grad():
        full = model.loss(b, bank, tmap)
    assert len(teacher_calls) == 1
    ce, kl, ins = full["ce"], full["kl"], full["ins"]
    assert torch.allclose(full["loss"], ce + 0.3 * kl + 0.7 * ins, rtol=1e-6, atol=0)
    assert min(ce, kl, ins) > 0

    def boom(*a, **k):
        raise AssertionError("a term switched off was computed")

    with torch.no_grad():
        model.cfg = replace(model.cfg, kl_weight=0.0)
        with monkeypatch.context() as mp:
            mp.setattr(tagi, "kl_loss", boom)
            no_kl = model.loss(b, bank, tmap)
        assert "kl" not in no_kl and len(teacher_calls) == 1  # no teacher forward either
        assert torch.allclose(no_kl["loss"], ce + 0.7 * ins, rtol=1e-6, atol=0)

        model.cfg = replace(model.cfg, kl_weight=0.3, ins_weight=0.0)
        with monkeypatch.context() as mp:
            mp.setattr(tagi, "ins_loss", boom)
            no_ins = model.loss(b, bank, tmap)
        assert "ins" not in no_ins and torch.allclose(no_ins["loss"], ce + 0.3 * kl, rtol=1e-6, atol=0)

        model.cfg = replace(model.cfg, ce_weight=0.0, ins_weight=0.7)
        no_ce = model.loss(b, bank, tmap)
        assert torch.allclose(no_ce["loss"], 0.3 * kl + 0.7 * ins, rtol=1e-6, atol=0)

        model.cfg = replace(model.cfg, ce_weight=1.0, kl_weight=0.0, ins_weight=0.0)
        ce_only = model.loss(b)  # no teacher needed
        assert torch.allclose(ce_only["loss"], ce, rtol=1e-6, atol=0) and set(ce_only) == {"ce", "loss"}
    # each term against its own reference
    with torch.no_grad():
        logits, gen, tasks = model.student(b)
        t_logits = model.t5(b["prompt_ids"], b["prompt_mask"], labels=b["labels"],
                            adapters=bank(tmap[b["task_idx"]])).logits
    keep = b["labels"] != -100
    assert torch.allclose(ce, F.cross_entropy(logits[keep], b["labels"][keep]), rtol=1e-6)
    assert torch.allclose(kl, kl_loss(logits, t_logits, b["labels"], model.cfg.temperature), rtol=1e-6)
    t_ad = bank(tmap[tasks])
    per_task = sum(lora_distance(A, B, *t_ad[p]) for p, (A, B) in gen.items())  # (U,) summed over targets
    ref_ins = per_task[torch.searchsorted(tasks, b["task_idx"])].mean()  # each task weighted by its examples
    assert torch.allclose(ins, ref_ins, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Adapters once per task


def test_adapters_generated_once_per_distinct_task():
    model = tiny_tagi("concat").eval()
    with torch.no_grad():  # move away from the step-0 zero update so that tasks' adapters differ visibly
        for p in model.hypernet.heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    b = make_batch([2, 0, 2, 1, 0, 2])
    sizes, seen = [], []
    model.hypernet.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    q = model.t5.adaptable()["encoder.block.0.layer.0.SelfAttention.q"]
    q.register_forward_pre_hook(lambda m, args: args[1] and seen.append(args[1][m.path]))  # instance pass only
    with torch.no_grad():
        _, gen, tasks = model.student(b)
    assert sizes == [3] and torch.equal(tasks, torch.tensor([0, 1, 2]))
    A, B = seen[0]  # the per-example factors that reached the Linear: (N, 2r, in), (N, out, 2r)
    assert A.shape[0] == 6
    for i, t in enumerate(b["task_idx"].tolist()):
        assert torch.equal(A[i], gen[q.path][0][t]) and torch.equal(B[i], gen[q.path][1][t])
    assert not torch.allclose(A[0], A[1]) and not torch.allclose(B[0], B[3])
    # and a task's adapter does not depend on which other tasks share the batch
    with torch.no_grad():
        _, alone, _ = model.student(make_batch([0, 0]))
    assert torch.allclose(alone[q.path][1][0], gen[q.path][1][0], atol=1e-6)
    sizes.clear()
    with torch.no_grad():
        model.generate(b, max_new_tokens=3)
    assert sizes == [3]


# ----------------------------------------------------------------------------------------------------------------
# The teacher bank: training all tasks at once == training each alone


def per_task_ce(logits, labels, task_idx):
    """Sum over the tasks present of that task's mean token CE: the rows of the bank then learn independently."""
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    nll = nll.view(labels.shape)
    total = 0.0
    for t in task_idx.unique():
        sel = (task_idx == t)[:, None] & (labels != -100)
        total = total + nll[sel].sum() / sel.sum()
    return total


def test_bank_trains_tasks_independently():
    t5 = tiny_t5()
    targets = TAGI(t5, TAGIConfig(rank=4, hidden=8)).targets
    torch.manual_seed(0)
    joint = LoRABank(t5, targets, num=2, rank=4, alpha=8.0)
    alone = []
    for k in range(2):
        bk = LoRABank(t5, targets, num=1, rank=4, alpha=8.0)
        with torch.no_grad():
            for Pa, Pj in zip(list(bk.A) + list(bk.B), list(joint.A) + list(joint.B)):
                Pa.copy_(Pj[k:k + 1])
        alone.append(bk)
    make_opt = lambda bank: torch.optim.AdamW(bank.parameters(), lr=1e-2, weight_decay=0.01)  # noqa: E731
    opts = [make_opt(joint)] + [make_opt(bk) for bk in alone]
    for step in range(5):
        b = make_batch([0, 1, 1, 0, 1], seed=10 + step)
        x, mask, y, tid = b["prompt_ids"], b["prompt_mask"], b["labels"], b["task_idx"]
        losses = [per_task_ce(t5(x, mask, labels=y, adapters=joint(tid)).logits, y, tid)]
        for k, bk in enumerate(alone):
            sel = tid == k
            losses.append(per_task_ce(t5(x[sel], mask[sel], labels=y[sel], adapters=bk(tid[sel] * 0)).logits,
                                      y[sel], tid[sel]))
        for opt, loss in zip(opts, losses):
            opt.zero_grad()
            loss.backward()
            opt.step()
    moved = 0.0
    for k, bk in enumerate(alone):
        for Pa, Pj in zip(list(bk.A) + list(bk.B), list(joint.A) + list(joint.B)):
            assert (Pa[0] - Pj[k]).abs().max().item() <= 1e-5
            moved = max(moved, Pj[k].abs().max().item())
    assert moved > 1e-2  # B started at zero: the bank did learn
    assert all(p.grad is None for p in t5.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("fusion", ["concat", "encoder", "none"])
def test_save_load_round_trip(fusion, tmp_path):
    model = tiny_tagi(fusion, kl_weight=0.0).train()
    b = make_batch([0, 1, 0, 2, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # move the trainable weights away from their frozen offsets
        opt.zero_grad()
        model.loss(b)["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ref, _, _ = model.student(b)
        base = base_logits(model.t5, b, fusion)
    assert (ref - base).abs().max().item() > 1e-3  # trained: no longer the base model
    model.save(tmp_path / "ck", base_model="tiny", step=2)
    torch.manual_seed(123)  # a fresh model built inside load starts from other random weights
    loaded = TAGI.load(tmp_path / "ck", model.t5).eval()
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        out, _, _ = loaded.student(b)
    assert torch.equal(out, ref)
    if fusion == "encoder":
        for f, g in zip(model.fusion, loaded.fusion):
            for (k, v), (k2, v2) in zip(f.frozen.state_dict().items(), g.frozen.state_dict().items()):
                assert k == k2 and torch.equal(v, v2), k
    assert torch.equal(loaded.generate(b, max_new_tokens=4), model.generate(b, max_new_tokens=4))


# ----------------------------------------------------------------------------------------------------------------
# The exported PEFT adapter


@pytest.mark.parametrize("fusion", ["none", "concat"])
def test_exported_adapter_is_the_student_exactly_without_fusion(fusion, tmp_path):
    """With --fusion none the PEFT adapter `tagi.py adapter` writes is the evaluated student (PEFT's logits equal
    TAGI's); with fusion it is not (the decoder's instruction states are left out) and the export says so."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = tiny_tagi(fusion).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move the heads away from their frozen copy: a trained hypernetwork
        for p in model.hypernet.heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std())
    b = make_batch([0, 0, 0])
    with torch.no_grad():
        ours = model.student(b)[0]
        gen = model.task_adapters(b["instruction_ids"][:1], b["instruction_mask"][:1])[2]
    tagi.export_peft(gen, tmp_path / "ad")
    model.t5.save_pretrained(tmp_path / "t5")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5").eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    with torch.no_grad():
        theirs = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).logits
    gap = (theirs - ours).abs().max().item()
    notes = tagi.export_caveats(model.cfg)
    if fusion == "none":
        assert gap <= 1e-4 and notes == []
    else:
        assert gap > 1e-2 and len(notes) == 1 and "--fusion concat" in notes[0] and "tagi-adapter" in notes[0]
    with torch.no_grad():  # and what the export leaves out is what the `tagi-adapter` row evaluates
        alone = model.t5(b["input_ids"], b["attention_mask"], labels=b["labels"],
                         adapters={p: (A.expand(3, -1, -1), B.expand(3, -1, -1)) for p, (A, B) in gen.items()}).logits
        assert torch.equal(model.generate_adapters_only(b, 4), model.t5.generate(
            b["input_ids"], b["attention_mask"], 4, adapters={p: (A.expand(3, -1, -1), B.expand(3, -1, -1))
                                                               for p, (A, B) in gen.items()}))
    assert (theirs - alone).abs().max().item() <= 1e-4
