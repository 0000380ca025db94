"""model.py against Hugging Face transformers' T5ForConditionalGeneration (the reference), on random weights."""
import json

import pytest
import torch

from conftest import random_hf_t5
from model import T5, T5Config, load_safetensors, save_safetensors

transformers = pytest.importorskip("transformers")

STYLES = {  # (a) v1.0: relu, tied, scaled output; (b) v1.1 / lm-adapt: gated-gelu, unscaled, decoder shallower
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_layers=3, num_decoder_layers=3),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=3, num_decoder_layers=2),
}


def config(style, **kw):
    base = dict(vocab_size=320, d_model=64, d_kv=16, d_ff=96, num_heads=4, dropout_rate=0.0,
                relative_attention_num_buckets=32, relative_attention_max_distance=128)
    return {**base, **STYLES[style], **kw}


def hf_model(kw, seed=0):
    return random_hf_t5(kw, seed)


def ours_from(hf, kw):
    model = T5(T5Config(**kw)).eval()
    model.load_state_dict(hf.state_dict())
    return model


def batch(vocab, N=3, S=150, T=24, seed=1):
    """A padded batch whose longest source (150) exceeds the 128-token max distance of the position buckets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (N, S), generator=g)
    mask = torch.ones(N, S, dtype=torch.long)
    mask[1, 97:], mask[2, 11:] = 0, 0
    x[mask == 0] = 0
    y = torch.randint(2, vocab, (N, T), generator=g)
    y[1, 9:] = -100
    return x, mask, y


def assert_same_outputs(hf, ours, vocab):
    x, mask, y = batch(vocab)
    with torch.no_grad():
        ref, out = hf(input_ids=x, attention_mask=mask, labels=y), ours(input_ids=x, attention_mask=mask, labels=y)
    # float32: a few ulps of the logits' scale (transformers releases change summation order, e.g. 5.25 moved one
    # logit by 1.1e-4 out of 4.6); the float64 tests below check exactness
    assert (ref.logits - out.logits).abs().max().item() <= 3e-5 * max(1.0, ref.logits.abs().max().item())
    assert abs(ref.loss.item() - out.loss.item()) <= 1e-5


@pytest.mark.parametrize("style", STYLES)
def test_state_dict_names_match(style):
    kw = config(style)
    assert list(T5(T5Config(**kw)).state_dict()) == list(hf_model(kw).state_dict())


@pytest.mark.parametrize("style", STYLES)
def test_logits_loss_and_greedy_match_transformers(style):
    kw = config(style)
    hf = hf_model(kw)
    ours = ours_from(hf, kw)
    assert_same_outputs(hf, ours, kw["vocab_size"])
    x, mask, _ = batch(kw["vocab_size"])
    ref = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                      num_beams=1)
    out = ours.generate(x, mask, max_new_tokens=32)
    assert out.shape == (3, 32) and torch.equal(ref[:, 1:], out)


def test_generation_stops_at_eos_like_transformers():
    kw = config("v1.1")
    hf = hf_model(kw, seed=3)
    x, mask, _ = batch(kw["vocab_size"], N=6, seed=4)
    mask[3:, 40:] = 0
    first = ours_from(hf, kw).generate(x, mask, max_new_tokens=32)
    with torch.no_grad():  # eos (id 1) now beats one token the model likes, so sequences end at different steps
        hf.lm_head.weight[1] = hf.lm_head.weight[first[0, 4]] * 1.01
    ours = ours_from(hf, kw)
    ref = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=32, do_sample=False, num_beams=1)[:, 1:]
    out = ours.generate(x, mask, max_new_tokens=32)
    assert (out == 1).any(), "the crafted model should emit eos"
    assert torch.equal(ref, out)


def test_score_is_mean_token_nll():
    kw = config("v1.0")
    hf = hf_model(kw)
    ours = ours_from(hf, kw)
    x, mask, y = batch(kw["vocab_size"])
    nll = ours.score(x, mask, y)
    for i in range(3):
        keep = y[i] != -100
        with torch.no_grad():
            ref = hf(input_ids=x[i:i + 1, :int(mask[i].sum())], labels=y[i:i + 1, keep]).loss
        assert abs(nll[i].item() - ref.item()) < 1e-5


def logits64(model, vocab=320):
    """(N, T, V) logits of `model` on the test batch (float64 when the model is)."""
    x, mask, y = batch(vocab)
    with torch.no_grad():
        return model(input_ids=x, attention_mask=mask, labels=y).logits


def hf_checkpoint(style, gen, shard, tmp_path):
    """A reference transformers T5 (float64) and a directory holding it as transformers `gen` (4 or 5) writes it.
    5 ties lm_head always and writes scale_decoder_outputs; 4's v1.1 has its own lm_head.weight, and 4's
    tie_word_embeddings means tied and scaled. transformers 4 is not installed: its files are 5's, edited, and
    transformers 5 itself builds the untied reference from such a file."""
    kw = config(style)
    hf = random_hf_t5(kw)
    if gen == 4 and style == "v1.1":
        hf.save_pretrained(tmp_path / "untied")
        sd = load_safetensors(tmp_path / "untied" / "model.safetensors")
        sd["lm_head.weight"] = torch.randn(kw["vocab_size"], kw["d_model"]) * 0.5
        save_safetensors(sd, tmp_path / "untied" / "model.safetensors", {"format": "pt"})
        hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "untied").eval()
        assert hf.lm_head.weight is not hf.shared.weight
    d = tmp_path / "ckpt"
    hf.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    if gen == 4:
        cfg = json.loads((d / "config.json").read_text())
        cfg["tie_word_embeddings"] = cfg.pop("scale_decoder_outputs")
        (d / "config.json").write_text(json.dumps(cfg))
    return hf.double(), d


@pytest.mark.parametrize("shard", [None, "20KB"])
@pytest.mark.parametrize("style,gen", [("v1.0", 5), ("v1.0", 4), ("v1.1", 5), ("v1.1", 4)])
def test_transformers_checkpoint_loads_in_ours(style, gen, shard, tmp_path, hf_float64):
    """v1.0 (tied, scaled); transformers 5's v1.1 (tied, unscaled, no lm_head.weight); transformers 4's v1.1
    (its own head): the config and the tying come back, and the logits equal the reference's in float64."""
    hf, d = hf_checkpoint(style, gen, shard, tmp_path)
    assert (d / "model.safetensors.index.json").exists() == bool(shard)
    ours = T5.from_pretrained(d, dtype=torch.float64).eval()
    assert ours.config.gated == (style == "v1.1") and ours.config.scale_decoder_outputs == (style == "v1.0")
    assert (ours.lm_head.weight is ours.shared.weight) == (style == "v1.0" or gen == 5)
    assert (logits64(hf) - logits64(ours)).abs().max().item() <= 1e-10


HEADS = {  # (feed_forward_proj, tie_word_embeddings, scale_decoder_outputs)
    "v1.0": ("relu", True, True),
    "v1.1-untied": ("gated-gelu", False, False),  # transformers 4's v1.1, and our tiny base model
    "v1.1-tied": ("gated-gelu", True, False),  # transformers 5's v1.1
    "untied-scaled": ("relu", False, True),  # a v1.0 file whose lm_head.weight differs from shared
}


def read_as_transformers4(d):
    """transformers 4's reading of a directory: tie_word_embeddings both ties lm_head to shared and scales; an
    untied head is the file's lm_head.weight (without one, transformers 4 would start from a random head)."""
    hf = transformers.T5ForConditionalGeneration.from_pretrained(d, dtype=torch.float64).eval()
    tie = json.loads((d / "config.json").read_text())["tie_word_embeddings"]
    sd = load_safetensors(d / "model.safetensors")
    assert tie or "lm_head.weight" in sd, "untied without lm_head.weight: transformers 4 gets a random head"
    hf.config.scale_decoder_outputs = tie
    hf.lm_head.weight = hf.shared.weight if tie else torch.nn.Parameter(sd["lm_head.weight"].double())
    return hf


@pytest.mark.parametrize("head", HEADS)
def test_our_checkpoint_reads_back_the_same_everywhere(head, tmp_path, hf_float64):
    """Our save_pretrained, read by us, by transformers 5 and as transformers 4 reads it: the same logits in
    float64; an untied scaled head is the one transformers 4 cannot express (it drops the d_model^-0.5)."""
    ffn, tie, scale = HEADS[head]
    torch.manual_seed(0)
    ours = T5(T5Config(**config("v1.0", feed_forward_proj=ffn, tie_word_embeddings=tie,
                                 scale_decoder_outputs=scale))).double().eval()
    ours.save_pretrained(tmp_path)
    ref = logits64(ours)
    back = T5.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert (back.lm_head.weight is back.shared.weight) == tie and back.config.scale_decoder_outputs == scale
    assert (logits64(back) - ref).abs().max().item() <= 1e-10
    hf5 = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert (logits64(hf5) - ref).abs().max().item() <= 1e-10
    factor = ours.config.d_model ** -0.5 if head == "untied-scaled" else 1.0
    assert (logits64(read_as_transformers4(tmp_path)) * factor - ref).abs().max().item() <= 1e-10


def test_gatedness_from_weights_and_embedding_alias(tmp_path):
    """A config that says relu over a gated checkpoint, and a file with only encoder.embed_tokens, still load."""
    kw = config("v1.1")
    hf = hf_model(kw)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["feed_forward_proj"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = load_safetensors(tmp_path / "model.safetensors")
    sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
    from model import save_safetensors
    save_safetensors(sd, tmp_path / "model.safetensors", {"format": "pt"})
    assert_same_outputs(hf, T5.from_pretrained(tmp_path).eval(), kw["vocab_size"])


def test_strict_loading_names_every_problem(tmp_path):
    kw = config("v1.1")
    T5(T5Config(**kw)).save_pretrained(tmp_path)
    sd = load_safetensors(tmp_path / "model.safetensors")
    del sd["encoder.final_layer_norm.weight"]
    sd["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(1)
    from model import save_safetensors
    save_safetensors(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        T5.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "model.safetensors" in msg and "encoder.final_layer_norm.weight" in msg and "extra.weight" in msg
    assert "encoder.block.0.layer.0.SelfAttention.q.weight (3, 3)" in msg


def test_bf16_load_and_config_defaults(tmp_path):
    kw = config("v1.0")
    T5(T5Config(**kw)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for k in ("relative_attention_max_distance", "num_decoder_layers", "tie_word_embeddings"):
        del cfg[k]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = T5.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert m.shared.weight.dtype == torch.bfloat16 and m.lm_head.weight is m.shared.weight
    assert m.config.relative_attention_max_distance == 128 and m.config.num_decoder_layers == 3
