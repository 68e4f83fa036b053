"""Attribution methods: properties that fail on a wrong implementation, on real models.

Classification uses a real MiniLM-L6 encoder with a small trained sentiment head
(:func:`tests.test_attributions_helpers.sentiment_classifier`); causal LM uses the real built-in
SmolLM2-135M-Instruct. Tiny random models only serve the shape/contract test.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

from raylens.attributions import (
    ATTRIBUTION_SCHEMA,
    AttributionOutput,
    METHODS,
    GradientShap,
    IntegratedGradients,
    KernelShap,
    Lime,
    Occlusion,
    Saliency,
    SmoothGrad,
    Sobol,
    SquareGrad,
    VarGrad,
    split_elements,
)
from raylens.attributions.aggregators import KernelShapAggregator, LimeAggregator, SobolAggregator
from raylens.attributions.perturbations import KernelShapPerturbator, LimePerturbator, SobolPerturbator
from tests.test_attributions_helpers import manual_scores, masked, sentiment_classifier, tiny_models, transform

PARIS = "<|im_start|>The capital of France is"  # the chat start token is special: never perturbed

#: small settings per method (fast); a property that needs more asks for more
SMALL = {
    "Occlusion": {}, "KernelShap": {"n_samples": 8}, "Lime": {"n_samples": 8}, "Sobol": {"n_samples": 2},
    "Saliency": {}, "IntegratedGradients": {"n_steps": 4}, "SmoothGrad": {"n_samples": 3},
    "SquareGrad": {"n_samples": 3}, "VarGrad": {"n_samples": 3}, "GradientShap": {"n_samples": 3},
    "AttentionRollout": {}, "GradientAttentionRollout": {}, "AttnLRP": {},
}
STOCHASTIC = ["KernelShap", "Lime", "Sobol", "SmoothGrad", "SquareGrad", "VarGrad", "GradientShap"]


@pytest.fixture(scope="module")
def clf():
    return sentiment_classifier()


# ----------------------------------------------------------------------------- elements


def test_elements_agree_with_split_model(smollm, clf):
    """Words and sentences mean the same in attributions as in the concept pipeline."""
    from raylens.models.split import SplitModel

    texts = ["Hello, world! It's a test.  Second sentence? Yes.", "don't stop-believing... ok", "  lead space"]
    for lm in (smollm, clf):
        split = SplitModel(lm, 0)
        for text, enc in zip(texts, split.encode(texts, max_tokens=64)):
            for gran in ("token", "word", "sentence"):
                ours = split_elements(text, enc.offsets, enc.special, gran)
                theirs = split.units(text, enc, gran)
                assert [(e.text, e.span, list(e.tokens)) for e in ours] == \
                       [(u.text, (u.char_start, u.char_end), u.tokens) for u in theirs], (gran, text)


def test_elements_rules():
    text = "Hi there. Bye!"
    offsets = [(0, 0), (0, 2), (2, 8), (8, 9), (9, 13), (13, 14), (0, 0)]  # [CLS] Hi ' there' . ' Bye' ! [SEP]
    special = [1, 0, 0, 0, 0, 0, 1]
    words = split_elements(text, offsets, special, "word")
    assert [(e.text, e.tokens) for e in words] == [("Hi", (1,)), ("there", (2,)), (".", (3,)), ("Bye", (4,)),
                                                   ("!", (5,))]
    sents = split_elements(text, offsets, special, "sentence")
    assert [(e.text, e.span, e.tokens) for e in sents] == [("Hi there.", (0, 9), (1, 2, 3)),
                                                          ("Bye!", (10, 14), (4, 5))]
    with_sp = split_elements(text, offsets, special, "sentence", special_tokens=["[CLS]", "", "", "", "", "", "[SEP]"])
    assert [(e.text, e.span, e.tokens) for e in with_sp][0] == ("[CLS]", (0, 0), (0,))
    assert [(e.text, e.span, e.tokens) for e in with_sp][-1] == ("[SEP]", (14, 14), (6,))
    with pytest.raises(ValueError, match="granularity"):
        split_elements(text, offsets, special, "paragraph")


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", list(METHODS))
def test_output_contract_every_method_both_tasks(name):
    """Shapes, spans, labels, params and the Arrow row, on tiny random models (both tasks, all
    granularities); several classes at once; several target tokens at once."""
    (bert, btok), (llama, ltok) = tiny_models()
    texts = ["A fine day. Or not?", "Short one"]
    for gran in ("token", "word", "sentence"):
        outs = METHODS[name](bert, btok, granularity=gran, **SMALL[name])(texts, targets=[[0, 2], 1])
        outs += METHODS[name](llama, ltok, granularity=gran, **SMALL[name])(texts, targets=[" yes it is", [5, 6]])
        for out in outs:
            assert out.method == name and out.granularity == gran
            assert out.scores.shape == (len(out.targets), len(out.elements)) and out.scores.dtype == np.float32
            assert np.isfinite(out.scores).all()
            for el, (s, e), toks in zip(out.elements, out.element_spans, out.element_tokens):
                assert out.text[s:e] == el and toks and all(0 <= p < len(out.input_ids) for p in toks)
            covered = sorted(p for toks in out.element_tokens for p in toks)
            assert len(covered) == len(set(covered))
            assert out.target_scores is not None and out.target_scores.shape == (len(out.targets),)
            json.dumps(out.params)
            table = pa.Table.from_pylist([out.to_arrow_row()], schema=ATTRIBUTION_SCHEMA)
            back = AttributionOutput.from_arrow_row(table.to_pylist()[0])  # lossless round trip
            assert np.array_equal(back.scores, out.scores) and back.input_ids == out.input_ids
            assert back.element_tokens == out.element_tokens and back.params == json.loads(json.dumps(out.params))
            assert [tuple(s) for s in back.element_spans] == [tuple(s) for s in out.element_spans]
        assert outs[0].targets == [0, 2] and outs[1].targets == [1]
        assert outs[0].target_labels == [bert.config.id2label[0], bert.config.id2label[2]]
        assert outs[0].task == "sequence_classification" and outs[2].task == "causal_lm"
        assert outs[3].targets == [5, 6] and outs[3].target_labels == [ltok.decode([5]), ltok.decode([6])]
        assert outs[2].input_ids == ltok("A fine day. Or not?")["input_ids"]


# ----------------------------------------------------------------------------- correctness properties


@pytest.mark.parametrize("gran", ["word", "sentence"])
def test_occlusion_equals_manual_masking_classifier(clf, gran):
    text = "The movie was great. The food was awful!"
    out = Occlusion(clf, granularity=gran, inference_mode="log_softmax", batch_size=5)(text, targets=[[0, 1]])[0]
    rid = clf.tokenizer.mask_token_id
    rows = [out.input_ids] + [masked(out.input_ids, toks, rid) for toks in out.element_tokens]
    f = manual_scores(clf.model, rows, None, [0, 1], "log_softmax")
    np.testing.assert_allclose(out.scores, (f[0][None] - f[1:]).T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.target_scores, f[0], rtol=1e-5, atol=1e-5)
    assert out.params["replace_token_id"] == rid


def test_occlusion_equals_manual_masking_causal_lm(smollm):
    """Two target tokens, scored with teacher forcing; the target prefix is never masked."""
    tok = smollm.tokenizer
    out = Occlusion(smollm, granularity="word", batch_size=4)(PARIS, targets=" Paris.")[0]
    assert len(out.targets) == 2 and tok.decode(out.targets) == " Paris."
    rid = tok.pad_token_id  # SmolLM2 has no mask token
    n_in = len(out.input_ids)
    rows = [out.input_ids + out.targets[:-1]]
    rows += [masked(out.input_ids, toks, rid) + out.targets[:-1] for toks in out.element_tokens]
    f = manual_scores(smollm.model, rows, n_in, out.targets, task="causal_lm")
    np.testing.assert_allclose(out.scores, (f[0][None] - f[1:]).T, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(out.target_scores, f[0], rtol=1e-5, atol=1e-3)


def _embedding_grads(model, ids, n_in, targets, task, mode="logits"):
    """Per target: gradient of the target score with respect to the input embeddings, by
    torch.autograd.grad on an unbatched forward, and the embeddings."""
    emb = model.get_input_embeddings()(torch.tensor([ids])).detach()
    grads = []
    for t, tg in enumerate(targets):
        e = emb.clone().requires_grad_(True)
        logits = model(inputs_embeds=e).logits[0]
        vec = logits if task == "sequence_classification" else logits[n_in - 1 + t]
        (g,) = torch.autograd.grad(transform(vec, mode)[tg], e)
        grads.append(g[0, :n_in])
    return torch.stack(grads), emb[0, :n_in]


def test_saliency_equals_autograd(clf, smollm):
    # classifier, two classes, word granularity: token g.x summed over the word's tokens
    text = "An unbelievably wonderful movie."
    out = Saliency(clf, granularity="word", batch_size=2)(text, targets=[[0, 1]])[0]
    g, x = _embedding_grads(clf.model, out.input_ids, len(out.input_ids), [0, 1], "sequence_classification")
    tok_scores = (g * x).sum(-1).numpy()
    expected = np.stack([tok_scores[:, toks].sum(1) for toks in out.element_tokens], 1)
    np.testing.assert_allclose(out.scores, expected, rtol=1e-3, atol=1e-5)
    assert any(len(t) > 1 for t in out.element_tokens)  # "unbelievably" is several word pieces
    norm = Saliency(clf, granularity="token", input_x_gradient=False)(text, targets=[[1]])[0]
    g_norm = g[1].norm(dim=-1).numpy()
    np.testing.assert_allclose(norm.scores[0], [g_norm[t[0]] for t in norm.element_tokens], rtol=1e-3, atol=1e-6)
    # causal LM, two target tokens, softmax: teacher forcing on input + target[:t]
    out = Saliency(smollm, granularity="token", inference_mode="softmax", batch_size=3)(PARIS, targets=" Paris.")[0]
    ids = out.input_ids + out.targets[:-1]
    g, x = _embedding_grads(smollm.model, ids, len(out.input_ids), out.targets, "causal_lm", "softmax")
    tok_scores = (g * x).sum(-1).numpy()
    expected = np.stack([tok_scores[:, toks].sum(1) for toks in out.element_tokens], 1)
    np.testing.assert_allclose(out.scores, expected, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize(("name", "ixg"), [("IntegratedGradients", True), ("GradientShap", True)] + [
    (n, b) for n in ("SmoothGrad", "SquareGrad", "VarGrad") for b in (True, False)])
def test_gradient_methods_equal_their_formulas(name, ixg, clf):
    """Each gradient method equals its formula evaluated by hand (one unbatched autograd.grad per
    row) over the rows its perturbator produces: IG (x - b) . sum_k w_k g_k; SmoothGrad mean_k g_k . x
    or ||mean_k g_k||; SquareGrad mean_k (g_k . x)^2 or mean_k ||g_k||^2; VarGrad var_k (g_k . x) or
    sum_d var_k g_kd; GradientSHAP mean_k g_k . (x - b_k)."""
    kw = {"n_steps": 5} if name == "IntegratedGradients" else {"n_samples": 4, "noise_std": 0.3}
    if name not in ("IntegratedGradients", "GradientShap"):
        kw["input_x_gradient"] = ixg
    expl = METHODS[name](clf, granularity="token", seed=3, **kw)
    text = "Such a lovely, quiet hotel."
    out = expl(text, targets=1)[0]
    item = expl._prepare(0, text, [1])
    ctx = expl._context(item, 3)
    n = expl.perturbator.n_rows
    emb, info = expl.perturbator.rows(ctx, list(range(n)))
    grads = []
    for k in range(n):
        e = emb[k:k + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(clf.model(inputs_embeds=e).logits[0, 1], e)
        grads.append(g[0].double())
    g = torch.stack(grads)  # (n, L, d)
    x = ctx.x.double()
    a = (g * x).sum(-1)
    if name == "IntegratedGradients":
        tok = ((x - ctx.reference.double()) * ctx.movable) * (info["weight"][:, None, None] * g).sum(0)
        tok = tok.sum(-1)
    elif name == "SmoothGrad":
        tok = a.mean(0) if ixg else g.mean(0).norm(dim=-1)
    elif name == "SquareGrad":
        tok = (a ** 2).mean(0) if ixg else (g ** 2).sum(-1).mean(0)
    elif name == "VarGrad":
        tok = a.var(0, unbiased=False) if ixg else g.var(0, unbiased=False).sum(-1)
    else:
        tok = (g * info["delta"].double()).sum(-1).mean(0)
    expected = [float(tok[t[0]]) for t in out.element_tokens]
    np.testing.assert_allclose(out.scores[0], expected, rtol=2e-3, atol=1e-4 * float(np.abs(expected).max()))
    if name != "IntegratedGradients":  # the rows really are random: noise of the stated scale
        moved = ctx.movable[:, 0].bool()
        if name == "GradientShap":
            noise = (ctx.x - info["delta"] - ctx.reference)[:, moved]  # b_k - reference
        else:
            noise = (emb - ctx.x)[:, moved]
        ratio = noise.norm(dim=-1) / ctx.x[moved].norm(dim=-1)
        assert 0.15 < float(ratio.mean()) < 0.45  # noise_std = 0.3
        assert float((emb - ctx.x)[:, ~moved].abs().max()) == 0.0  # [CLS] and [SEP] never move


def test_integrated_gradients_completeness_classifier(clf):
    """sum(scores) = f(x) - f(baseline) within 0.1% of |f(x) - f(baseline)| at 64 steps (the
    baseline moves only the element tokens; [CLS]/[SEP] stay). Measured error: below 0.001%."""
    text = "The concert was brilliant."
    for baseline in ("zero", "mask"):
        out = IntegratedGradients(clf, n_steps=64, baseline=baseline, batch_size=64)(text, targets=[[0, 1]])[0]
        ids = torch.tensor([out.input_ids])
        emb = clf.model.get_input_embeddings()
        with torch.no_grad():
            x = emb(ids)
            base = torch.zeros_like(x) if baseline == "zero" else emb(torch.full_like(ids, clf.tokenizer.mask_token_id))
            base[0, [0, -1]] = x[0, [0, -1]]
            fx, fb = (clf.model(inputs_embeds=e).logits[0].double().numpy() for e in (x, base))
        delta = fx - fb
        np.testing.assert_allclose(out.scores.sum(1), delta, rtol=1e-3, atol=1e-3 * np.abs(delta).max())
        np.testing.assert_allclose(out.target_scores, fx, rtol=1e-4, atol=1e-4)


def test_integrated_gradients_completeness_causal_lm(smollm):
    """sum(scores) = f(x) - f(baseline) within 1% at 64 steps (measured 0.05%), softmax scores.
    (SmolLM2's logits are very rough along embedding paths: in logit units the same check needs
    about 2000 steps; see the IG docstring.)"""
    out = IntegratedGradients(smollm, n_steps=64, inference_mode="softmax", batch_size=64)(PARIS, targets=" Paris")[0]
    ids = torch.tensor([out.input_ids])
    tgt = out.targets[0]
    with torch.no_grad():
        x = smollm.model.get_input_embeddings()(ids)
        base = torch.zeros_like(x)
        base[0, 0] = x[0, 0]  # <|im_start|> is special: not moved
        fx, fb = (smollm.model(inputs_embeds=e).logits[0, -1].double().softmax(-1)[tgt].item() for e in (x, base))
    assert fx - fb > 0.5
    assert out.scores.sum() == pytest.approx(fx - fb, rel=0.01)
    assert out.target_scores[0] == pytest.approx(fx, rel=1e-4)


def test_kernel_shap_efficiency_and_exact_shapley(clf):
    text = "The trip was awful and long, sadly."
    rid = clf.tokenizer.mask_token_id
    # sampled regime (2^M - 2 > n_samples): efficiency holds exactly
    out = KernelShap(clf, n_samples=40, seed=3)(text, targets=[[0, 1]])[0]
    m = len(out.elements)
    assert 2 ** m - 2 > 40
    all_masked = masked(out.input_ids, [p for t in out.element_tokens for p in t], rid)
    f = manual_scores(clf.model, [out.input_ids, all_masked], None, [0, 1])
    np.testing.assert_allclose(out.scores.sum(1), f[0] - f[1], rtol=1e-4, atol=1e-4)
    # enumerated regime: the exact Shapley values of the masking game, by brute force
    short = "Such a dull hotel."
    out = KernelShap(clf, n_samples=64)(short, targets=1)[0]
    m = len(out.elements)
    assert 2 ** m - 2 <= 64
    coalitions = list(itertools.product([0, 1], repeat=m))
    rows = [masked(out.input_ids, [p for e in range(m) if not z[e] for p in out.element_tokens[e]], rid)
            for z in coalitions]
    v = dict(zip(coalitions, manual_scores(clf.model, rows, None, [1])[:, 0]))
    phi = np.zeros(m)
    for z in coalitions:
        s = sum(z)
        for i in range(m):
            if not z[i]:
                zi = tuple(1 if j == i else z[j] for j in range(m))
                phi[i] += math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m) * (v[zi] - v[z])
    np.testing.assert_allclose(out.scores[0], phi, rtol=1e-4, atol=1e-4)


def test_mask_aggregators_recover_additive_games():
    """On an additive game f(z) = c0 + z . c: Kernel SHAP (sampled) and LIME (no ridge) return c;
    Sobol total indices return c_i^2 / sum(c^2)."""
    c = np.array([2.0, -1.0, 0.5, 0.0, 3.0, -2.5, 1.5, 0.25])
    rng = np.random.default_rng(0)
    keep, info = KernelShapPerturbator(60).masks(len(c), rng)
    f = (1.0 + keep @ c)[:, None]
    np.testing.assert_allclose(KernelShapAggregator().aggregate(keep, f, info)[0], c, atol=1e-9)
    keep, info = LimePerturbator(60).masks(len(c), rng)
    f = (1.0 + keep @ c)[:, None]
    np.testing.assert_allclose(LimeAggregator(alpha=0.0).aggregate(keep, f, info)[0], c, atol=1e-8)
    ridge = LimeAggregator(alpha=1.0).aggregate(keep, f, info)[0]
    assert np.linalg.norm(ridge) < np.linalg.norm(c) and np.corrcoef(ridge, c)[0, 1] > 0.95
    kept = keep.sum(1) / len(c)
    np.testing.assert_allclose(info["weights"], np.exp(-((1 - np.sqrt(kept)) ** 2) / 0.25 ** 2))
    assert keep[0].all() and (~keep[1:]).any(1).all()  # row 0 is the input, every other row masks something
    _, info_h = LimePerturbator(60, distance="hamming", kernel_width=0.5).masks(len(c), np.random.default_rng(0))
    keep_h, _ = LimePerturbator(60).masks(len(c), np.random.default_rng(0))
    np.testing.assert_allclose(info_h["weights"], np.exp(-((1 - keep_h.sum(1) / len(c)) ** 2) / 0.5 ** 2))
    keep, info = SobolPerturbator(256).masks(len(c), rng)
    f = (1.0 + keep @ c)[:, None]
    st = SobolAggregator().aggregate(keep, f, info)[0]
    np.testing.assert_allclose(st, c ** 2 / (c ** 2).sum(), atol=0.03)
    assert keep.shape == (256 * (len(c) + 2), len(c))


def _assert_same(a, b, rtol=2e-4):
    for oa, ob in zip(a, b):
        assert oa.elements == ob.elements and oa.targets == ob.targets
        scale = max(1e-6, float(np.abs(oa.scores).max()))
        np.testing.assert_allclose(oa.scores, ob.scores, rtol=rtol, atol=rtol * scale)
        np.testing.assert_allclose(oa.target_scores, ob.target_scores, rtol=rtol, atol=1e-4)


@pytest.mark.parametrize("name", list(METHODS))
def test_batch_size_one_equals_batch_size_n_classifier(name, clf):
    """Padding and packing never change a score: batch size 1 (each input alone) equals a batch
    size that mixes inputs of different lengths and several classes, with the same seed."""
    cls, kw = METHODS[name], SMALL[name]
    texts = ["The food was terrible.", "What a wonderful and surprising little book!"]
    one = [cls(clf, batch_size=1, seed=7, **kw)(t, targets=[[0, 1]])[0] for t in texts]
    many = cls(clf, batch_size=7, seed=7, **kw)(texts, targets=[[0, 1], [0, 1]])
    _assert_same(one, many)


@pytest.mark.parametrize("name", list(METHODS))
def test_batch_size_one_equals_batch_size_n_causal_lm(name, smollm):
    """The same on SmolLM2 with inputs of different lengths and different numbers of target tokens
    (right padding, position ids, target prefixes, target-vectorised backward)."""
    cls, kw = METHODS[name], SMALL[name]
    texts = [PARIS, "<|im_start|>Two plus two equals"]
    targets = [" Paris.", " four"]
    one = [cls(smollm, batch_size=1, seed=7, **kw)(t, targets=g)[0] for t, g in zip(texts, targets)]
    many = cls(smollm, batch_size=5, seed=7, **kw)(texts, targets=targets)
    _assert_same(one, many, rtol=1e-3)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seed_reproducible(name, clf):
    cls, kw = METHODS[name], SMALL[name]
    text = "Honestly, the service is dreadful."
    a = cls(clf, seed=11, **kw)(text)[0].scores
    b = cls(clf, seed=11, **kw)(text)[0].scores
    c = cls(clf, seed=12, **kw)(text)[0].scores
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    drawn = cls(clf, seed=None, **kw)(text)[0]  # a fresh seed, recorded: rerunning with it reproduces
    again = cls(clf, seed=drawn.params["seed"], **kw)(text)[0]
    assert isinstance(drawn.params["seed"], int)
    np.testing.assert_array_equal(drawn.scores, again.scores)


# ----------------------------------------------------------------------------- batching mechanics


def test_one_forward_per_batch_and_one_backward_per_batch(smollm, monkeypatch):
    """All target tokens of a row are scored in one forward (Occlusion: n_elements + 1 rows whatever
    the number of target tokens); gradient methods run one (target-vectorised) backward per batch,
    never one per row; batch_size counts forward rows; target_chunk splits the vectorised
    backward over the targets without changing a score."""
    calls = []
    handle = smollm.model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(out.logits.shape[0]), with_kwargs=True)
    try:
        out = Occlusion(smollm, batch_size=64)(PARIS, targets=" Paris. It is")[0]
        assert len(out.targets) >= 3
        assert calls == [len(out.elements) + 1]
        calls.clear()
        grads = []
        real_grad = torch.autograd.grad
        monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(k.get("is_grads_batched")) or
                            real_grad(*a, **k))
        out = IntegratedGradients(smollm, n_steps=6, batch_size=4)(PARIS, targets=" Paris.")[0]
        assert len(out.targets) == 2
        # 6 rows in batches of 4 and 2, one vectorised backward each (both targets at once),
        # then one forward of the unperturbed input for target_scores
        assert calls == [4, 2, 1] and grads == [True, True]
        calls.clear()
        grads.clear()
        chunked = IntegratedGradients(smollm, n_steps=6, batch_size=4, target_chunk=1)(PARIS, targets=" Paris.")[0]
        assert calls == [4, 2, 1] and grads == [True, True, True, True]  # one pass per target and batch
        np.testing.assert_allclose(chunked.scores, out.scores, rtol=1e-5, atol=1e-6)
    finally:
        handle.remove()


def test_backward_fallback_one_pass_per_target_gives_the_same_scores(clf, monkeypatch):
    """Where a model has no vectorised backward, one backward per target over the same graph."""
    text = "A dreadful, boring trip."
    ref = Saliency(clf)(text, targets=[[0, 1]])[0]
    real_grad = torch.autograd.grad

    def no_vmap(*a, **k):
        if k.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return real_grad(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    out = Saliency(clf)(text, targets=[[0, 1]])[0]
    np.testing.assert_allclose(out.scores, ref.scores, rtol=1e-5, atol=1e-7)


def test_max_batch_tokens_caps_batches(clf):
    calls = []
    handle = clf.model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    try:
        a = Occlusion(clf, batch_size=100, max_batch_tokens=30)("A truly great day at the lake.")[0]
    finally:
        handle.remove()
    assert all(n * w <= 30 for n, w in calls) and sum(n for n, _ in calls) == len(a.elements) + 2  # + prediction
    b = Occlusion(clf, batch_size=100)("A truly great day at the lake.")[0]
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- targets and errors


def test_classification_targets(clf):
    texts = ["The movie was great.", "The food was terrible."]
    pred = Occlusion(clf)(texts)
    assert [o.targets for o in pred] == [[1], [0]]
    assert [o.target_labels for o in pred] == [["positive"], ["negative"]]
    both = Occlusion(clf)(texts[0], targets=[0, 1])[0]
    assert both.targets == [0, 1] and both.scores.shape[0] == 2
    np.testing.assert_allclose(both.scores[1], pred[0].scores[0], rtol=1e-4, atol=1e-5)
    same = Occlusion(clf)(texts, targets=torch.tensor([[1], [0]]))
    np.testing.assert_allclose(same[1].scores, pred[1].scores, rtol=1e-4, atol=1e-5)
    assert [o.targets for o in Occlusion(clf)(texts, targets=0)] == [[0], [0]]
    assert [o.targets for o in Occlusion(clf)(texts, targets=[None, [0, 1]])] == [[1], [0, 1]]
    with pytest.raises(ValueError, match="out of range"):
        Occlusion(clf)(texts[0], targets=2)
    with pytest.raises(ValueError, match="2 targets for 3 inputs"):
        Occlusion(clf)(texts + ["x"], targets=[0, 1])
    with pytest.raises(ValueError, match="not an int"):
        Occlusion(clf)(texts[0], targets=["positive"])


def test_causal_lm_targets(smollm):
    tok = smollm.tokenizer
    expl = Occlusion(smollm, max_new_tokens=3)
    text_t = expl(PARIS, targets=" Paris")[0]
    ids_t = expl(PARIS, targets=tok(" Paris", add_special_tokens=False)["input_ids"])[0]
    assert text_t.targets == ids_t.targets and text_t.target_labels == [" Paris"]
    np.testing.assert_allclose(text_t.scores, ids_t.scores, rtol=1e-5)
    gen = expl(PARIS)[0]  # greedy generation of 3 tokens
    with torch.no_grad():
        ref = smollm.model.generate(torch.tensor([gen.input_ids]), max_new_tokens=3, do_sample=False,
                                    pad_token_id=tok.pad_token_id)[0, len(gen.input_ids):].tolist()
    assert gen.targets == ref and len(gen.targets) == 3
    assert gen.targets[0] == text_t.targets[0]  # SmolLM2 does continue with " Paris"
    with pytest.raises(ValueError, match="out of range"):
        expl(PARIS, targets=[10 ** 7])
    with pytest.raises(ValueError, match="1 targets for 2 inputs"):
        expl([PARIS, PARIS], targets=[" a"])
    with pytest.raises(ValueError, match="one target text for 2 inputs"):
        expl([PARIS, PARIS], targets=" a")
    with pytest.raises(ValueError, match="exceed max_length"):
        Occlusion(smollm, max_length=8)(PARIS, targets=" Paris is nice and sunny")


def test_errors_and_long_inputs(clf, smollm):
    with pytest.raises(ValueError, match="input 1 is empty"):
        Saliency(clf)(["fine", "   "])
    with pytest.raises(ValueError, match="no word"):
        Saliency(clf)("[CLS]")
    with pytest.raises(TypeError):
        Saliency(clf)([3])
    with pytest.raises(ValueError, match="granularity"):
        Saliency(clf, granularity="char")
    with pytest.raises(ValueError, match="inference_mode"):
        Saliency(clf, inference_mode="probs")
    with pytest.raises(ValueError, match="baseline"):
        IntegratedGradients(clf, baseline="noise")
    with pytest.raises(ValueError, match="pass the tokenizer"):
        Saliency(clf.model)
    with pytest.warns(UserWarning, match="truncated to max_length=6"):
        out = Occlusion(clf, max_length=6)("one two three four five six seven")[0]
    assert out.elements == ["one", "two", "three", "four"] and len(out.input_ids) == 6
    assert Saliency(clf)([]) == []
    errs = Occlusion(clf).validate(["fine text", "", "[CLS]", 3], targets=[None, 1, 1, 0])
    assert errs[0] is None and "empty" in errs[1] and "no word" in errs[2] and "not a str" in errs[3]
    assert Occlusion(clf).validate("fine", targets=[5]) == ["input 0: class 5 out of range: the model has 2 classes"]
    assert Occlusion(smollm, max_length=8).validate([PARIS, "a"], targets=[" Paris is nice and sunny", " b"])[1] is None


def test_task_dispatch_without_architectures_and_loaded_model_equivalence(smollm):
    """A model built from a config (no ``architectures``) is dispatched through the auto mapping; a
    bare model + tokenizer gives the same result as the LoadedModel."""
    (bert, btok), (llama, ltok) = tiny_models()
    assert bert.config.architectures is None
    assert Occlusion(bert, btok).task == "sequence_classification"
    assert Occlusion(llama, ltok).task == "causal_lm"
    from transformers import BertModel

    with pytest.raises(ValueError, match="cannot explain"):
        Occlusion(BertModel(bert.config), btok)
    a = Saliency(smollm)(PARIS, targets=" Paris")[0]
    b = Saliency(smollm.model, smollm.tokenizer)(PARIS, targets=" Paris")[0]
    np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("mode", ["softmax", "log_softmax"])
def test_inference_modes_target_scores(clf, mode):
    text = "A superb book."
    out = Occlusion(clf, inference_mode=mode)(text, targets=[[0, 1]])[0]
    f = manual_scores(clf.model, [out.input_ids], None, [0, 1], mode)[0]
    np.testing.assert_allclose(out.target_scores, f, rtol=1e-5, atol=1e-6)
    assert out.params["inference_mode"] == mode


def test_special_tokens_as_elements(clf):
    out = Occlusion(clf, granularity="word", include_special_tokens=True)("Great fun.", targets=1)[0]
    assert out.elements[0] == "[CLS]" and out.elements[-1] == "[SEP]"
    assert out.element_spans[0] == (0, 0) and out.element_spans[-1] == (10, 10)
    assert out.element_tokens[0] == [0] and out.element_tokens[-1] == [len(out.input_ids) - 1]


def test_granularity_rule_gradient_sum_and_perturbation_units(clf):
    """Gradient methods: a word's score is the sum of its tokens' scores. Perturbation methods mask
    whole units: a sentence's occlusion score is not the sum of its words'."""
    text = "An unbelievably wonderful movie. Not bad."
    tok = Saliency(clf, granularity="token")(text, targets=1)[0]
    by_pos = {t[0]: s for t, s in zip(tok.element_tokens, tok.scores[0])}
    for gran in ("word", "sentence"):
        out = Saliency(clf, granularity=gran)(text, targets=1)[0]
        np.testing.assert_allclose(out.scores[0], [sum(by_pos[p] for p in t) for t in out.element_tokens],
                                   rtol=1e-4, atol=1e-6)
    sent = Occlusion(clf, granularity="sentence")(text, targets=1)[0]
    assert len(sent.elements) == 2
    rid = clf.tokenizer.mask_token_id
    f = manual_scores(clf.model, [sent.input_ids] + [masked(sent.input_ids, t, rid) for t in sent.element_tokens],
                      None, [1])
    np.testing.assert_allclose(sent.scores[0], f[0, 0] - f[1:, 0], rtol=1e-4, atol=1e-4)


def test_new_method_is_a_perturbator_plus_an_aggregator(clf):
    """The package docstring's example: a custom perturbation method in a dozen lines."""
    from raylens.attributions import PerturbationExplainer
    from raylens.attributions.aggregators import MaskAggregator
    from raylens.attributions.perturbations import MaskPerturbator

    class PairMasks(MaskPerturbator):
        first_row_is_clean = True

        def masks(self, n_elements, rng):
            keep = np.ones((n_elements + 1, n_elements), dtype=bool)
            for e in range(n_elements):
                keep[1 + e, e: e + 2] = False
            return keep, {}

    class Drop(MaskAggregator):
        def aggregate(self, keep, scores, info):
            return (scores[0][None] - scores[1:]).T

    class PairOcclusion(PerturbationExplainer):
        def __init__(self, model, tokenizer=None, **kwargs):
            super().__init__(model, tokenizer, perturbator=PairMasks(), aggregator=Drop(), **kwargs)

    out = PairOcclusion(clf)("The movie was great.", targets=1)[0]
    rid = clf.tokenizer.mask_token_id
    toks = out.element_tokens
    rows = [out.input_ids] + [masked(out.input_ids, [p for t in toks[e: e + 2] for p in t], rid) for e in range(len(toks))]
    f = manual_scores(clf.model, rows, None, [1])[:, 0]
    np.testing.assert_allclose(out.scores[0], f[0] - f[1:], rtol=1e-4, atol=1e-4)
    assert out.method == "PairOcclusion"


def test_params_recorded():
    (bert, btok), _ = tiny_models()
    p = IntegratedGradients(bert, btok, n_steps=7, baseline="mask")("Some text", targets=0)[0].params
    assert p["n_steps"] == 7 and p["baseline"] == "mask" and p["integration"] == "gauss_legendre"
    p = SmoothGrad(bert, btok, n_samples=2, noise_std=0.3, seed=5)("Some text", targets=0)[0].params
    assert p == {"n_samples": 2, "noise_std": 0.3, "input_x_gradient": True, "inference_mode": "logits",
                 "replace_token_id": btok.mask_token_id, "include_special_tokens": False, "seed": 5}
    assert "seed" not in Occlusion(bert, btok)("Some text", targets=0)[0].params
    for cls in (Lime, Sobol, KernelShap, GradientShap, SquareGrad, VarGrad):
        assert cls(bert, btok, **SMALL[cls.__name__])("Some text", targets=0)[0].params["seed"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Saliency(bert, btok, progress=False)(["a b", "c d"], targets=0)
