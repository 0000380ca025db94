"""Per-example LoRA application (model.py) and the PEFT interchange (tagi.export_peft / load_peft).

The closed form everything is checked against: an adapter (A, B) on a Linear W means the merged weight W + B A
(PEFT orientation, α/r already folded into B). So a batch where example i carries (A_i, B_i) must equal, example by
example, a deep copy of the model whose weights were merged with that example's factors, run alone.
"""
import copy
import json

import pytest
import torch

from conftest import random_hf_t5
from hypernet import target_paths
from model import T5, T5Config, load_safetensors, save_safetensors
from tagi import export_peft, load_peft

STYLES = {  # v1.0: relu, tied embeddings (decoder output scaled); v1.1: gated gelu, untied
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
FFN = {"v1.0": ("wi", "wo"), "v1.1": ("wi_0", "wi_1", "wo")}


def config(style, **kw):
    base = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
                dropout_rate=0.0)
    return {**base, **STYLES[style], **kw}


def tiny_t5(style, seed=0):
    torch.manual_seed(seed)
    t5 = T5(T5Config(**config(style))).eval()
    if not t5.config.tie_word_embeddings:  # logits of order 1-5 (like v1.0's scaled ones), so that a 1e-5 absolute
        with torch.no_grad():  # bound is a ~1e-6 relative one, as float32 allows
            t5.lm_head.weight.mul_(0.2)
    return t5


def batch(vocab, N=4, S=10, T=7, seed=1):
    """Source padded to different lengths per example; some labels padded with -100."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (N, S), generator=g)
    lengths = torch.tensor([S, 6, 3, 8][:N])
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    x[mask == 0] = 0
    y = torch.randint(2, vocab, (N, T), generator=g)
    y[1, 4:] = -100
    return x, mask, y


def random_adapters(t5, paths, N, rank=3, seed=2, strength=0.5):
    """{path: (A (N, r, in), B (N, out, r))} with an update B A comparable in size to W (so that it matters)."""
    g = torch.Generator().manual_seed(seed)
    lins = t5.adaptable()
    out = {}
    for p in paths:
        w = lins[p].weight
        A = torch.randn(N, rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
        B = torch.randn(N, w.shape[0], rank, generator=g) * (strength * w.std().item() * (w.shape[1] / rank) ** 0.5)
        out[p] = (A, B)
    return out


def merged(t5, adapters, i):
    """A copy of t5 with example i's update (or the shared N = 1 one) added into its weights: W + B_i A_i."""
    m = copy.deepcopy(t5)
    lins = m.adaptable()
    with torch.no_grad():
        for p, (A, B) in adapters.items():
            j = i if A.shape[0] > 1 else 0
            lins[p].weight += B[j] @ A[j]
    return m


def target_sets(t5, style):
    return {"qv": target_paths(t5, ("q", "v")), "ko": target_paths(t5, ("k", "o")),
            "ffn": target_paths(t5, FFN[style])}


# ----------------------------------------------------------------------------------------------------------------
# Per-example application == merged weights, one example at a time


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("which", ["qv", "ko", "ffn"])
def test_per_example_adapters_equal_merged_weights(style, which):
    t5 = tiny_t5(style)
    paths = target_sets(t5, style)[which]
    if which != "ffn":  # the paper's three attentions are all covered
        assert {p.split(".")[0] + "." + p.split(".")[-2] for p in paths} == {
            "encoder.SelfAttention", "decoder.SelfAttention", "decoder.EncDecAttention"}
        assert len(paths) == 2 * (2 + 2 + 2)
    else:
        assert len(paths) == len(FFN[style]) * 4
    x, mask, y = batch(t5.config.vocab_size)
    N = x.shape[0]
    ad = random_adapters(t5, paths, N)
    with torch.no_grad():
        out = t5(x, mask, labels=y, adapters=ad).logits
        base = t5(x, mask, labels=y).logits
        for i in range(N):
            n = int(mask[i].sum())  # the example alone, its padding removed
            ref = merged(t5, ad, i)(x[i:i + 1, :n], torch.ones(1, n, dtype=torch.long), labels=y[i:i + 1]).logits
            assert (out[i] - ref[0]).abs().max().item() <= 1e-5
            assert (out[i] - base[i]).abs().max().item() > 1e-2  # the adapter really changes this example


def test_mixed_batch_factors_are_not_shared_across_examples():
    """Every example in the batch has its own factors: permuting the adapters' batch rows permutes the outputs."""
    t5 = tiny_t5("v1.1")
    x, mask, y = batch(t5.config.vocab_size)
    ad = random_adapters(t5, target_paths(t5, ("q", "v", "o")), 4)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = t5(x, mask, labels=y, adapters=ad).logits
        out_p = t5(x[perm], mask[perm], labels=y[perm],
                   adapters={p: (A[perm], B[perm]) for p, (A, B) in ad.items()}).logits
    assert (out[perm] - out_p).abs().max().item() <= 1e-5


@pytest.mark.parametrize("style", STYLES)
def test_shared_adapter_broadcasts_like_repeated(style):
    t5 = tiny_t5(style)
    x, mask, y = batch(t5.config.vocab_size)
    N = x.shape[0]
    shared = random_adapters(t5, target_paths(t5, ("q", "v") + FFN[style]), 1)
    repeated = {p: (A.expand(N, -1, -1).clone(), B.expand(N, -1, -1).clone()) for p, (A, B) in shared.items()}
    with torch.no_grad():
        a = t5(x, mask, labels=y, adapters=shared).logits
        b = t5(x, mask, labels=y, adapters=repeated).logits
        ref = merged(t5, shared, 0)(x, mask, labels=y).logits
    assert (a - b).abs().max().item() <= 1e-6
    assert (a - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("style", STYLES)
def test_greedy_generation_with_per_example_adapters(style):
    """KV-cached greedy decoding under per-example adapters == each example generated alone, weights merged."""
    t5 = tiny_t5(style, seed=5)
    x, mask, _ = batch(t5.config.vocab_size, seed=6)
    N, steps = x.shape[0], 12
    ad = random_adapters(t5, target_paths(t5, ("q", "k", "v", "o") + FFN[style]), N, seed=7)
    out = t5.generate(x, mask, max_new_tokens=steps, adapters=ad)
    plain = t5.generate(x, mask, max_new_tokens=steps)
    assert not torch.equal(out, plain)  # the adapters change what is generated
    for i in range(N):
        n = int(mask[i].sum())
        alone = merged(t5, ad, i).generate(x[i:i + 1, :n], torch.ones(1, n, dtype=torch.long), max_new_tokens=steps)
        L = alone.shape[1]
        assert torch.equal(out[i, :L], alone[0])
        assert (out[i, L:] == 0).all()  # a sequence that ended alone is padded in the batch


# ----------------------------------------------------------------------------------------------------------------
# PEFT interchange

def hf_and_ours(style, seed=0):
    """A transformers T5 with random weights (the reference; peft needs it too) and our T5 with the same weights."""
    kw = config(style)
    hf = random_hf_t5(kw, seed, std=0.3)
    ours = T5(T5Config(**kw)).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def peft_logits(peft_model, x, mask, y):
    with torch.no_grad():
        return peft_model(input_ids=x, attention_mask=mask, labels=y).logits


@pytest.mark.parametrize("style", STYLES)
def test_exported_adapter_loads_in_peft(style, tmp_path):
    peft = pytest.importorskip("peft")
    hf, ours = hf_and_ours(style)
    x, mask, y = batch(ours.config.vocab_size)
    ad = random_adapters(ours, target_paths(ours, ("q", "v", "o") + FFN[style]), 1, rank=4, seed=3)
    export_peft(ad, tmp_path / "ad", base_model="tiny-t5")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["base_model_name_or_path"] == "tiny-t5"
    names = set(load_safetensors(tmp_path / "ad" / "adapter_model.safetensors"))
    assert names == {f"base_model.model.{p}.lora_{f}.weight" for p in ad for f in "AB"}
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    ref = peft_logits(pm, x, mask, y)
    with torch.no_grad():
        out = ours(x, mask, labels=y, adapters=ad).logits
        base = ours(x, mask, labels=y).logits
    assert (ref - out).abs().max().item() <= 1e-4
    assert (ref - base).abs().max().item() > 1e-2  # PEFT really applied the adapter
    back = load_peft(tmp_path / "ad")  # and our own reader round-trips our writer
    assert set(back) == set(ad)
    for p, (A, B) in ad.items():
        assert torch.equal(back[p][0], A) and torch.allclose(back[p][1], B, rtol=1e-6, atol=0)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_created_adapter_loads_in_ours(style, rslora, tmp_path):
    peft = pytest.importorskip("peft")
    hf, ours = hf_and_ours(style, seed=1)
    x, mask, y = batch(ours.config.vocab_size)
    with torch.no_grad():
        base = ours(x, mask, labels=y).logits
    torch.manual_seed(4)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                 init_lora_weights=False, use_rslora=rslora)).eval()
    pm.save_pretrained(tmp_path / "peft")
    ref = peft_logits(pm, x, mask, y)
    ad = load_peft(tmp_path / "peft")
    assert set(ad) == set(target_paths(ours, ("q", "v")))
    scale = 8 / (4 ** 0.5 if rslora else 4)
    lora = dict(pm.named_modules())
    p = "encoder.block.1.layer.0.SelfAttention.v"
    m = lora[f"base_model.model.{p}"]
    assert torch.allclose(ad[p][1][0], m.lora_B["default"].weight * scale, rtol=1e-6, atol=0)
    with torch.no_grad():
        out = ours(x, mask, labels=y, adapters=ad).logits
    assert (ref - out).abs().max().item() <= 1e-4
    assert (ref - base).abs().max().item() > 1e-2


def test_alpha_pattern_matches_like_peft(tmp_path):
    """alpha_pattern {"o": 16} means modules *named* o to PEFT; "o" also occurs in every "encoder"/"decoder" path."""
    peft = pytest.importorskip("peft")
    hf, ours = hf_and_ours("v1.1", seed=2)
    x, mask, y = batch(ours.config.vocab_size)
    torch.manual_seed(5)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "o"],
                                                 alpha_pattern={"o": 16}, init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    ref = peft_logits(pm, x, mask, y)
    with torch.no_grad():
        out = ours(x, mask, labels=y, adapters=load_peft(tmp_path / "peft")).logits
    assert (ref - out).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------------------------------------------
# load_peft: errors name the file and the field


def exported(tmp_path):
    t5 = tiny_t5("v1.1")
    d = export_peft(random_adapters(t5, target_paths(t5, ("q", "v")), 1, rank=2), tmp_path / "ad")
    return d, d / "adapter_config.json", d / "adapter_model.safetensors"


def edit_config(path, **changes):
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, field", [({"peft_type": "IA3"}, "peft_type"), ({"r": None}, "'r'"),
                                            ({"lora_alpha": "eight"}, "lora_alpha")])
def test_load_peft_config_errors_name_file_and_field(tmp_path, changes, field):
    d, cfg_path, _ = exported(tmp_path)
    edit_config(cfg_path, **changes)
    with pytest.raises(ValueError) as e:
        load_peft(d)
    assert str(cfg_path) in str(e.value) and field in str(e.value)


def test_load_peft_bad_tensor_name(tmp_path):
    d, _, st = exported(tmp_path)
    sd = load_safetensors(st)
    sd["base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_C.weight"] = torch.zeros(2, 2)
    save_safetensors(sd, st)
    with pytest.raises(ValueError) as e:
        load_peft(d)
    assert str(st) in str(e.value) and "lora_C" in str(e.value)


def test_load_peft_missing_lora_B(tmp_path):
    d, _, st = exported(tmp_path)
    sd = load_safetensors(st)
    del sd["base_model.model.decoder.block.1.layer.1.EncDecAttention.v.lora_B.weight"]
    save_safetensors(sd, st)
    with pytest.raises(ValueError) as e:
        load_peft(d)
    msg = str(e.value)
    assert str(st) in msg and "decoder.block.1.layer.1.EncDecAttention.v" in msg and "lora_B" in msg


def test_load_peft_missing_config(tmp_path):
    d, cfg_path, _ = exported(tmp_path)
    cfg_path.unlink()
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_peft(d)
