import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only add contention (and CI machines share their cores)


def random_hf_t5(kw: dict, seed: int = 0, std: float = 0.5):
    """The reference: transformers' T5ForConditionalGeneration from config kwargs, every weight ~ N(0, std²), built
    as transformers builds it: transformers 5 ties lm_head to the embedding always, and tie_word_embeddings=False
    only turns off the d_model^-0.5 output scaling (v1.1)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        **kw, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    for p in hf.parameters():
        p.data.normal_(0, std)
    return hf


@pytest.fixture
def hf_float64(monkeypatch):
    """transformers' T5LayerNorm takes mean(x²) in float32 even for float64 inputs (model.py keeps float64): make
    the reference float64 throughout, so that float64 comparisons can be tight. float32 results are unchanged."""
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(t5.T5LayerNorm, "forward", forward)


def pytest_configure(config):
    """One marker per classroom exercise (tests/exercises.json, ASSIGNMENTS.md), for --strict-markers (pytest.ini)."""
    import json
    manifest = json.loads((pathlib.Path(__file__).with_name("exercises.json")).read_text(encoding="utf-8"))
    for ex in manifest["exercises"]:
        config.addinivalue_line("markers", f"{ex['id']}: exercise {ex['id']}, {ex['title']}")
