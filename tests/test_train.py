"""train.py end to end, on the built-in suite with a tiny base model and a handful of steps (seconds on a CPU):

- exact resume: N steps straight == k steps, a stop (Ctrl-C), then N - k steps with --resume, bit for bit;
- DDP: `torchrun --nproc_per_node 2` (gloo, CPU) == one process with the same global batch: losses, gradients
  and parameters, up to fp32 rounding (and AdamW's amplification of it where a gradient is ~0, see below);
- a crash while a checkpoint is being written leaves the previous one loadable and no torn file under a final name;
- a NaN/inf loss stops the run with a clear message and keeps the last good checkpoint;
- every stage refuses a missing or mismatched input (base model, tokenizer, teacher bank, checkpoint) by name;
- the --quick pipeline ends in a results table whose numbers are the ROUGE-L of its saved predictions.

One tiny base model (3 steps) and one run with teachers + pretrained hypernetwork on it are built once per session
and copied by the tests that need them. Every run shares one generated suite (--data_dir). Runs are in-process
(train.main) except torchrun."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import evaluate
import model
import train
from model import load_safetensors

REPO = Path(__file__).resolve().parents[1]
TINY = ["--batch_size", "8", "--max_instances", "10", "--log_every", "2"]
TEACHERS = train.teachers_dir(train.resolve(train.parse_args(["--out", "."]))).name  # the suite's default group
STAGE_DIR = {"base": "base", "tk": "tk", "teachers": TEACHERS, "pretrain": "pretrain", "finetune": "finetune"}
FINAL = {"base": "base/model.safetensors", "tk": "tk/model.safetensors", "teachers": f"{TEACHERS}/bank.safetensors",
         "pretrain": "pretrain/tagi.safetensors", "finetune": "finetune/tagi.safetensors"}


def main(*argv):
    train.main([str(a) for a in argv])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny base model trained for 3 steps (<root>/base) on the suite generated under <root>/suite."""
    root = tmp_path_factory.mktemp("tiny")
    main("--stage", "base", "--steps", 3, "--batch_size", 8, "--log_every", 1, "--out", root)
    return root


def args(tiny, out, stage, steps, *extra):
    """A stage on the tiny base model, the shared suite and tiny batches."""
    return ["--stage", stage, "--out", out, "--model", tiny / "base", "--data_dir", tiny / "suite", "--steps", steps,
            *TINY, *extra]


@pytest.fixture(scope="session")
def prepared(tiny, tmp_path_factory):
    """A run folder holding what finetune needs: tk/, the default teachers on it and pretrain/ (3 steps each)."""
    root = tmp_path_factory.mktemp("prepared") / "run"
    main(*args(tiny, root, "tk", 3))
    main(*args(tiny, root, "teachers", 3))
    main(*args(tiny, root, "pretrain", 3))
    return root


def run_folder(prepared, path: Path, stage: str) -> Path:
    """A fresh run folder for `stage`; teachers start from a copy of the prepared tk model, finetune from a copy
    of the prepared tk, teachers and pretrain."""
    if stage == "finetune":
        shutil.copytree(prepared, path)
    elif stage == "teachers":
        shutil.copytree(prepared / "tk", path / "tk")
    return path


_straight_cache = {}


@pytest.fixture
def straight(tiny, prepared, tmp_path_factory):
    """straight(stage, steps) -> the run folder of an uninterrupted run (computed once per session)."""
    def get(stage, steps):
        if (stage, steps) not in _straight_cache:
            out = run_folder(prepared, tmp_path_factory.mktemp(f"straight-{stage}") / "run", stage)
            main(*args(tiny, out, stage, steps))
            _straight_cache[stage, steps] = out
        return _straight_cache[stage, steps]
    get.prepared = prepared
    return get


def resume(*cli):
    main(*cli, "--resume")


def saving_teachers(tiny, straight, tmp_path, steps):
    """A teachers run of `steps` steps saving every 2, for fault injection: (the uninterrupted reference run,
    the run folder, its stage folder, the command line)."""
    out = run_folder(straight.prepared, tmp_path / "run", "teachers")
    return straight("teachers", steps), out, out / TEACHERS, args(tiny, out, "teachers", steps, "--save_every", 2)


def interrupt_at(monkeypatch, k: int):
    """Make train.fit's batcher raise KeyboardInterrupt when it is asked for the first micro-batch of step k:
    the run takes train.py's Ctrl-C path (save the checkpoint, exit 130) after exactly k optimizer steps."""
    real_fit = train.fit

    def fit(cfg, stage, stage_dir, objective, batcher, device):
        class Stop:
            def batch(self, i, rank=0, world_size=1):
                if i == k * cfg.grad_accum:
                    raise KeyboardInterrupt
                return batcher.batch(i, rank, world_size)
        return real_fit(cfg, stage, stage_dir, objective, Stop(), device)
    monkeypatch.setattr(train, "fit", fit)


def assert_same_tensors(a: Path, b: Path, atol=0.0):
    ta, tb = load_safetensors(a), load_safetensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        if atol == 0.0:
            assert torch.equal(ta[name], tb[name]), f"{name} differs between {a} and {b}"
        else:
            diff = (ta[name].double() - tb[name].double()).abs().max().item() if ta[name].numel() else 0.0
            assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol} between {a} and {b}"


def latest(stage_dir: Path) -> str:
    return (stage_dir / "latest").read_text().strip()


def assert_loadable_checkpoint(d: Path, step: int, stage: str):
    state = json.loads((d / "state.json").read_text())
    assert (state["stage"], state["step"]) == (stage, step)
    for f in ("trained.safetensors", "optimizer.safetensors"):
        tensors = load_safetensors(d / f)
        assert tensors and all(torch.isfinite(t.float()).all() for n, t in tensors.items() if not n.startswith("rng"))


# ---------------------------------------------------------------------------------------------------------------
# The base stage's output is what the later stages pick up


def test_base_stage_writes_a_model_the_other_stages_find(tiny):
    base = tiny / "base"
    for f in ("config.json", "model.safetensors", "spiece.model", "stage.json"):
        assert (base / f).is_file(), f
    assert json.loads((base / "stage.json").read_text())["stage"] == "base"
    assert [json.loads(line)["step"] for line in (base / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    cfg = train.resolve(train.parse_args(["--out", str(tiny)]))
    assert train.base_model_dir(cfg) == base  # <out>/base is preferred over the committed assets/suite-base
    t5, tok, mdir = train.load_base(cfg, torch.device("cpu"))
    assert mdir == base and t5.config.vocab_size == tok.vocab_size


def test_base_objectives_rebuild_their_text():
    """Every base-stage pair gives back its text: span corruption by putting each dropped span back at its
    sentinel, prefix LM (mode token V-100) by joining input and target, reconstruction (mode token V-99) as the
    target itself, whose input is the text with spans dropped, lookup (mode token V-98) as the token after its query
    (tests/test_report.py). The four kinds come in about equal shares."""
    V = 740
    texts = [list(range(3, 3 + n)) for n in (2, 5, 17, 40, 120)]
    b = train.TextBatcher(texts, 64, V, seed=0)
    kinds = []
    for step in range(4):
        batch = b.batch(step)
        for src, tgt in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            src, tgt = src[:src.index(1)], tgt[:tgt.index(1)]  # up to eos
            assert V - 100 not in tgt and V - 99 not in tgt and V - 98 not in tgt  # mode tokens open inputs only
            if src[0] == V - 98:
                kinds.append("lookup")
            elif src[0] == V - 100:
                kinds.append("prefix")
                assert src[1:] + tgt in texts and len(src) > 1 and tgt
            elif src[0] == V - 99:
                kinds.append("reconstruct")
                assert tgt in texts and any(t >= V - 97 for t in src[1:])
                kept = [t for t in src[1:] if t < V - 97]
                assert kept == [t for t in tgt if t in kept]  # the kept tokens, in order
            else:
                kinds.append("spans")
                spans, k = {}, None
                for t in tgt:
                    k = t if t >= V - 98 else k
                    if t < V - 98:
                        spans.setdefault(k, []).append(t)
                assert [x for t in src for x in (spans[t] if t >= V - 98 else [t])] in texts
    assert all(40 < kinds.count(k) < 90 for k in ("prefix", "reconstruct", "spans", "lookup")), kinds
    warm = train.TextBatcher(texts, 64, V, seed=0, warmup=3)
    for step, copying in ((0, True), (2, True), (3, False)):  # the warm-up: plain copies in reconstruction mode
        batch = warm.batch(step)
        pairs = [(src[:src.index(1)], tgt[:tgt.index(1)]) for src, tgt in zip(batch["input_ids"].tolist(),
                                                                           batch["labels"].tolist())]
        assert all(src == [V - 99] + tgt and tgt in texts for src, tgt in pairs) == copying


# ---------------------------------------------------------------------------------------------------------------
# 1. Exact resume


@pytest.mark.parametrize("stage", ["base", "tk", "teachers", "pretrain", "finetune"])
def test_resume_after_ctrl_c_is_bit_identical(stage, tiny, prepared, straight, tmp_path, monkeypatch):
    N, k = 6, 2
    ref = straight(stage, N)
    out = run_folder(prepared, tmp_path / "run", stage)
    d = out / STAGE_DIR[stage]
    cli = args(tiny, out, stage, N)

    interrupt_at(monkeypatch, k)
    with pytest.raises(SystemExit) as e:
        main(*cli)
    assert e.value.code == 130
    assert latest(d) == f"ckpt-{k:07d}"
    assert_loadable_checkpoint(d / latest(d), k, stage)
    assert not (d / "stage.json").exists() and not (out / FINAL[stage]).exists()  # an unfinished stage
    monkeypatch.undo()

    resume(*cli)
    assert_same_tensors(out / FINAL[stage], ref / FINAL[stage])
    # the whole checkpoint too: AdamW moments and step counts, RNG state
    assert_same_tensors(d / f"ckpt-{N:07d}" / "optimizer.safetensors",
                        ref / STAGE_DIR[stage] / f"ckpt-{N:07d}" / "optimizer.safetensors")
    steps = [json.loads(line)["step"] for line in (d / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # steps 1-2 before the stop, 3-6 after it; none twice
    ref_log = (ref / STAGE_DIR[stage] / "log.jsonl").read_text().splitlines()
    got_log = (d / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in got_log] == [json.loads(x)["loss"] for x in ref_log]


def test_ctrl_c_during_a_periodic_save_resumes_exactly(tiny, prepared, straight, tmp_path,
                                                       monkeypatch):
    N = 6
    ref, out, d, cli = saving_teachers(tiny, straight, tmp_path, N)
    real_save, interrupted = train.save_checkpoint, []

    def save_then_ctrl_c(stage_dir, objective, opt, step, cfg, stage):
        real_save(stage_dir, objective, opt, step, cfg, stage)
        if step == 2 and not interrupted:
            interrupted.append(step)
            raise KeyboardInterrupt  # Ctrl-C right after the periodic checkpoint of step 2 was written
    monkeypatch.setattr(train, "save_checkpoint", save_then_ctrl_c)
    with pytest.raises(SystemExit):
        main(*cli)
    monkeypatch.undo()
    assert interrupted == [2] and latest(d) == "ckpt-0000002"  # after opt.step() of step index 1: 2 steps done
    assert_loadable_checkpoint(d / "ckpt-0000002", 2, "teachers")
    resume(*cli)
    assert_same_tensors(out / FINAL["teachers"], ref / FINAL["teachers"])


# ---------------------------------------------------------------------------------------------------------------
# 2. DDP on CPU: two ranks == one process with the same global batch
#
# Parameters cannot agree to 1e-6 everywhere: the two ranks pad their halves of the batch to other lengths and sum
# in another order, so gradients differ by fp32 rounding (~1e-6 of their largest element), and AdamW's first step,
# lr * g / (|g| + eps), turns that into up to 2 lr where |g| is itself at the rounding level. So one optimizer step
# (two micro-batches, so DDP's no_sync path runs too; no clipping, which would hide a wrong gradient scale) and:
# the logged global losses agree; the gradients (AdamW's moments) agree to 1e-6; a parameter whose gradient is 0 is
# untouched on both, one whose gradient is >= 1e-4 agrees to 1e-6; the rest (a few %) moved by at most 2 lr.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def optimizer_param_names(stage_dir: Path, stage: str, base: Path) -> list[str]:
    """Names (as in trained.safetensors) of the optimizer's parameters in its order: train.fit optimizes
    [p for p in objective.parameters() if p.requires_grad]."""
    t5 = train.T5.from_pretrained(base)
    if stage == "teachers":
        info = json.loads((stage_dir / "stage.json").read_text())
        bank = train.LoRABank(t5, info["targets"], len(info["keys"]), info["rank"], info["alpha"])
        objective = train.TeacherObjective(t5, bank, torch.zeros(1, dtype=torch.long), True)
    else:
        objective = train.TAGIObjective(train.TAGI.load(stage_dir, t5), None, None)
    return [n for n, p in objective.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("stage", ["teachers", "finetune"])
def test_ddp_two_ranks_match_one_process(stage, tiny, prepared, tmp_path):
    lr = 3e-3
    cli = lambda out: args(tiny, out, stage, 1, "--grad_accum", 2, "--clip", 0, "--lr", lr, "--log_every", 1)  # noqa
    one = run_folder(prepared, tmp_path / "one", stage)
    main(*cli(one))  # one process, global batch 8 per micro-batch
    two = run_folder(prepared, tmp_path / "two", stage)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "train.py", *map(str, cli(two))]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    d1, d2 = one / STAGE_DIR[stage], two / STAGE_DIR[stage]
    log1, log2 = [[json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()] for d in (d1, d2)]
    assert [r["step"] for r in log2] == [1]  # rank 0 alone writes the log
    assert {k for k in log2[0]} == {k for k in log1[0]}
    for key in log1[0]:
        if key not in ("ms_per_step", "tokens_per_s"):
            assert log2[0][key] == pytest.approx(log1[0][key], rel=1e-5), key

    opt1, opt2 = (load_safetensors(d / "ckpt-0000001" / "optimizer.safetensors") for d in (d1, d2))
    assert sorted(opt1) == sorted(opt2)
    for k in opt1:  # exp_avg = 0.1 g, exp_avg_sq = 0.001 g^2, step = 1
        if not k.startswith("rng"):
            assert (opt1[k] - opt2[k]).abs().max() <= 1e-6, k
    th1, th2 = (load_safetensors(d / "ckpt-0000001" / "trained.safetensors") for d in (d1, d2))
    names = optimizer_param_names(d1, stage, tiny / "base")
    assert sorted(th1) == sorted(th2) and set(names) <= set(th1)
    for n in set(th1) - set(names):  # frozen offsets and other untrained tensors
        assert torch.equal(th1[n], th2[n]), n
    rounding_level = with_grad = 0
    for i, n in enumerate(names):
        g = 10 * opt1[f"{i}.exp_avg"]  # the single process's gradient
        diff = (th1[n] - th2[n]).abs()
        assert g.shape == diff.shape, n
        assert torch.all(diff[(g == 0) & (opt2[f"{i}.exp_avg"] == 0)] == 0), n  # no gradient in either run
        big = diff[g.abs() >= 1e-4]
        assert big.numel() == 0 or big.max() <= 1e-6, n
        assert diff.max() <= 2 * lr * (1 + 1e-5), n
        rounding_level += int(((g != 0) & (g.abs() < 1e-4)).sum())
        with_grad += int((g != 0).sum())
    assert with_grad > 0 and rounding_level <= 0.05 * with_grad
    # the stage's output is the checkpoint's state
    final1, final2 = load_safetensors(one / FINAL[stage]), load_safetensors(two / FINAL[stage])
    prefix = "bank." if stage == "teachers" else "tagi."
    for k in final1:
        assert torch.equal(final1[k], th1[prefix + k]) and torch.equal(final2[k], th2[prefix + k]), k


# ---------------------------------------------------------------------------------------------------------------
# 3. A crash while saving


def test_crash_while_saving_keeps_the_previous_checkpoint(tiny, prepared, straight, tmp_path,
                                                          monkeypatch):
    N = 6
    ref, out, d, cli = saving_teachers(tiny, straight, tmp_path, N)
    real_write = model.atomic_write_bytes

    def crash_midway(path, chunks):
        """Dies (like a kill -9 or a full disk) halfway through the second checkpoint's optimizer file: part of
        the bytes are in the temporary file, nothing cleans up."""
        path = Path(path)
        if path.parent.name == "ckpt-0000004" and path.name == "optimizer.safetensors":
            blob = b"".join(chunks)
            (path.parent / f".{path.name}.tmp{os.getpid()}").write_bytes(blob[:len(blob) // 2])
            raise OSError(f"simulated crash while writing {path}")
        return real_write(path, chunks)
    monkeypatch.setattr(model, "atomic_write_bytes", crash_midway)
    with pytest.raises(OSError, match="simulated crash"):
        main(*cli)
    monkeypatch.undo()

    assert latest(d) == "ckpt-0000002"
    assert_loadable_checkpoint(d / "ckpt-0000002", 2, "teachers")
    assert not (d / "ckpt-0000004" / "optimizer.safetensors").exists()
    assert not (d / "ckpt-0000004" / "state.json").exists()
    for f in d.rglob("*"):  # every file under a final (non-hidden) name is complete
        if f.suffix == ".safetensors" and not f.name.startswith("."):
            load_safetensors(f)
    assert not (d / "bank.safetensors").exists() and not (d / "stage.json").exists()

    resume(*cli)
    assert_same_tensors(out / FINAL["teachers"], ref / FINAL["teachers"])
    assert sorted(p.name for p in d.glob("ckpt-*")) == ["ckpt-0000006"]  # the torn one is cleaned up


# ---------------------------------------------------------------------------------------------------------------
# 4. NaN / inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(bad, tiny, prepared, straight,
                                                                  tmp_path, monkeypatch):
    N, k = 6, 3
    ref, out, d, cli = saving_teachers(tiny, straight, tmp_path, N)
    real_forward, calls = train.TeacherObjective.forward, []

    def forward(self, batch, norm):
        out = real_forward(self, batch, norm)
        calls.append(1)
        if len(calls) == k + 1:  # the forward of step k (0-based)
            out = {**out, "loss": out["loss"] * bad}
        return out
    monkeypatch.setattr(train.TeacherObjective, "forward", forward)
    with pytest.raises(FloatingPointError) as e:
        main(*cli)
    monkeypatch.undo()
    msg = str(e.value)
    assert f"loss is {bad} at step {k}" in msg and str(d / "ckpt-0000002") in msg
    assert latest(d) == "ckpt-0000002"
    assert_loadable_checkpoint(d / "ckpt-0000002", 2, "teachers")
    assert not (d / "bank.safetensors").exists() and not (d / "stage.json").exists()
    # the kept checkpoint is the good state of step 2: resuming from it gives the uninterrupted run
    resume(*cli)
    assert_same_tensors(out / FINAL["teachers"], ref / FINAL["teachers"])


# ---------------------------------------------------------------------------------------------------------------
# 5. Missing or mismatched inputs are refused by name


@pytest.mark.parametrize("stage", ["teachers", "pretrain", "finetune"])
def test_refuses_a_missing_base_model(stage, tiny, prepared, tmp_path):
    out = run_folder(prepared, tmp_path / "run", stage)
    cli = args(tiny, out, stage, 2)
    cli[cli.index("--model") + 1] = tmp_path / "nonexistent"
    with pytest.raises(SystemExit, match="no base model at .*nonexistent"):
        main(*cli)


@pytest.mark.parametrize("stage", ["teachers", "pretrain", "finetune"])
def test_refuses_a_missing_tokenizer(stage, tiny, prepared, tmp_path):
    out = run_folder(prepared, tmp_path / "run", stage)
    with pytest.raises(SystemExit, match="no tokenizer at .*nowhere.model"):
        main(*args(tiny, out, stage, 2, "--tokenizer", tmp_path / "nowhere.model"))


@pytest.fixture(scope="session")
def other_tokenizers(tiny, tmp_path_factory):
    """Tokenizers of the suite's text with more and with fewer ids than the tiny model's 740 embeddings."""
    d = tmp_path_factory.mktemp("tokenizers")
    texts = data.suite_texts(tiny / "suite")
    big = data.train_tokenizer(texts, d / "big.model", 1000, model_type="bpe")
    small = data.train_tokenizer(texts, d / "small.model", 300, model_type="bpe")
    vocab = train.T5Config.from_json(tiny / "base" / "config.json").vocab_size
    assert small.vocab_size < vocab < big.vocab_size
    return {"big": big.path, "small": small.path}


@pytest.mark.parametrize("stage", ["teachers", "pretrain", "finetune"])
@pytest.mark.parametrize("which", ["big", "small"])
def test_refuses_a_tokenizer_of_another_vocab(which, stage, tiny, prepared, other_tokenizers, tmp_path):
    out = run_folder(prepared, tmp_path / "run", stage)
    tok = other_tokenizers[which]
    with pytest.raises(SystemExit) as e:
        main(*args(tiny, out, stage, 2, "--tokenizer", tok))
    msg = str(e.value)
    assert str(tok) in msg
    if which == "big":
        assert "ids but the model" in msg and str(out / "tk" if stage == "teachers" else tiny / "base") in msg
    else:
        assert "the suite's tokenizer" in msg


@pytest.mark.parametrize("group", ["task", "category"])
def test_finetune_refuses_teachers_of_other_tasks(group, tiny, prepared, tmp_path):
    """Teachers trained on a suite whose training split lacks one family (category) cannot teach a finetune on
    the full split (when it needs them: here L_kl from the teacher LoRAs)."""
    sub = tmp_path / "suite-subset"
    shutil.copytree(tiny / "suite", sub)
    split = sub / "splits" / "default" / "train_tasks.txt"
    tasks = split.read_text().split()
    family = data.load_sni_task(sub / "tasks" / f"{tasks[0]}.json")["Categories"][0]
    dropped = [t for t in tasks if data.load_sni_task(sub / "tasks" / f"{t}.json")["Categories"][0] == family]
    split.write_text("\n".join(t for t in tasks if t not in dropped) + "\n")
    out = tmp_path / "run"
    shutil.copytree(prepared / "pretrain", out / "pretrain")
    cli = args(tiny, out, "teachers", 2, "--group", group, "--teacher_base", "base")
    cli[cli.index("--data_dir") + 1] = sub
    main(*cli)
    with pytest.raises(SystemExit) as e:
        main(*args(tiny, out, "finetune", 2, "--group", group, "--kl_teacher", "lora"))
    msg = str(e.value)
    missing = sorted(dropped) if group == "task" else [family]
    assert str(out / f"teachers-{group}") in msg and "trained for other tasks" in msg
    assert f"({len(missing)} in all)" in msg and repr(missing[:5]) in msg


@pytest.mark.parametrize("other", ["teachers", "pretrain"])
def test_resume_refuses_a_checkpoint_of_another_stage(other, tiny, prepared, tmp_path):
    out = run_folder(prepared, tmp_path / "run", "finetune")
    d, src = out / "finetune", out / STAGE_DIR[other]
    d.mkdir()
    ck = latest(src)
    shutil.copytree(src / ck, d / ck)
    shutil.copy(src / "latest", d / "latest")
    with pytest.raises(ValueError) as e:
        main(*args(tiny, out, "finetune", 2, "--resume"))
    msg = str(e.value)
    assert str(d / ck / "state.json") in msg and "'finetune'" in msg
    assert f"field 'stage' is {other!r}" in msg


def test_resume_refuses_a_checkpoint_of_another_shape(tiny, prepared, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cli = args(tiny, out, "finetune", 4, "--no_pretrain", "--kl_weight", 0, "--ins_weight", 0)  # needs nothing
    interrupt_at(monkeypatch, 2)
    with pytest.raises(SystemExit):
        main(*cli, "--hidden", 32)
    monkeypatch.undo()
    try:
        main(*cli, "--hidden", 64, "--resume")
    except (SystemExit, ValueError, RuntimeError) as e:
        assert isinstance(e, (SystemExit, ValueError)) and "trained.safetensors" in str(e), repr(e)[:300]
    else:
        raise AssertionError("resumed a checkpoint of another shape")


def test_finetune_refuses_a_pretrained_hypernetwork_of_another_shape(tiny, prepared, tmp_path):
    out = run_folder(prepared, tmp_path / "run", "finetune")
    with pytest.raises(SystemExit, match=r"pretrain/tagi.safetensors: the pretrained hypernetwork has another shape"):
        main(*args(tiny, out, "finetune", 2, "--hidden", 32))


def test_base_refuses_a_suite_built_with_other_settings(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "suite.json").write_text(json.dumps({"seed": 1, "vocab_size": 640, "instances_per_task": 140}))
    with pytest.raises(ValueError, match=f"{suite}: holds a suite built with"):
        main("--stage", "base", "--steps", 1, "--out", tmp_path / "run", "--data_dir", suite)


def test_base_stage_refuses_real_data(tmp_path):
    with pytest.raises(SystemExit, match="--stage base exists only for the built-in suite"):
        main("--stage", "base", "--data", "sni", "--data_dir", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 6. The --quick pipeline: a results table computed from real predictions


def test_quick_pipeline_results_come_from_its_predictions(tiny, tmp_path):
    """--quick on the tiny base with batch 8, 10 steps per stage and 4 held-out instances per task (the pure
    zero-argument `--quick` also trains the base and takes ~90 s on 2 cores: too slow for this file)."""
    out = tmp_path / "run"
    main("--quick", "--out", out, "--model", tiny / "base", "--data_dir", tiny / "suite", "--batch_size", 8,
         "--steps", 10, "--eval_instances", 4, "--max_instances", 10)
    res = out / "results"
    results = json.loads((res / "results.json").read_text())
    methods = [m for m in results if m != "config"]
    assert methods == ["base", "noinstr", "concat", "tk-instruct", "teacher", "hint", "tagi", "tagi-adapter"]
    for stage in ("tk", TEACHERS, "teachers-all", "teachers-all-instance", "pretrain", "finetune", "finetune-hint"):
        assert json.loads((out / stage / "stage.json").read_text())["config"]["steps"] == 10

    held_out = data.sni_examples(data.load_sni(tiny / "suite", part="test", max_instances=4), num_pos=0)
    seen_tasks = data.load_sni(tiny / "suite", part="train", max_instances=None)
    seen = [e for e in data.sni_examples(seen_tasks, num_pos=0) if int(e.id.rsplit("-", 1)[1]) == 10]  # 1 new each
    table = (res / "results.md").read_text()
    for name in methods:
        for split, exs in (("held-out", held_out), ("seen", seen)):
            if name == "teacher" and split == "held-out":
                assert split not in results[name]
                continue
            rows = [json.loads(x) for x in (res / f"{name}.{split}.jsonl").read_text().splitlines()]
            assert [r["id"] for r in rows] == [e.id for e in exs]
            rouge = [evaluate.rouge_l(r["prediction"], e.references) for r, e in zip(rows, exs)]
            em = [evaluate.exact_match(r["prediction"], e.references) for r, e in zip(rows, exs)]
            overall = results[name][split]["overall"]
            assert overall["rougeL"] == round(100 * sum(rouge) / len(rouge), 4), (name, split)
            assert overall["exact_match"] == round(100 * sum(em) / len(em), 4), (name, split)
        r = results[name]
        held = f"{r['held-out']['overall']['rougeL']:.1f}" if "held-out" in r else "–"
        assert f"| {name} | {held} |" in table
    # the saved TAGI predictions are what the saved finetune checkpoint generates
    cfg = train.resolve(train.parse_args(["--out", str(out), "--model", str(tiny / "base"), "--data_dir",
                                          str(tiny / "suite")]))
    t5, tok, _ = train.load_base(cfg, torch.device("cpu"))
    gen, _ = evaluate.method_fns("tagi", out, t5, torch.device("cpu"))
    b = data.Batcher(held_out, tok, 64, shuffle=False, max_source_len=cfg.max_source_len,
                     max_target_len=cfg.max_target_len, max_instruction_len=cfg.max_instruction_len)
    preds = evaluate.predict(gen, b, tok, torch.device("cpu"), max_new_tokens=cfg.max_target_len)
    saved = [json.loads(x)["prediction"] for x in (res / "tagi.held-out.jsonl").read_text().splitlines()]
    assert preds == saved
    assert not math.isnan(results["tagi"]["held-out"]["overall"]["rougeL"])


def test_adapter_command_writes_the_generated_adapter_as_peft(tiny, prepared, tmp_path):
    """`python tagi.py adapter` turns an instruction into a PEFT directory holding exactly the factors the
    finetuned hypernetwork generates for it."""
    import tagi
    out = tmp_path / "run"
    shutil.copytree(prepared, out)
    main(*args(tiny, out, "finetune", 2))
    text = "Answer with frog followed by the word that starts the input."
    tagi.main(["adapter", "--checkpoint", str(out / "finetune"), "--instruction", text, "--out", str(tmp_path / "ad")])
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"]
    loaded = tagi.load_peft(tmp_path / "ad")
    info = json.loads((out / "finetune" / "tagi.json").read_text())
    t5 = model.T5.from_pretrained(info["base_model"])
    ids = torch.tensor([data.Tokenizer(info["tokenizer"]).encode(text)])
    with torch.no_grad():
        _, _, gen = tagi.TAGI.load(out / "finetune", t5).eval().task_adapters(ids, torch.ones_like(ids))
    assert sorted(loaded) == sorted(gen)
    for p, (A, B) in gen.items():
        assert torch.equal(loaded[p][0], A) and torch.allclose(loaded[p][1], B, rtol=0, atol=0)
