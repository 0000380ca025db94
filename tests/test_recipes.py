"""The paper / official-code switches of issue 10 that live in tagi.py, data.py and train.py, each tested for what
it changes (the hypernetwork's pooling / init / L_ins switches are in test_switches.py), and the two recipes."""
import json
import math
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F

import data
import train
from tagi import kl_loss
from test_properties import CharTokenizer as CharTok
from test_tagi import VOCAB, make_batch, tiny_t5, tiny_tagi


def logits_pair(seed=0, N=3, T=5):
    g = torch.Generator().manual_seed(seed)
    s, t = (torch.randn(N, T, VOCAB, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    labels = torch.randint(2, VOCAB, (N, T), generator=g)
    labels[0, 2:] = -100
    return s, t, labels


def test_kl_without_t_squared_and_over_all_positions():
    """--no-kl_t_squared divides out exactly T²; --kl_positions all is torch.mean over every (n, t) position of
    the per-position KL, padding included, as the official code computes it."""
    s, t, labels = logits_pair()
    T = 3.0
    ours = kl_loss(s, t, labels, T)
    assert torch.allclose(kl_loss(s, t, labels, T, t_squared=False) * T * T, ours, rtol=1e-12)
    p_t, log_s = F.softmax(t / T, -1), F.log_softmax(s / T, -1)
    per_position = (p_t * (p_t.log() - log_s)).sum(-1)  # (N, T)
    official = kl_loss(s, t, labels, T, t_squared=False, positions="all")
    assert torch.allclose(official, per_position.mean(), rtol=1e-12)
    assert not torch.allclose(official, per_position[labels != -100].mean())  # padding really counts


def test_kl_teacher_tk_is_the_tk_model_on_the_full_prompt():
    """The default L_kl teacher is a separate model (the Tk-Instruct analog) on the full prompt, without LoRA;
    its positions divisor comes from the objective's counts when the official averaging is on."""
    model, tk = tiny_tagi("concat"), tiny_t5(seed=9)
    b = make_batch([0, 1, 0, 2, 1])
    for kl_positions in ("tokens", "all"):
        model.cfg = replace(model.cfg, kl_positions=kl_positions, kl_t_squared=kl_positions == "tokens")
        obj = train.TAGIObjective(model, None, None, tk, kl_lora=False)
        norm = {k: v.float() for k, v in obj.count(b).items()}
        with torch.no_grad():
            out = obj(b, norm)
            ref = kl_loss(model.student(b)[0], tk(b["prompt_ids"], b["prompt_mask"], labels=b["labels"]).logits,
                          b["labels"], model.cfg.temperature, t_squared=kl_positions == "tokens",
                          positions=kl_positions)
        assert torch.allclose(out["kl"], ref, rtol=1e-5) and out["kl"] > 0, kl_positions
        assert torch.allclose(out["loss"], out["ce"] + out["kl"], rtol=1e-6)


def test_student_input_prompt_reads_the_full_prompt():
    model = tiny_tagi("concat").eval()
    b = make_batch([0, 1, 0, 2, 1])
    swapped = {**b, "input_ids": b["prompt_ids"], "attention_mask": b["prompt_mask"]}
    with torch.no_grad():
        ref = model.student(swapped)[0]
        model.cfg = replace(model.cfg, student_input="prompt")
        got = model.student(b)[0]
    assert torch.equal(got, ref)
    assert (got - model.student(swapped)[0]).abs().max() == 0


def test_constant_schedule_after_warmup():
    steps, lr, warmup = 100, 1e-3, 0.05
    for k in range(5):
        assert train.get_lr(k, steps, lr, warmup, "constant") == train.get_lr(k, steps, lr, warmup) == lr * (k + 1) / 5
    assert all(train.get_lr(k, steps, lr, warmup, "constant") == lr for k in range(5, steps))
    assert train.get_lr(99, steps, lr, warmup) < lr / 9


def write_suite_like(tmp_path, n_tasks=3, n_inst=12, refs=1):
    for k in range(n_tasks):
        task = {"Definition": [f"task {k}"], "Positive Examples": [], "Negative Examples": [],
                "Instances": [{"id": f"t{k}-{i}", "input": f"w{i}", "output": [f"r{j}" for j in range(refs)]}
                              for i in range(n_inst)]}
        (tmp_path / "tasks").mkdir(parents=True, exist_ok=True)
        (tmp_path / "tasks" / f"task{k}.json").write_text(json.dumps(task))
    (tmp_path / "splits" / "default").mkdir(parents=True, exist_ok=True)
    (tmp_path / "splits" / "default" / "train_tasks.txt").write_text("".join(f"task{k}\n" for k in range(n_tasks)))


def test_random_sampling_draws_seeded_instances_per_task(tmp_path):
    """--sampling random: max_instances drawn at random per task (seeded by seed and task, so reproducible),
    instead of the first ones."""
    write_suite_like(tmp_path)
    first = data.load_sni(tmp_path, max_instances=4)
    a, b, c = (data.load_sni(tmp_path, max_instances=4, sample_seed=s) for s in (0, 0, 1))
    ids = lambda tasks: [[x["id"] for x in t["Instances"]] for t in tasks]  # noqa: E731
    assert ids(first) == [[f"t{k}-{i}" for i in range(4)] for k in range(3)]
    assert ids(a) == ids(b) and ids(a) != ids(c) and ids(a) != ids(first)
    assert len({tuple(sorted(x)) for x in ids(a)}) == 3  # each task its own draw
    full, everything = data.load_sni(tmp_path, max_instances=None, sample_seed=0), data.load_sni(tmp_path, max_instances=None)
    assert [sorted(x) for x in ids(full)] == [sorted(x) for x in ids(everything)]  # a permutation, nothing lost


def test_random_reference_draws_every_reference_in_training_only(tmp_path):
    """--sampling random: each training batch draws one of an instance's references (by seed, step, index);
    evaluation batches and the default keep the first."""
    write_suite_like(tmp_path, n_tasks=1, n_inst=4, refs=3)
    exs = data.sni_examples(data.load_sni(tmp_path, max_instances=None), num_pos=0)
    refs = {tuple(CharTok().encode(f"r{j}")) for j in range(3)}
    drawn = set()
    for random_reference in (False, True):
        b = data.Batcher(exs, CharTok(), 4, seed=0, random_reference=random_reference)
        for step in range(20):
            labels = b.batch(step)["labels"]
            rows = {tuple(x for x in row.tolist() if x != -100) for row in labels}
            assert rows <= refs
            if random_reference:
                drawn |= rows
            else:
                assert rows == {tuple(CharTok().encode("r0"))}
        assert torch.equal(b.collate([0, 1])["labels"], data.Batcher(exs, CharTok(), 4).collate([0, 1])["labels"])
    assert drawn == refs


def test_p3_max_per_prompt(tmp_path):
    d = tmp_path / "train" / "ds"
    d.mkdir(parents=True)
    for prompt in ("p1", "p2"):
        (d / f"{prompt}.jsonl").write_text("".join(json.dumps({"inputs_pretokenized": f"x{i}",
                                                               "targets_pretokenized": "y"}) + "\n" for i in range(5)))
    recs = data.load_p3(tmp_path / "train", max_per_prompt=3)
    assert [(r["prompt"], r["inputs"]) for r in recs] == [(p, f"x{i}") for p in ("p1", "p2") for i in range(3)]
    assert len(data.load_p3(tmp_path / "train")) == 10


@pytest.mark.parametrize("recipe", ["official", "paper"])
def test_recipes_set_valid_switches_and_flags_win(recipe):
    cfg = train.parse_args(["--recipe", recipe, "--seed", "3", "--temperature", "7"])
    preset = train.RECIPES[recipe]
    valid = {f.name: f.metadata.get("valid", "") for f in fields(train.Config)}
    for k, v in preset.items():
        assert k in valid, k
        if "|" in valid[k]:
            assert v in valid[k].split("|"), (k, v)
        assert getattr(cfg, k) == (7.0 if k == "temperature" else v), k
    assert cfg.seed == 3 and cfg.recipe == recipe
    assert train.parse_args(["--recipe", recipe, "--no-kl_t_squared"]).kl_t_squared is False
    default = train.parse_args([])
    assert {k for k in preset if getattr(default, k) != preset[k]}  # the recipe changes something
    if recipe == "paper":
        c = train.stage_defaults(train.resolve(cfg), "pretrain")
        assert (c.optimizer, c.bf16) == ("adafactor", False)
        assert train.stage_defaults(train.resolve(cfg), "finetune").optimizer == "adamw"


def test_warmup_default_is_2_percent_but_10_for_the_suites_short_pretraining():
    """--warmup left out: 0.02 of every stage (the paper's), except the suite's 200-step pretraining, whose 4
    warmup steps let seed 0 diverge (README "Why HINT and `tagi-noins` failed"): 0.1 there. Given, or from a
    recipe, it wins."""
    def w(argv, stage, data="suite"):
        cfg = train.parse_args(argv + (["--data", data, "--data_dir", "x"] if data != "suite" else []))
        return train.stage_defaults(train.resolve(cfg), stage).warmup
    assert w([], "pretrain") == 0.1
    assert {w([], s) for s in ("base", "tk", "teachers", "finetune")} == {0.02}
    assert w([], "pretrain", "sni") == 0.02
    assert w(["--warmup", "0.05"], "pretrain") == 0.05 and w(["--warmup", "0"], "pretrain") == 0.0
    assert w(["--recipe", "official"], "pretrain") == 0.03


def test_tk_objective_is_cross_entropy_on_the_full_prompt_and_trains_every_weight():
    """--stage tk: the Tk-Instruct analog is the base with every weight trained on the full Tk-Instruct prompt."""
    from tagi import ce_loss
    t5 = tiny_t5().requires_grad_(True)
    b = make_batch([0, 1, 0, 2, 1])
    obj = train.BaseObjective(t5, "prompt")
    out = obj(b, {k: v.float() for k, v in obj.count(b).items()})
    ref = ce_loss(t5(b["prompt_ids"], b["prompt_mask"], labels=b["labels"]).logits, b["labels"])
    assert torch.allclose(out["loss"], ref, rtol=1e-6)
    assert not torch.allclose(out["loss"], ce_loss(t5(b["input_ids"], b["attention_mask"], labels=b["labels"]).logits,
                                                   b["labels"]))
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in t5.parameters())


def test_reader_tk_reads_the_instruction_with_the_tk_encoder(tmp_path):
    """--reader tk (official): the instruction states I_x (for the hypernetwork and fusion) come from the tk
    model's encoder; the checkpoint names that model and loads it back."""
    from tagi import TAGI, TAGIConfig
    t5, tk = tiny_t5(), tiny_t5(seed=9)
    b = make_batch([0, 1, 0, 2, 1])
    with pytest.raises(ValueError, match="reader"):
        TAGI(t5, TAGIConfig(rank=4, alpha=8.0, hidden=32, reader="tk"))
    torch.manual_seed(1)
    model = TAGI(t5, TAGIConfig(rank=4, alpha=8.0, hidden=32, reader="tk"), tk).eval()
    ins, mask = b["instruction_ids"][:3], b["instruction_mask"][:3]
    with torch.no_grad():
        states, _, _ = model.task_adapters(ins, mask)
        assert torch.equal(states, tk.encode(ins, mask)) and not torch.allclose(states, t5.encode(ins, mask))
        ref = model.student(b)[0]
    tk.save_pretrained(tmp_path / "tk")
    model.save(tmp_path / "ck", reader_model=str(tmp_path / "tk"))
    with torch.no_grad():
        assert torch.equal(TAGI.load(tmp_path / "ck", t5).eval().student(b)[0], ref)
    assert sum(k.startswith("reader") for k in model.trainable_state_dict()) == 0
