"""Speed and size benchmarks. Every figure is a ratio against a reference measured on the same machine, in the
same run, with warm-up and several repeats (the median is reported). See BENCHMARKS.md for what each one means.

    1. t5        our T5 vs transformers' T5ForConditionalGeneration (same config, same weights): fwd+bwd tokens/s
                 and step memory (peak minus resident before the step); each model in its own child process
    2. lora      per-example LoRA on q, v of every attention (r = 32, N = 16): (a) no adapters, (b) ours (batched),
                 (c) a Python loop over examples, (d) merged per-example weights W + B_i A_i applied with bmm
    3. hypernet  parameter counts at T5 v1.1-base shape, and the time to write a task's adapters (encode a 512-token
                 instruction + hypernetwork) vs one forward of a 100-instance batch

    OMP_NUM_THREADS=1 python bench.py --json bench.json          # CPU: ~4 minutes on one thread
    python bench.py --device cuda --json bench.json              # GPU: bf16 autocast, v1.1-base shape, + torch.compile

Shapes: N batch, S source length, T target length, r rank.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import model
from hypernet import target_paths
from model import T5, T5Config, shift_right
from tagi import TAGI, TAGIConfig

SHAPES = {  # T5 v1.1 / lm-adapt: gated-gelu, untied embeddings, vocab 32128
    "v1.1-small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "v1.1-base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
}
# (shape, N, S, T) per benchmark and device: the CPU rows are smaller so that the default run takes minutes.
SETUP = {"t5": {"cpu": ("v1.1-small", 8, 256, 64), "cuda": ("v1.1-base", 8, 1024, 128)},
         "lora": {"cpu": ("v1.1-small", 16, 128, 32), "cuda": ("v1.1-base", 16, 1024, 128)},
         "hypernet": {"cpu": ("v1.1-small", 100, 64, 16), "cuda": ("v1.1-base", 100, 128, 32)}}
RANK, INSTRUCTION_LEN = 32, 512


def config(shape: str, **kw) -> dict:
    return dict(vocab_size=32128, dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                **SHAPES[shape], **kw)


def make_t5(shape: str, device) -> T5:
    torch.manual_seed(0)  # the same weights in every process
    return T5(T5Config(**config(shape))).to(device)


def make_batch(N, S, T, vocab=32128, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(2, vocab, (N, S), generator=g), torch.randint(2, vocab, (N, T), generator=g)
    return dict(input_ids=x.to(device), attention_mask=torch.ones_like(x).to(device), labels=y.to(device))


class Memory:
    """Peak memory of what runs between start() and peak_mib(), beyond what was resident at start(). CPU: the
    process's resident set (VmHWM, reset through /proc/self/clear_refs; Linux only); CUDA: the caching allocator."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status(key):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
        return int(line.split()[1]) / 1024  # kB -> MiB

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
            self.base = self._status("VmRSS:")

    def peak_mib(self):
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else self._status("VmHWM:")
        return round(peak - self.base, 1)


def timed(fns: dict, warmup: int, repeats: int, device) -> dict:
    """Median seconds per call of each function; the functions take turns, so that load from other processes
    on the machine falls on all of them alike."""
    times = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def autocast(device):
    return torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------------
# 1. T5 vs transformers (one child process per model, so that each has its own memory high-water mark)


def run_t5(which: str, device, warmup: int, repeats: int) -> dict:
    shape, N, S, T = SETUP["t5"][device.type]
    net = make_t5(shape, device)
    if which == "t5-hf":
        import transformers
        kw = config(shape)
        hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
            **kw, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        hf.lm_head.weight = torch.nn.Parameter(torch.empty(kw["vocab_size"], kw["d_model"]))  # untied, as v1.1
        hf.load_state_dict(net.state_dict())
        net = hf.to(device)
    elif which == "t5-ours-compile":
        net = torch.compile(net)
    net.train()  # dropout is 0 anyway
    batch, losses, mem = make_batch(N, S, T, device=device), [], Memory(device)

    def step():
        with autocast(device):
            loss = net(**batch).loss
        loss.backward()
        net.zero_grad(set_to_none=True)
        losses.append(loss.item())

    mem.start()
    t = timed({"step": step}, warmup, repeats, device)["step"]
    return dict(shape=shape, N=N, S=S, T=T, seconds=t, tokens_per_s=N * (S + T) / t, step_mib=mem.peak_mib(),
                loss=losses[0], attn=hf.config._attn_implementation if which == "t5-hf" else "ours")


# ----------------------------------------------------------------------------------------------------------------
# 2. Per-example LoRA


def merged_forward(self, x, adapters=None):
    """Reference (d): the per-example weight W_i = W + B_i A_i materialised, (N, out, in), and applied with bmm."""
    if not (adapters and self.path in adapters):
        return F.linear(x, self.weight)
    A, B = adapters[self.path]
    W = self.weight + B.to(self.weight.dtype) @ A.to(self.weight.dtype)  # (N, out, r) @ (N, r, in) -> (N, out, in)
    return torch.bmm(x, W.to(x.dtype).mT)  # (N, L, in) @ (N, in, out) -> (N, L, out)


def run_lora(device, warmup: int, repeats: int) -> dict:
    shape, N, S, T = SETUP["lora"][device.type]
    t5 = make_t5(shape, device).requires_grad_(False)
    lins, paths = t5.adaptable(), target_paths(t5)  # q, v of encoder self, decoder self, decoder cross
    g = torch.Generator().manual_seed(2)
    factors = {p: ((torch.randn(N, RANK, lins[p].in_features, generator=g) / lins[p].in_features ** 0.5),  # A
                   (torch.randn(N, lins[p].out_features, RANK, generator=g) * 0.1 / RANK ** 0.5)) for p in paths}
    factors = {p: (A.to(device).requires_grad_(), B.to(device).requires_grad_()) for p, (A, B) in factors.items()}
    batch, grads = make_batch(N, S, T, device=device), {}

    def backward(name, loss):
        loss.backward()
        grads[name] = torch.cat([t.grad.flatten() for AB in factors.values() for t in AB]) if name != "base" else None
        for AB in factors.values():
            for t in AB:
                t.grad = None

    def base():  # (a) no adapters; the embedding takes a gradient so that backward crosses every layer, as in (b)
        t5.shared.weight.requires_grad_(True)
        with autocast(device):
            loss = t5(**batch).loss
        backward("base", loss)
        t5.shared.weight.requires_grad_(False).grad = None

    def batched(name="batched"):  # (b) ours: two batched matmuls per adapted Linear (model.lora)
        with autocast(device):
            loss = t5(**batch, adapters=factors).loss
        backward(name, loss)

    def loop():  # (c) one batch-1 forward per example, each with its own adapter; summed loss
        with autocast(device):
            loss = sum(t5(**{k: v[i:i + 1] for k, v in batch.items()},
                          adapters={p: (A[i:i + 1], B[i:i + 1]) for p, (A, B) in factors.items()}).loss
                       for i in range(N)) / N  # = the batch mean: every target token is real
        backward("loop", loss)

    def merged():  # (d) W + B_i A_i per example, through a temporarily patched Linear.forward
        original, model.Linear.forward = model.Linear.forward, merged_forward
        try:
            batched("merged")
        finally:
            model.Linear.forward = original

    t = timed({"base": base, "batched": batched, "loop": loop, "merged": merged}, warmup, repeats, device)
    ref = grads["batched"].float()
    err = {k: ((grads[k].float() - ref).abs().max() / ref.abs().max()).item() for k in ("loop", "merged")}
    return dict(shape=shape, N=N, S=S, T=T, rank=RANK, modules=len(paths), seconds=t,
                overhead_pct=100 * (t["batched"] / t["base"] - 1), speedup_vs_loop=t["loop"] / t["batched"],
                speedup_vs_merged=t["merged"] / t["batched"], grad_rel_err=err)


# ----------------------------------------------------------------------------------------------------------------
# 3. Hypernetwork: sizes at v1.1-base shape, and the cost of writing a task's adapters


def count(params) -> int:
    return sum(p.numel() for p in params)


def run_hypernet(device, warmup: int, repeats: int) -> dict:
    with torch.device("meta"):  # sizes only: no memory, no initialisation cost
        tagi = TAGI(T5(T5Config(**config("v1.1-base"))), TAGIConfig(rank=RANK))
    lins = tagi.t5.adaptable()
    sizes = dict(t5_frozen=count(tagi.t5.parameters()),
                 hypernet_trainable=count(p for p in tagi.hypernet.parameters() if p.requires_grad),
                 hypernet_frozen_offset=count(tagi.hypernet.heads0.parameters()),
                 teacher_lora_per_task=sum(RANK * (lins[p].in_features + lins[p].out_features) for p in tagi.targets),
                 adapted_modules=len(tagi.targets))

    shape, N, S, T = SETUP["hypernet"][device.type]
    tagi = TAGI(make_t5(shape, device), TAGIConfig(rank=RANK)).to(device).eval()
    g = torch.Generator().manual_seed(3)
    ins = torch.randint(2, 32128, (1, INSTRUCTION_LEN), generator=g).to(device)
    batch = make_batch(N, S, T, device=device)
    with torch.no_grad():
        states, smask, gen = tagi.task_adapters(ins, torch.ones_like(ins))

    @torch.no_grad()
    def write_adapters():  # Eq. 2: encode the instruction with the frozen encoder, then the hypernetwork
        with autocast(device):
            tagi.task_adapters(ins, torch.ones_like(ins))

    @torch.no_grad()
    def forward_100():  # the student on N instances of that task, reusing its adapters (as TAGI.student does)
        with autocast(device):
            per_ex = {p: (A.expand(N, -1, -1), B.expand(N, -1, -1)) for p, (A, B) in gen.items()}
            mem, mmask = tagi.student_memory(batch["input_ids"], batch["attention_mask"], states.expand(N, -1, -1),
                                             smask.expand(N, -1), per_ex)
            tagi.t5.decode(shift_right(batch["labels"]), mem, mmask, per_ex)

    t = timed({"write_adapters": write_adapters, "forward_100": forward_100}, warmup, repeats, device)
    return dict(sizes=sizes, shape=shape, N=N, S=S, T=T, instruction_len=INSTRUCTION_LEN, seconds=t,
                ratio=t["write_adapters"] / t["forward_100"])


# ----------------------------------------------------------------------------------------------------------------
# Driver: the parent runs each benchmark as `python bench.py --one NAME` and reads the JSON line it prints


def child(name, args) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench.py --one {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(res: dict, info: dict) -> str:
    lines = [f"device {info['device']}, torch {info['torch']}, threads {info['threads']}, warm-up {info['warmup']}, "
             f"median of {info['repeats']}"]
    if "t5-ours" in res:
        ref, r = res["t5-hf"], res["t5-ours"]
        lines += ["", f"### 1. T5 fwd+bwd, {r['shape']}, N {r['N']}, S {r['S']}, T {r['T']}", "",
                  "| model | s/step | tokens/s | speed vs transformers | step memory MiB | memory vs transformers "
                  "| loss |", "|---|---|---|---|---|---|---|"]
        for name in ("t5-hf", "t5-ours", "t5-ours-compile"):
            if name in res:
                r = res[name]
                lines.append(f"| {name} ({r['attn']}) | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                             f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | {r['step_mib']:.0f} | "
                             f"{r['step_mib'] / ref['step_mib']:.2f}x | {r['loss']:.5f} |")
    if "lora" in res:
        r, t = res["lora"], res["lora"]["seconds"]
        lines += ["", f"### 2. Per-example LoRA fwd+bwd, {r['shape']}, N {r['N']}, S {r['S']}, T {r['T']}, "
                      f"r {r['rank']}, {r['modules']} modules", "", "| variant | s/step | vs (b) |", "|---|---|---|"]
        for k, label in [("base", "(a) no adapters"), ("batched", "(b) ours, batched"),
                         ("loop", "(c) loop over examples"), ("merged", "(d) merged W + B_i A_i, bmm")]:
            lines.append(f"| {label} | {t[k]:.3f} | {t[k] / t['batched']:.2f}x |")
        lines += ["", f"overhead of (b) over (a): {r['overhead_pct']:.1f}% (goal <= 15%: "
                      f"{'met' if r['overhead_pct'] <= 15 else 'NOT met'}); (b) vs (c): {r['speedup_vs_loop']:.2f}x "
                      f"faster (goal >= 5x: {'met' if r['speedup_vs_loop'] >= 5 else 'NOT met'}); (b) vs (d): "
                      f"{r['speedup_vs_merged']:.2f}x faster; gradient max rel. diff vs (b): "
                      + ", ".join(f"{k} {v:.1e}" for k, v in r["grad_rel_err"].items())]
    if "hypernet" in res:
        r, s = res["hypernet"], res["hypernet"]["sizes"]
        lines += ["", "### 3. Hypernetwork (sizes at v1.1-base shape, rank 32, q+v of every attention)", "",
                  "| part | parameters |", "|---|---|"]
        lines += [f"| {k} | {v:,} |" for k, v in s.items()]
        t = r["seconds"]
        lines += ["", f"timed at {r['shape']}: write a task's adapters ({r['instruction_len']}-token instruction) "
                      f"{t['write_adapters']:.3f} s; forward of {r['N']} instances (S {r['S']}, T {r['T']}) "
                      f"{t['forward_100']:.3f} s; ratio {r['ratio']:.3f}"]
    return "\n".join(lines)


def main(argv=None):
    ap = data.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--only", default="t5,lora,hypernet", help="comma-separated subset of t5, lora, hypernet")
    ap.add_argument("--quick", action="store_true", help="warm-up 1, repeats 2")
    ap.add_argument("--warmup", type=data.bounded(int, ">= 0"), default=1)
    ap.add_argument("--repeats", type=data.bounded(int, ">= 1"), default=3)
    ap.add_argument("--threads", type=data.bounded(int, ">= 1"), default=1,
                    help="torch and OMP threads (1: comparable, quiet machine)")
    ap.add_argument("--json", help="append the results to this JSON list")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one benchmark, print its JSON
    args = ap.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - {"t5", "lora", "hypernet"})
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; choose from t5, lora, hypernet")
    runs = []  # --json is read now, not after minutes of benchmarks
    if args.json and Path(args.json).exists():
        try:
            runs = json.loads(Path(args.json).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--json {args.json}: unreadable or broken JSON ({e}); pass a new file") from None
        if not isinstance(runs, list):
            raise SystemExit(f"--json {args.json}: holds no JSON list; pass a new file")
    elif args.json and not Path(args.json).resolve().parent.is_dir():
        raise SystemExit(f"--json {args.json}: no folder {Path(args.json).parent}")
    device = data.pick_device(args.device)
    args.device = device.type
    if args.quick:
        args.warmup, args.repeats = 1, 2
    torch.set_num_threads(args.threads)
    if args.one:
        fn = run_lora if args.one == "lora" else run_hypernet if args.one == "hypernet" else \
            lambda d, w, r: run_t5(args.one, d, w, r)
        print(json.dumps(fn(device, args.warmup, args.repeats)))
        return
    names = []
    for b in args.only.split(","):
        names += (["t5-hf", "t5-ours"] + (["t5-ours-compile"] if device.type == "cuda" else [])) if b == "t5" else [b]
    info = dict(date=str(date.today()), device=torch.cuda.get_device_name() if device.type == "cuda" else
                f"{platform.machine()} CPU, {os.cpu_count()} cores", torch=torch.__version__, threads=args.threads,
                warmup=args.warmup, repeats=args.repeats)
    res = {}
    for name in names:
        t = time.perf_counter()
        res[name] = child(name, args)
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    print(report(res, info))
    if args.json:
        Path(args.json).write_text(json.dumps(runs + [{**info, "results": res}], indent=1) + "\n")


if __name__ == "__main__":
    data.cli(main)
