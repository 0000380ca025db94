import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch

torch.set_num_threads(1)  # tiny models: threads only add contention (and CI machines share their cores)


def random_hf_t5(kw: dict, seed: int = 0, std: float = 0.5):
    """The reference: transformers' T5ForConditionalGeneration from config kwargs, every weight ~ N(0, std²).
    transformers 5 ties lm_head at construction; an untied config gets its own lm_head, as real v1.1 files have."""
    import pytest
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        **kw, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    if not kw["tie_word_embeddings"]:
        hf.lm_head.weight = torch.nn.Parameter(torch.empty(kw["vocab_size"], kw["d_model"]))
    for p in hf.parameters():
        p.data.normal_(0, std)
    return hf
