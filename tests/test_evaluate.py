"""evaluate.py beyond the metrics: rank classification and the FLOP accounting behind the efficiency claim."""
import torch

import evaluate
from model import T5, T5Config
from tagi import TAGI, TAGIConfig


class CharTokenizer:
    """Just enough of data.Tokenizer for rank_classification: one id per character, eos 1."""
    def encode(self, text):
        return [3 + ord(c) % 50 for c in text] + [1]


def test_rank_classification_picks_lowest_mean_nll_and_averages_prompts_then_tasks():
    items = [  # task A has two prompts (one item each), task B one prompt with two items
        {"inputs": "q1", "choices": ["x", "yy", "z"], "answer": 1, "task": "A", "prompt": "p1"},
        {"inputs": "q2", "choices": ["x", "yy"], "answer": 0, "task": "A", "prompt": "p2"},
        {"inputs": "q3", "choices": ["aaa", "b"], "answer": 0, "task": "B", "prompt": "p1"},
        {"inputs": "q4", "choices": ["aaa", "b"], "answer": 1, "task": "B", "prompt": "p1"},
    ]
    # crafted mean NLLs: the scorer sees labels = choice + eos; its score is looked up by (input, choice)
    table = {("q1", "x"): 2.0, ("q1", "yy"): 0.5, ("q1", "z"): 0.7, ("q2", "x"): 1.0, ("q2", "yy"): 0.9,
             ("q3", "aaa"): 0.1, ("q3", "b"): 0.2, ("q4", "aaa"): 0.3, ("q4", "b"): 0.35}
    tok = CharTokenizer()
    decode = {tuple(tok.encode(s)): s for s in ("q1", "q2", "q3", "q4", "x", "yy", "z", "aaa", "b")}

    def nll(b):
        out = []
        for ids, mask, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            q = decode[tuple(ids[mask.bool()].tolist())]
            c = decode[tuple(lab[lab != -100].tolist())]
            out.append(table[q, c])
        return torch.tensor(out)
    res = evaluate.rank_classification(nll, items, tok, "cpu", batch_size=3)
    assert res["predictions"] == [1, 1, 0, 0]  # q2 and q4 pick the wrong option
    # task A: prompt p1 100%, p2 0% -> 50%; task B: one prompt, 1 of 2 right -> 50%; mean 50
    assert res["per_task"] == {"A": 50.0, "B": 50.0} and res["accuracy"] == 50.0


def tiny_config(**kw):
    return T5Config(**{**dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                              num_heads=4, dropout_rate=0.0), **kw})


def test_t5_flops_matches_the_flop_counter():
    for kw in (dict(feed_forward_proj="relu"), dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)):
        c = tiny_config(**kw)
        m = T5(c).eval()
        x, y = torch.randint(2, 97, (3, 11)), torch.randint(2, 97, (3, 5))
        with torch.no_grad():
            measured = evaluate.count_flops(lambda: m(x, labels=y))
        assert measured == 3 * evaluate.t5_flops(c, 11, 5)


def test_tagi_flops_per_task_below_concatenation_and_equal_to_the_analytic_count():
    c = tiny_config(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    torch.manual_seed(0)
    cfg = TAGIConfig(rank=4, hidden=16, modules=("q", "v"))
    tagi = TAGI(T5(c), cfg).eval()
    N, s, S, T = 10, 20, 8, 4  # one task: instruction s tokens (read once), instances S, prompt s + S
    ones = lambda *shape: torch.ones(*shape, dtype=torch.long)  # noqa: E731
    b = {"instruction_ids": ones(N, s), "instruction_mask": ones(N, s), "input_ids": ones(N, S),
         "attention_mask": ones(N, S), "prompt_ids": ones(N, s + S), "prompt_mask": ones(N, s + S),
         "labels": ones(N, T)}
    concat = {p: (torch.zeros(1, 4, m.in_features), torch.zeros(1, m.out_features, 4))
              for p, m in tagi.t5.adaptable().items() if p in tagi.targets}
    cost = evaluate.task_cost(tagi, concat, b, timed=False)
    # analytic: TAGI = instruction encoder once + hypernetwork once + N x (instance encoder and decoder over
    # [I_x ; x], with the generated rank-2r adapters); concatenation = N x full prompt with a rank-r LoRA
    h, M, D, A = cfg.hidden, len(tagi.targets), c.d_model, c.num_heads * c.d_kv
    hyper = 2 * (D * h + M * (2 * h * h + h * h) + M * 2 * h * 4 * (D + A))  # proj, MLP, two head pairs (q, v: D->A)
    encoder_only = lambda L, lora=None: evaluate.t5_flops(c, L, 0, 0, lora)  # noqa: E731
    gen = {p: 2 * 4 for p in tagi.targets}
    tagi_flops = encoder_only(s) + hyper + N * (evaluate.t5_flops(c, S, T, s + S, gen))
    concat_flops = N * evaluate.t5_flops(c, s + S, T, lora={p: 4 for p in tagi.targets})
    assert cost["tagi_flops"] == tagi_flops and cost["concat_flops"] == concat_flops
    assert cost["flop_ratio"] < 1


def test_sni_shaped_cost_meets_the_goal():
    """v1.1-base shape, counted on the meta device: TAGI's FLOPs per task under 0.35x concatenation's."""
    assert evaluate.sni_shape_cost()["flop_ratio"] <= 0.35
