"""Properties that one-line bugs break while every other test still passes (issue 12, part 4).

Each test states what the code promises, not how it computes it: the task vector ignores padding; the update is
(α/r)·B·A; every window start and cut of a|b|c is reachable; each epoch is its own permutation; buckets are runs of
prompt-length order; P3 accuracy is a mean over prompts, then over tasks; the warmup's closed form; k accumulated
micro-batches are one batch k times larger, step for step; the teachers' loss is one token mean per key.
Every test uses α ≠ r where a scale is involved, and unequal token counts where a mean is involved."""
import copy
import json
import random
from collections import Counter
from itertools import product

import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
import train
from hypernet import HyperNetwork, LoRABank, masked_mean, target_paths
from model import T5, T5Config
from tagi import TAGI, TAGIConfig

VOCAB = 60


def tiny_t5(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    t5 = T5(T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_heads=2, num_layers=1, num_decoder_layers=1,
                     dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    return t5.to(dtype).eval()


def padded(lengths, width=None, seed=0, value=0):
    """Random ids (N, L) with row i real up to lengths[i] and `value` after it, and the mask (N, L)."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return torch.randint(2, VOCAB, (len(lengths), width), generator=g).masked_fill(mask == 0, value), mask


class CharTokenizer:
    """Just enough of data.Tokenizer for Batcher and rank_classification: one id per character, then eos 1."""
    eos_id = 1

    def encode(self, text, add_eos=True):
        return [3 + ord(c) % 50 for c in text] + ([1] if add_eos else [])


# ----------------------------------------------------------------------------------------------------------------
# hypernet.py: the task vector is a mean over real tokens; the update is (α/r)·B·A


def test_masked_mean_is_the_mean_of_real_tokens_whatever_the_padding():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3]
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=g)
    mask = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).long()
    got = masked_mean(x, mask)
    for i, n in enumerate(lengths):
        assert torch.allclose(got[i], x[i, :n].mean(0), rtol=1e-12, atol=0)
    # garbage at the padding, and four more padding columns, change nothing
    more = torch.cat([x.masked_fill(mask[..., None] == 0, 1e6), torch.full((3, 4, 4), -1e6, dtype=x.dtype)], 1)
    assert torch.allclose(masked_mean(more, F.pad(mask, (0, 4))), got, rtol=1e-12, atol=0)


def test_an_instructions_adapters_do_not_depend_on_its_padding():
    """The same instructions, padded to their own longest or to 6 more tokens of garbage: the same adapters."""
    t5 = tiny_t5()
    torch.manual_seed(1)
    tagi = TAGI(t5, TAGIConfig(rank=2, alpha=2.0, hidden=8)).eval()
    ids, mask = padded([7, 2, 4], seed=2)
    long_ids, long_mask = padded([7, 2, 4], width=13, seed=3, value=0)
    long_ids[:, :7] = ids
    long_ids[long_mask == 0] = torch.randint(2, VOCAB, (int((long_mask == 0).sum()),))  # padding that is not 0
    with torch.no_grad():
        _, _, short = tagi.task_adapters(ids, mask)
        _, _, long = tagi.task_adapters(long_ids, long_mask)
    for p in short:
        for a, b in zip(short[p], long[p]):
            assert torch.allclose(a, b, rtol=0, atol=1e-5), p


def test_hypernetwork_update_scales_as_alpha_over_r():
    """Same weights, α = r vs α = 3r: B (and so ΔW = B·A) exactly 3 times larger, A unchanged."""
    t5 = tiny_t5()
    targets = target_paths(t5, ("q", "v", "wo"))
    nets = []
    for alpha in (4.0, 12.0):
        torch.manual_seed(0)
        nets.append(HyperNetwork(t5, targets, rank=4, alpha=alpha, hidden=8))
    with torch.no_grad():  # move away from ΔW = 0 at init, identically in both
        for p in nets[0].heads.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    nets[1].load_state_dict(nets[0].state_dict())
    g = torch.Generator().manual_seed(4)
    states, mask = torch.randn(2, 5, 16, generator=g), padded([5, 3])[1]
    with torch.no_grad():
        lo, hi = (n(states, mask) for n in nets)
    for p in targets:
        (A1, B1), (A3, B3) = lo[p], hi[p]
        assert torch.equal(A1, A3), p
        assert torch.allclose(B3, 3 * B1, rtol=1e-6, atol=0), p
        dW = B1 @ A1
        assert dW.abs().max() > 1e-3 and torch.allclose(B3 @ A3, 3 * dW, rtol=1e-5, atol=1e-7), p


def test_lora_bank_equals_merged_weights_with_alpha_over_r():
    """PEFT's convention with α ≠ r: T5 + key k's LoRA == T5 with W + (α/r)·B_k·A_k merged into each target."""
    t5 = tiny_t5(dtype=torch.float64)
    targets = target_paths(t5, ("q", "v", "wi_0", "wo"))
    torch.manual_seed(0)
    bank = LoRABank(t5, targets, num=3, rank=2, alpha=7.0).double()
    with torch.no_grad():
        for B in bank.B:  # PEFT starts B at 0; a trained teacher's is not
            B.normal_(0, 0.5)
    x, mask = padded([6, 4], seed=1)
    y = padded([3, 5], seed=2, value=-100)[0]
    k = 1
    merged = copy.deepcopy(t5)
    lins = merged.adaptable()
    with torch.no_grad():
        for p, A, B in zip(targets, bank.A, bank.B):
            lins[p].weight += 7.0 / 2 * B[k] @ A[k]
        ref = merged(x, mask, labels=y).logits
        got = t5(x, mask, labels=y, adapters=bank.get(k)).logits
        plain = t5(x, mask, labels=y).logits
    assert (ref - plain).abs().max() > 1e-2  # the update is visible
    assert torch.allclose(got, ref, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# data.py: a|b|c splits, epochs, length bucketing


def test_split_abc_reaches_every_window_start_and_every_cut():
    # a long sequence: the window (9 tokens) starts anywhere in 0..3, each about as often
    ids = list(range(100, 112))
    starts = Counter(data.split_abc(ids, random.Random(s), 3, 3, 3)[0][0] - 100 for s in range(800))
    assert set(starts) == {0, 1, 2, 3} and all(150 <= c <= 250 for c in starts.values()), starts
    # a short one: the window is the whole sequence, and every (len a, len b, len c) within the caps occurs
    ids = list(range(10))
    seen = {tuple(map(len, data.split_abc(ids, random.Random(s), 6, 5, 4))) for s in range(3000)}
    valid = {(a, b, c) for a, b, c in product(range(1, 7), range(1, 6), range(1, 5)) if a + b + c == 10}
    assert seen == valid


def example(i, source, prompt, target="t", task="task"):
    return data.Example(task, "instruction", source, prompt, target, [target], str(i), "category")


def epoch_orders(index_of_position, n, epochs):
    orders = [tuple(index_of_position(e * n + i) for i in range(n)) for e in range(epochs)]
    for o in orders:
        assert sorted(o) == list(range(n))  # each epoch visits every item once
    return orders


def test_text_stream_draws_a_new_permutation_every_epoch():
    """PretrainBatcher: document k is k+3 repeated, so each row of input_ids names its document."""
    n, B = 8, 4
    orders = {}
    for seed in (0, 1):
        pb = data.PretrainBatcher([[k + 3] * 5 for k in range(n)], batch_size=B, seed=seed)
        doc = lambda p: int(pb.batch(p // B)["input_ids"][p % B, 0]) - 3  # noqa: E731
        orders[seed] = epoch_orders(doc, n, 6)
        assert len(set(orders[seed])) == 6, orders[seed]  # six epochs, six different orders
        assert orders[seed][0] != tuple(range(n))
    assert orders[0] != orders[1]
    again, p = data.PretrainBatcher([[k + 3] * 5 for k in range(n)], batch_size=B, seed=0), 5 * B + 2
    assert int(again.batch(5)["input_ids"][2, 0]) - 3 == orders[0][p // n][p % n]  # any step, in any order of calls


def test_example_stream_draws_a_new_permutation_every_epoch():
    n, B = 12, 3
    exs = [example(i, f"s{i}", f"p{i}") for i in range(n)]
    b = data.Batcher(exs, CharTokenizer(), B, seed=5)
    orders = epoch_orders(lambda p: b.global_indices(p // B)[p % B], n, 5)
    assert len(set(orders)) == 5 and orders[0] != tuple(range(n))
    fixed = data.Batcher(exs, CharTokenizer(), B, seed=5, shuffle=False)
    assert epoch_orders(lambda p: fixed.global_indices(p // B)[p % B], n, 3) == [tuple(range(n))] * 3


def test_bucketed_batches_are_runs_of_prompt_length_order():
    """Prompt lengths drawn independently of source and target lengths (and with ties, which the source length
    breaks): within each window, the batches are consecutive runs of the window's examples sorted by
    (prompt length, source length), and the window holds the same examples as without bucketing."""
    rng = random.Random(0)
    n, B, W = 48, 4, 3  # 4 windows of 3 batches
    exs = [example(i, "s" * rng.randint(1, 30), "p" * rng.randint(1, 8), "t" * rng.randint(1, 30))
           for i in range(n)]
    tok = CharTokenizer()
    bucketed = data.Batcher(exs, tok, B, seed=2, bucket=True, bucket_window=W)
    plain = data.Batcher(exs, tok, B, seed=2)
    key = lambda i: (len(tok.encode(exs[i].prompt)), len(tok.encode(exs[i].source)))  # noqa: E731
    for w in range(2 * n // (B * W)):  # two epochs
        batches = [bucketed.global_indices(w * W + k) for k in range(W)]
        assert sorted(sum(batches, [])) == sorted(i for k in range(W) for i in plain.global_indices(w * W + k))
        runs = sorted((sorted(key(i) for i in b) for b in batches))
        flat = sum(runs, [])
        assert flat == sorted(flat), (w, runs)
    pad_b = sum(bucketed.batch(s)["prompt_ids"].shape[1] for s in range(n // B))
    pad_p = sum(plain.batch(s)["prompt_ids"].shape[1] for s in range(n // B))
    assert pad_b < pad_p


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py: P3 accuracy is averaged over prompts within a task, then over tasks


def test_p3_accuracy_is_a_mean_over_prompts_then_tasks():
    """The shorter choice always wins (nll = its token count). Task A: prompt p1 has three items, all right
    (100%), p2 one item, wrong (0%) -> 50. Task B: one prompt, one item, wrong -> 0. Accuracy 25; a mean over
    items would give 60, over all prompts 33.3, over items within each task then tasks 37.5."""
    def item(task, prompt, answer):
        return {"inputs": f"{task} {prompt}", "choices": ["a", "bb"], "answer": answer, "task": task,
                "prompt": prompt}
    items = [item("A", "p1", 0), item("B", "p1", 1), item("A", "p1", 0), item("A", "p2", 1), item("A", "p1", 0)]
    res = evaluate.rank_classification(lambda b: (b["labels"] != -100).sum(1).float(), items, CharTokenizer(),
                                       "cpu", batch_size=4)
    assert res["predictions"] == [0] * 5
    assert res["per_task"] == {"A": 50.0, "B": 0.0}
    assert res["accuracy"] == 25.0


# ----------------------------------------------------------------------------------------------------------------
# train.py: the schedule, gradient accumulation, the teachers' loss


def test_warmup_then_cosine_closed_form():
    lr = 0.3
    # 105 steps, warmup 5% -> int(5.25) = 5 warmup steps: lr·1/5, ..., lr·5/5 (the last warmup step is the peak)
    assert [train.get_lr(k, 105, lr, 0.05) for k in range(5)] == pytest.approx([lr * k / 5 for k in range(1, 6)],
                                                                             rel=1e-12)
    assert train.get_lr(5, 105, lr, 0.05) == pytest.approx(lr, rel=1e-12)  # the cosine starts at the peak...
    assert train.get_lr(55, 105, lr, 0.05) == pytest.approx(0.55 * lr, rel=1e-12)  # ...halfway: (1 + 0.1) / 2
    assert train.get_lr(105, 105, lr, 0.05) == pytest.approx(0.1 * lr, rel=1e-12)  # ...and would end at lr/10
    lrs = [train.get_lr(k, 105, lr, 0.05) for k in range(105)]
    assert max(lrs) == pytest.approx(lr, rel=1e-12) and lrs[0] > 0
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:5])) and all(a > b for a, b in zip(lrs[5:], lrs[6:]))
    # fewer warmup steps than one: the first step already runs at the peak
    assert train.get_lr(0, 20, lr, 0.02) == pytest.approx(lr, rel=1e-12)
    assert train.get_lr(0, 20, lr, 0.0) == pytest.approx(lr, rel=1e-12)


class RowsBatcher:
    """batch(i) = rows [i·B, (i+1)·B) of a fixed list, padded: so micro-batches 3s, 3s+1, 3s+2 of size B are
    exactly batch s of size 3B. Target lengths vary a lot, so each micro-batch has its own share of the tokens."""

    def __init__(self, B, n=48, seed=0):
        rng = random.Random(seed)
        self.B, self.rows = B, []
        for i in range(n):
            S, T = rng.randint(2, 9), rng.choice([1, 2, 12, 20])
            self.rows.append(([rng.randrange(2, VOCAB) for _ in range(S)], [rng.randrange(2, VOCAB) for _ in range(T)],
                              rng.randrange(4)))

    def batch(self, i, rank=0, world_size=1):
        rows = [self.rows[j % len(self.rows)] for j in range(i * self.B, (i + 1) * self.B)]
        out = {}
        out["input_ids"], out["attention_mask"] = data.pad([r[0] for r in rows])
        out["prompt_ids"], out["prompt_mask"] = out["input_ids"], out["attention_mask"]
        out["labels"], _ = data.pad([r[1] for r in rows], value=-100)
        out["task_idx"] = torch.tensor([r[2] for r in rows])
        return out


def teacher_objective(t5, keys_of_tasks=(0, 1, 1, 2), alpha=6.0):
    torch.manual_seed(1)
    bank = LoRABank(t5, target_paths(t5, ("q", "v")), 3, rank=2, alpha=alpha).to(next(t5.parameters()).dtype)
    return train.TeacherObjective(t5, bank, torch.tensor(keys_of_tasks), use_prompt=True)


@pytest.mark.parametrize("stage", ["base", "teachers"])
def test_grad_accum_equals_one_batch_k_times_larger(stage, tmp_path):
    """4 optimizer steps of 3 micro-batches of 2 == 4 steps of one batch of 6: the logged losses and learning
    rates step for step, and the trained parameters (float64; no clipping, which would hide a wrong scale)."""
    runs = {}
    for accum, B in ((3, 2), (1, 6)):
        t5 = tiny_t5(seed=0, dtype=torch.float64)
        obj = train.BaseObjective(t5.train()) if stage == "base" else teacher_objective(t5)
        cfg = train.Config(steps=4, lr=1e-2, grad_accum=accum, warmup=0.5, clip=0.0, log_every=1, save_every=1000)
        d = tmp_path / f"accum{accum}"
        d.mkdir()
        init = {n: p.detach().clone() for n, p in obj.named_parameters() if p.requires_grad}
        train.fit(cfg, stage, d, obj, RowsBatcher(B), torch.device("cpu"))
        runs[accum] = init, obj, [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
    (init, obj3, log3), (_, obj1, log1) = runs[3], runs[1]
    assert [r["step"] for r in log3] == [1, 2, 3, 4]
    # warmup 50% of 4 steps: lr/2, lr, then the cosine from lr: lr, 0.55 lr
    assert [r["lr"] for r in log3] == [r["lr"] for r in log1] == pytest.approx([5e-3, 1e-2, 1e-2, 0.55e-2], rel=1e-12)
    assert [r["loss"] for r in log3] == pytest.approx([r["loss"] for r in log1], abs=1.1e-5)  # logged to 5 decimals
    one = dict(obj1.named_parameters())
    moved = 0.0
    for n, p in obj3.named_parameters():
        if n in init:
            assert (p - one[n]).abs().max() <= 1e-7, n
            moved = max(moved, (p - init[n]).abs().max().item())
    assert moved > 1e-3  # it did train


def test_teachers_loss_is_one_token_mean_per_key():
    """Keys with 1, 23 and 5 target tokens: the loss is the sum over keys of each key's own token mean, and each
    key's LoRA gets exactly the gradient of its own mean, as if it were trained alone."""
    t5 = tiny_t5(dtype=torch.float64)
    obj = teacher_objective(t5)  # tasks 0, 1, 2, 3 -> keys 0, 1, 1, 2
    with torch.no_grad():
        for B in obj.bank.B:
            B.normal_(0, 0.5)
    task_idx = torch.tensor([1, 0, 2, 3, 1, 3])
    ids, mask = padded([5, 3, 7, 4, 6, 2], seed=1)
    labels = padded([8, 1, 12, 3, 3, 2], seed=2, value=-100)[0]  # key 0: 1 token, key 1: 23, key 2: 5
    batch = {"prompt_ids": ids, "prompt_mask": mask, "input_ids": ids, "attention_mask": mask, "labels": labels,
             "task_idx": task_idx}
    loss = obj(batch, obj.count(batch))["loss"]
    key = obj.key_of_task[task_idx]
    alone = []
    for k in range(3):
        sel = key == k
        logits = t5(ids[sel], mask[sel], labels=labels[sel], adapters=obj.bank.get(k)).logits
        alone.append(F.cross_entropy(logits.flatten(0, 1), labels[sel].flatten(), ignore_index=-100))
    assert torch.allclose(loss, sum(alone), rtol=1e-6, atol=0)
    params = list(obj.bank.parameters())
    grads = torch.autograd.grad(loss, params)
    for k in range(3):
        own = torch.autograd.grad(alone[k], params)
        for g, o in zip(grads, own):
            assert torch.allclose(g[k], o[k], rtol=1e-6, atol=1e-12)
        assert sum(o[k].abs().sum() for o in own) > 0  # (key 0's one-token target: decoder self-attention q gets 0)
