"""The methods that look inside the network: attention rollout equals a direct computation from
the model's own eager attention weights, the attention gradients equal finite differences, AttnLRP
conserves relevance (up to what biases absorb) and leaves the model and its neighbours untouched.
Real models: the built-in SmolLM2 and the fine-tuned MiniLM classifier; tiny random models only
for finite differences and isolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from raylens.attributions import AttentionRollout, AttnLRP, GradientAttentionRollout
from raylens.attributions.lrp import lrp_relevance, lrp_rules
from raylens.attributions.rollout import attention_gradients, gradient_rollout
from raylens.models.attention import attention_implementation, attention_weights, custom_attention
from tests.test_attributions_helpers import tiny_models

PARIS = "<|im_start|>The capital of France is"
REVIEW = "<|im_start|>This movie was absolutely wonderful, I loved every minute of it. The plot"


@pytest.fixture(scope="module")
def classifier():
    """The project's MiniLM fine-tuned on movie reviews (skipped where it is not built)."""
    from raylens.models.zoo.classifier import default_folder

    if not (default_folder() / ".complete").exists():
        pytest.skip("the minilm-movie-sentiment classifier is not built here")
    from raylens.models import load_model

    return load_model("minilm-movie-sentiment")


def _direct_rollout(attentions) -> np.ndarray:
    """Abnar & Zuidema's rollout written out in float64 numpy, one row of the batch."""
    out = None
    for a in attentions:
        a = a[0].double().numpy().mean(0)
        a = 0.5 * a + 0.5 * np.eye(a.shape[0])
        a = a / a.sum(1, keepdims=True)
        out = a if out is None else a @ out
    return out


@pytest.mark.parametrize("which", ["smollm", "classifier"])
def test_rollout_equals_direct_computation_from_eager_weights(which, request):
    lm = request.getfixturevalue(which)
    text, target = (PARIS, " Paris") if which == "smollm" else ("The acting was dreadful, but the music was fine.", None)
    before = attention_implementation(lm.model)
    out = AttentionRollout(lm, granularity="token", include_special_tokens=True)(text, targets=target)[0]
    assert attention_implementation(lm.model) == before  # sdpa (or whatever it was) is back
    ids = torch.tensor([out.input_ids])
    with torch.no_grad():
        _, atts = attention_weights(lm.model, input_ids=ids)  # the model's own eager weights
    assert len(atts) == lm.model.config.num_hidden_layers
    roll = _direct_rollout(atts)
    np.testing.assert_allclose(roll.sum(1), 1.0, atol=1e-9)  # rows sum to 1
    at = len(out.input_ids) - 1 if which == "smollm" else 0  # the predicting position / [CLS]
    assert [t for toks in out.element_tokens for t in toks] == list(range(len(out.input_ids)))
    np.testing.assert_allclose(out.scores[0], roll[at], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.params["first_position_share"], [roll[at, 0]], atol=1e-5)
    words = AttentionRollout(lm, granularity="word")(text, targets=target)[0]  # granularity: sums of tokens
    for el, toks in zip(words.scores[0], words.element_tokens):
        assert el == pytest.approx(roll[at, toks].sum(), rel=1e-4, abs=1e-6)
    # the attention sink, reported either way
    sink = AttentionRollout(lm, granularity="token", include_special_tokens=True, exclude_first=True)(
        text, targets=target)[0]
    assert sink.scores[0, 0] == 0 and sink.params["first_position_share"] == out.params["first_position_share"]
    if which == "smollm":  # the other positions share all of the predicting position's rollout
        np.testing.assert_allclose(sink.scores[0].sum(), 1.0, atol=1e-4)
    print(f"{which}: first position share {roll[at, 0]:.4f} of the rollout")


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).double().eval()


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg).double().eval()


def test_attention_gradients_equal_finite_differences():
    """d logit / d A[layer, head, i, j] from :func:`attention_gradients` against central
    differences that add +-h to that attention weight inside the forward (a float64 BERT: Llama's
    RMSNorm computes in float32, which would drown the differences)."""
    model = _tiny_bert()
    ids = torch.tensor([[3, 17, 5, 29, 11, 8]])

    def logit() -> torch.Tensor:
        x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        return model(inputs_embeds=x).logits[0, 1]

    atts, grads = attention_gradients(model, logit)
    assert attention_implementation(model) != "eager" and len(grads) == 2

    def shifted(layer, head, i, j, h):
        calls = []

        def fn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            scores = query @ key.transpose(2, 3) * scaling
            w = torch.softmax(scores if attention_mask is None else scores + attention_mask, -1)
            if len(calls) == layer:
                w = w.clone()
                w[0, head, i, j] += h
            calls.append(1)
            return (w @ value).transpose(1, 2).contiguous(), w

        with torch.no_grad(), custom_attention(model, fn):
            return float(model(input_ids=ids).logits[0, 1])

    h, fds = 1e-6, []
    for layer, head, i, j in [(0, 0, 5, 2), (1, 3, 0, 5), (1, 1, 0, 0), (0, 2, 3, 1), (1, 0, 0, 2)]:
        fd = (shifted(layer, head, i, j, h) - shifted(layer, head, i, j, -h)) / (2 * h)
        assert float(grads[layer][0, head, i, j]) == pytest.approx(fd, rel=1e-5, abs=1e-9)
        fds.append(abs(fd))
    assert sorted(fds)[-3] > 1e-5, fds  # not a comparison of zeros
    # and Chefer's rollout from them: R = (I + A_bar_2)(I + A_bar_1)
    a_bar = [(g * a).clamp_min(0).mean(1)[0] for a, g in zip(atts, grads)]
    eye = torch.eye(6, dtype=torch.float64)
    np.testing.assert_allclose(gradient_rollout(atts, grads)[0].numpy(),
                               ((eye + a_bar[1]) @ (eye + a_bar[0])).numpy(), rtol=1e-5, atol=1e-6)


def test_gradient_rollout_method_equals_library(smollm):
    """The registered method reads the predicting position's row of :func:`gradient_rollout`."""
    out = GradientAttentionRollout(smollm, granularity="token", include_special_tokens=True)(PARIS, targets=" Paris")[0]
    m, ids = smollm.model, torch.tensor([out.input_ids])
    atts, grads = attention_gradients(m, lambda: m(inputs_embeds=m.get_input_embeddings()(ids).detach()
                                                   .requires_grad_(True)).logits[0, -1, out.targets[0]])
    ref = gradient_rollout(atts, grads)[0, -1].numpy()
    np.testing.assert_allclose(out.scores[0], ref, rtol=2e-3, atol=1e-4 * np.abs(ref).max())


def test_attnlrp_conserves_relevance_smollm2(smollm):
    """Bias-free SmolLM2: with relevance through the values (CP rule) the token relevances sum to
    the explained logit (within 5%; measured exact to float rounding); the paper's softmax rule
    keeps part of it (printed)."""
    for text, target in [(PARIS, " Paris"), (REVIEW, " was")]:
        for rule in ("values", "softmax"):
            out = AttnLRP(smollm, granularity="token", include_special_tokens=True, attention_rule=rule)(
                text, targets=target)[0]
            total, logit = float(out.scores.sum()), float(out.target_scores[0])
            print(f"SmolLM2 {rule:8s} relevance sum {total:8.3f}  logit {logit:8.3f}  share {total / logit:.3f}")
            if rule == "values":
                assert total == pytest.approx(logit, rel=0.05)


def test_attnlrp_softmax_rule_accounting_smollm2(smollm):
    """Bias-free SmolLM2 with the paper's softmax rule: token relevances + the relevance each
    softmax's Taylor rule absorbs (its bias, recorded per call in the ledger) = the explained
    logit. Every other rule (epsilon on linear maps and RoPE, identity on SiLU and the RMSNorm
    with its variance held, uniform on q k^T, A v and the gated MLP) conserves, so a leak anywhere
    else breaks this equality; the absorbed share is printed."""
    m, tok = smollm.model, smollm.tokenizer
    for text, target in [(PARIS, " Paris"), (REVIEW, " was")]:
        ids = tok(text, return_tensors="pt").input_ids
        token = tok(target, add_special_tokens=False).input_ids[0]
        ledger: list[torch.Tensor] = []
        with torch.enable_grad(), lrp_rules(m, "softmax", ledger=ledger):
            x = m.get_input_embeddings()(ids).detach().requires_grad_(True)
            score = m(inputs_embeds=x).logits[0, -1, token]
            (grad,) = torch.autograd.grad(score, x)
        score = score.detach()
        inputs, absorbed = float((x * grad).double().sum()), float(sum(ledger))
        assert len(ledger) == 2 * m.config.num_hidden_layers  # into and out of every layer's softmax
        print(f"SmolLM2 softmax rule: inputs {inputs:.3f} + softmax bias {absorbed:.3f} = {inputs + absorbed:.3f}"
              f"  logit {float(score):.3f}")
        assert inputs + absorbed == pytest.approx(float(score), rel=1e-3)
        method = AttnLRP(smollm, granularity="token", include_special_tokens=True)(text, targets=target)[0]
        assert float(method.scores.sum()) == pytest.approx(inputs, rel=1e-3, abs=1e-3)


def test_attnlrp_relevance_accounting_classifier(classifier):
    """MiniLM classifier (biases everywhere): token relevances + the relevance every bias absorbs
    (``b * g`` at each Linear and LayerNorm output) = the explained logit (CP rule), and the
    method's token scores equal the library's :func:`lrp_relevance`."""
    m, tok = classifier.model, classifier.tokenizer
    for text in ["The movie was great.", "Terrible acting and a boring plot. I want my money back!"]:
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            logits = m(**enc).logits[0]
        c = int(logits.argmax())
        outputs, hooks = [], []
        for mod in m.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.LayerNorm)) and mod.bias is not None:
                hooks.append(mod.register_forward_hook(lambda mod, i, o: outputs.append((mod.bias, o))))
        try:
            with torch.enable_grad(), lrp_rules(m, "values") as capture:
                x = m.get_input_embeddings()(enc.input_ids).detach().requires_grad_(True)
                score = m(inputs_embeds=x, attention_mask=enc.attention_mask).logits[0, c]
                for t in [capture[0]] + [o for _, o in outputs]:
                    t.retain_grad()
                score.backward()
        finally:
            for h in hooks:
                h.remove()
        tokens = (capture[0] * capture[0].grad).sum(-1)[0].detach()
        absorbed = sum(float((b * o.grad).sum()) for b, o in outputs if o.grad is not None)
        assert float(tokens.sum()) + absorbed == pytest.approx(float(logits[c]), rel=1e-3, abs=1e-4)
        library = lrp_relevance(m, lambda o: o.logits[0, c], m.get_input_embeddings()(enc.input_ids), "values",
                                attention_mask=enc.attention_mask)[0]
        np.testing.assert_allclose(library.numpy(), tokens.numpy(), rtol=1e-4, atol=1e-5)
        out = AttnLRP(classifier, granularity="token", include_special_tokens=True, attention_rule="values")(text)[0]
        np.testing.assert_allclose(out.scores[0], tokens.numpy(), rtol=1e-3, atol=1e-4)
        print(f"classifier: inputs {float(tokens.sum()):.3f} + biases {absorbed:.3f} = logit {float(logits[c]):.3f}")


def test_attnlrp_leaves_the_model_and_its_neighbours_untouched():
    """During the call a second model is untouched; after it the explained model gives
    bit-identical outputs and no instance-level forward is left behind; forward values under the
    rules equal the model's own."""
    (bert, btok), (llama, ltok) = tiny_models()
    other = _tiny_llama().float()
    ids, oids = torch.tensor([[5, 60, 61, 62, 7]]), torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        b0, l0, o0 = bert(input_ids=ids).logits, llama(input_ids=ids).logits, other(input_ids=oids).logits
        for model, ref in ((bert, b0), (llama, l0)):
            for rule in ("softmax", "values"):
                with lrp_rules(model, rule):
                    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
                    assert torch.equal(other(input_ids=oids).logits, o0)
    for rule in ("softmax", "values"):
        AttnLRP(bert, btok, attention_rule=rule)("A fine day. Or not?")
        AttnLRP(llama, ltok, attention_rule=rule)("A fine day. Or not?", targets=" yes")
    with torch.no_grad():
        assert torch.equal(bert(input_ids=ids).logits, b0) and torch.equal(llama(input_ids=ids).logits, l0)
        assert torch.equal(other(input_ids=oids).logits, o0)
    assert not [mod for model in (bert, llama) for mod in model.modules() if "forward" in mod.__dict__]
    with pytest.raises(RuntimeError):  # restored after an error too
        with lrp_rules(llama):
            raise RuntimeError
    assert not [mod for mod in llama.modules() if "forward" in mod.__dict__]


def test_attnlrp_refuses_other_architectures():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match="llama, bert.*'gpt2'"):
        with lrp_rules(gpt2):
            pass
