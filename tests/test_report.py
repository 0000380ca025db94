"""The evidence layer: mean ± std over seeds, the noise rule, the per-family and Table 4 tables, the scaling subsets,
the base's lookup objective, the pipeline's stage graph and the figures."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import data
import evaluate
import train


def fake_results(seed, shift):
    """A results.json as compare writes it, with numbers that move with `shift`."""
    def split(x):
        return {"overall": {"rougeL": x, "exact_match": x / 2},
                "per_category": {"contains": {"rougeL": x + 10, "exact_match": 1.0},
                                 "after": {"rougeL": x - 10, "exact_match": 2.0}}}
    out = {"config": {"seed": seed}}
    for k, name in enumerate(["base", "tk-instruct", "tagi", *evaluate.ABLATIONS]):
        out[name] = {"held-out": split(20.0 + k + shift), "seen": split(30.0 + k - shift), "flops_vs_tk": 0.5}
    return out


def test_summary_is_mean_and_sample_std_of_every_number(tmp_path):
    shifts = [0.0, 1.0, 5.0]
    runs = [fake_results(s, x) for s, x in enumerate(shifts)]
    for s, r in enumerate(runs):  # results already there: report trains nothing
        d = evaluate.seed_dir(tmp_path, s) / "results"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(r))
    evaluate.report(tmp_path, 3, ablations=True, scaling=False, plot=False, device_flag="cpu")
    summ = json.loads((tmp_path / "results" / "summary.json").read_text())
    m = sum(shifts) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in shifts) / 2)  # sample std (n - 1)
    tagi = summ["tagi"]["held-out"]
    assert summ["seeds"] == [0, 1, 2]
    assert tagi["overall"]["rougeL"] == {"mean": round(22.0 + m, 2), "std": round(sd, 2)}
    assert tagi["overall"]["exact_match"] == {"mean": round((22.0 + m) / 2, 2), "std": round(sd / 2, 2)}
    assert tagi["per_category"]["after"]["rougeL"] == {"mean": round(12.0 + m, 2), "std": round(sd, 2)}
    assert summ["tagi"]["seen"]["overall"]["rougeL"]["mean"] == round(32.0 - m, 2)
    md = (tmp_path / "results" / "summary.md").read_text()
    assert f"| tagi | {22.0 + m:.1f} ± {sd:.1f} |" in md
    assert f"| contains | {30 + m:.0f} ± {sd:.0f} | {31 + m:.0f} ± {sd:.0f} | {32 + m:.0f} ± {sd:.0f} |" in md
    # the ablations sit 1, 2, ... 5 points above tagi, both rows with a std of 2.65: 1 and 2 are within noise
    assert md.count("(within noise)") == 4 and md.count("+3.0 (higher)") == 2


def test_a_difference_is_called_only_beyond_both_spreads():
    a = {"mean": 30.0, "std": 1.0}
    assert evaluate.noise_verdict(a, {"mean": 31.5, "std": 2.0}) == "within noise"  # inside b's spread
    assert evaluate.noise_verdict(a, {"mean": 31.5, "std": 0.5}) == "higher"
    assert evaluate.noise_verdict(a, {"mean": 29.0, "std": 0.1}) == "within noise"  # exactly a's spread
    assert evaluate.noise_verdict(a, {"mean": 28.9, "std": 0.1}) == "lower"
    assert evaluate.mean_std([4.0]) == {"mean": 4.0, "std": 0.0}


def test_tasks_per_category_keeps_the_first_tasks_of_each_category(tmp_path):
    suite = data.make_suite(tmp_path / "suite", instances_per_task=3)
    every = data.load_sni(suite, part="train", max_instances=1)
    kept = data.load_sni(suite, part="train", max_instances=1, per_category=5)
    by_cat = {}
    for t in every:
        by_cat.setdefault(t["Categories"][0], []).append(t["name"])
    assert [t["name"] for t in kept] == [t["name"] for t in every if t["name"] in by_cat[t["Categories"][0]][:5]]
    assert len(kept) == 5 * len(data.SUITE_FAMILIES)
    assert data.load_sni(suite, part="test", per_category=5) == data.load_sni(suite, part="test")  # 2 each


def test_lookup_objective_answers_the_token_after_the_query_or_absent():
    V = 740
    texts = [list(range(3, 3 + n)) + [3, 50] for n in (2, 5, 17, 40)] + [[600, 601, 602]]
    b = train.TextBatcher(texts, 64, V, seed=0)
    found = absent = others = 0
    for step in range(6):
        batch = b.batch(step)
        for src, tgt in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            src, tgt = src[:src.index(1)], tgt[:tgt.index(1)]
            if src[0] != V - 98:
                others += 1
                continue
            q, text = src[1], src[2:]
            assert text in texts
            if q in text:
                found += 1
                assert tgt == [text[text.index(q) + 1]]  # the first occurrence (3 occurs twice)
            else:
                absent += 1
                assert tgt == [V - 97] and any(q in t for t in texts)
    assert 60 < found + absent < 130 and 20 < absent < found + absent - 20, (found, absent, others)


def test_pipeline_graph_orders_stages_and_keeps_what_is_trained(tmp_path):
    cfg = train.resolve(train.parse_args(["--out", str(tmp_path)]))
    jobs = train.pipeline(cfg)
    folders = [train.folder(c, s).name for s, c in jobs]
    assert folders == ["tk", "pretrain", "teachers-category", "teachers-all", "teachers-all-instance", "finetune",
                       "finetune-hint"]
    assert {train.folder(c, s).name for s, c in train.prerequisites(jobs[-2][1], "finetune")} == {
        "tk", "pretrain", "teachers-category"}  # L_kl's tk, the pretrained hypernetwork, L_ins's teachers
    assert {train.folder(c, s).name for s, c in train.prerequisites(jobs[-1][1], "finetune")} == {"pretrain"}
    hint = jobs[-1][1]
    assert (hint.kl_weight, hint.ins_weight, hint.ce_weight, hint.fusion) == (0.0, 0.0, 1.0, "concat")
    d = train.folder(hint, "finetune")
    d.mkdir(parents=True)
    c = train.stage_defaults(hint, "finetune")
    (d / "stage.json").write_text(json.dumps({"stage": "finetune", "config": {**vars(c), "log_every": 7}}))
    assert train.trained(hint, "finetune")  # how often it logs does not change what a stage computes
    assert not train.trained(train.replace(hint, ins_weight=1e-3), "finetune")


def test_chance_is_the_expected_score_of_a_guess_of_the_right_form(tmp_path):
    """Closed forms: yes / no and either named word score 50; a position 1..n guessed uniformly scores 1/n; the
    input copied unchanged scores (n - 1) / n for `replace` (one word of n differs)."""
    names = {}
    for fam, p in (("contains", ("cat",)), ("label", ("cat", "dog", "sun")), ("position", ("cat",)),
                   ("replace", ("cat", "dog"))):
        t = data._suite_task(f"suite_{fam}_x", fam, p, 0, seed=0, n=30)
        (tmp_path / "tasks").mkdir(exist_ok=True)
        (tmp_path / "tasks" / f"{t['Suite']['family']}.json").write_text(json.dumps(t))
        names[fam] = [len(x["input"].split()) for x in t["Instances"]]
    (tmp_path / "splits" / "default").mkdir(parents=True)
    (tmp_path / "splits" / "default" / "test_tasks.txt").write_text("\n".join(names) + "\n")
    got = evaluate.chance(tmp_path, 30)
    assert got["contains"] == got["label"] == 50.0
    assert got["position"] == pytest.approx(100 * sum(1 / n for n in names["position"]) / 30)
    assert got["replace"] == pytest.approx(100 * sum((n - 1) / n for n in names["replace"]) / 30)


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--out", str(tmp_path), "--plot"])
    assert str(e.value) == "--plot: needs matplotlib, which is not installed: pip install matplotlib"
    assert not any(tmp_path.iterdir())


def test_plots_are_pngs_of_the_logged_curves_and_the_tables(tmp_path):
    pytest.importorskip("matplotlib")
    for name, keys in (("tk", ["loss"]), ("finetune", ["ce", "kl", "loss"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text("".join(
            json.dumps({"step": s, **{k: 1.0 / s for k in keys}, "lr": 0.1}) + "\n" for s in (1, 2, 3)))
    summ = evaluate.summarize([fake_results(0, 0.0), fake_results(1, 2.0)])
    files = evaluate.plots(tmp_path, summ, {8: {"tagi": 10.0, "tk-instruct": 12.0},
                                            120: {"tagi": 30.0, "tk-instruct": 31.0}})
    assert [f.name for f in files] == ["curves.png", "table2.png", "table4.png", "scaling.png"]
    for f in files:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
