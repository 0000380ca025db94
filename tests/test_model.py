"""model.py against Hugging Face transformers' T5ForConditionalGeneration (the reference), on random weights."""
import json

import pytest
import torch

from conftest import random_hf_t5
from model import T5, T5Config, load_safetensors

transformers = pytest.importorskip("transformers")

STYLES = {  # (a) v1.0: relu, tied embeddings; (b) v1.1 / lm-adapt: gated-gelu, untied, decoder shallower
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
    assert (ref.logits - out.logits).abs().max().item() <= 1e-4
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


@pytest.mark.parametrize("style", STYLES)
def test_our_checkpoint_loads_in_transformers(style, tmp_path):
    kw = config(style)
    hf = hf_model(kw)
    ours = ours_from(hf, kw)
    ours.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_safetensors(tmp_path / "model.safetensors") or kw["tie_word_embeddings"]
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_same_outputs(reloaded, ours, kw["vocab_size"])


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_transformers_checkpoint_loads_in_ours(style, shard, tmp_path):
    kw = config(style)
    hf = hf_model(kw)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    ours = T5.from_pretrained(tmp_path).eval()
    assert ours.config.gated == kw["feed_forward_proj"].startswith("gated")
    assert_same_outputs(hf, ours, kw["vocab_size"])


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
