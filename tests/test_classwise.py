"""Class-wise concepts (CRAFT-style) on the real MiniLM sentiment classifier over real
movie reviews (slow), plus fit validation (fast)."""

from __future__ import annotations

import time

import pytest
import torch

from raylens.concepts.classwise import ClasswiseConcepts, classwise_activations
from raylens.concepts.importance import concept_gradients, concept_output_gradients


# ---------------------------------------------------------------------------- fast
def test_fit_validates_and_skips_small_classes():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 16, generator=g)
    y = torch.tensor([0] * 30 + [1] * 28 + [2] * 2)
    cc = ClasswiseConcepts("semi_nmf", nb_concepts=3, max_iter=50)
    with pytest.raises(RuntimeError, match="not fitted"):
        cc.importance(None, ["a"])
    cc.fit(x, y)
    assert cc.classes == [0, 1] and cc.n_rows == {0: 30, 1: 28}  # class 2 has fewer rows than concepts
    assert all(m.is_fitted and m.nb_concepts == 3 for m in cc.models.values())
    assert cc.models[0].encode(x[:5]).shape == (5, 3)
    with pytest.raises(ValueError, match="predicted_classes"):
        cc.fit(x, y[:-1])
    with pytest.raises(ValueError, match="activations"):
        cc.fit(x[0], y)
    with pytest.raises(ValueError, match="integer"):
        cc.fit(x, y.float())
    with pytest.raises(ValueError, match="rows"):
        ClasswiseConcepts("semi_nmf", nb_concepts=50).fit(x, y)
    with pytest.raises(ValueError, match="nb_concepts"):
        ClasswiseConcepts(nb_concepts=0)


# ---------------------------------------------------------------------------- slow: real classifier
N_TEXTS = 200


@pytest.fixture(scope="module")
def sentiment():
    from raylens.models import load_model
    from raylens.models.builtins import builtin_model_path
    from raylens.models.zoo.classifier import heldout_reviews
    from raylens.models.split import SplitModel

    loaded = load_model("minilm-movie-sentiment", device="cpu")
    texts, labels, _ = heldout_reviews(N_TEXTS, seed=7, folder=builtin_model_path("minilm-movie-sentiment"))
    # the last encoder layer: its CLS row is what the pooler and the classification head read
    return SplitModel(loaded, -1), texts, labels


@pytest.fixture(scope="module")
def fitted(sentiment):
    split, texts, labels = sentiment
    t0 = time.monotonic()
    acts, pred, logits = classwise_activations(split, texts, max_tokens=128)
    t_act = time.monotonic() - t0
    t0 = time.monotonic()
    cc = ClasswiseConcepts("semi_nmf", nb_concepts=4, seed=0).fit(acts, pred)
    t_fit = time.monotonic() - t0
    return cc, acts, pred, logits, (t_act, t_fit)


@pytest.mark.slow
def test_cls_activations_equal_the_cls_extraction(sentiment, fitted):
    split, texts, _ = sentiment
    _, acts, pred, logits, _ = fitted
    table, issues = split.extract(texts[:6], list(range(6)), granularity="cls", dtype="float32", max_tokens=128)
    from raylens.io.schemas import tensor_column_to_numpy

    ref = torch.from_numpy(tensor_column_to_numpy(table.column("activation")))
    assert ref.shape == (6, split.d_model)
    torch.testing.assert_close(acts[:6], ref, atol=1e-4, rtol=1e-4)
    assert acts.shape == (N_TEXTS, split.d_model) and logits.shape == (N_TEXTS, 2)
    assert torch.equal(pred, logits.argmax(-1))


@pytest.mark.slow
def test_output_gradients_match_finite_differences_and_concept_gradients(sentiment, fitted):
    split, texts, _ = sentiment
    cc, *_ = fitted
    cm = cc.models[cc.classes[0]]
    docs = texts[:4]
    res = concept_output_gradients(split, cm, docs, positions="cls")
    assert res.gradient.shape == res.concept_x_gradient.shape == (4, cm.nb_concepts, 2)
    assert res.logits.shape == (4, 2) and res.outputs.tolist() == [0, 1]

    # finite differences: raise concept k by eps at the CLS position (decode is linear in z)
    eps, k = 1e-2, 1
    direction = cm.dictionary[k]  # (d_model,)

    def logits_with(delta: float) -> torch.Tensor:
        def shift(h):
            h = h.clone()
            h[:, 0] = h[:, 0] + delta * direction.to(h.dtype)
            return h

        enc = split.encode(docs, 128)
        ids, mask = split.pad(enc)
        with torch.no_grad(), split.replace_output(shift):
            return split.model(input_ids=ids, attention_mask=mask).logits.float()

    fd = (logits_with(eps) - logits_with(-eps)) / (2 * eps)  # (4, 2)
    torch.testing.assert_close(res.gradient[:, k, :], fd, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(res.logits, logits_with(0.0), atol=1e-4, rtol=1e-4)  # forward unchanged

    # positions="all" for the predicted class reproduces concept_gradients
    g_all = concept_output_gradients(split, cm, docs, positions="all")
    g, cxg, target = concept_gradients(split, cm, docs)
    assert torch.equal(target, g_all.predicted)
    idx = target[:, None, None].expand(-1, cm.nb_concepts, 1)
    torch.testing.assert_close(g_all.gradient.gather(2, idx)[..., 0], g, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_all.concept_x_gradient.gather(2, idx)[..., 0], cxg, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_class_concepts_matter_more_for_their_own_class(sentiment, fitted):
    split, texts, labels = sentiment
    cc, acts, pred, logits, (t_act, t_fit) = fitted
    assert cc.classes == [0, 1], cc.n_rows
    t0 = time.monotonic()
    imp, counts = cc.importance(split, texts, predicted_classes=pred, return_counts=True)
    t_imp = time.monotonic() - t0
    assert imp.shape == (2, 4, 2) and torch.isfinite(imp).all()
    assert counts == {c: int((pred == c).sum()) for c in (0, 1)}
    # computing the predictions itself gives the same numbers
    torch.testing.assert_close(cc.importance(split, texts[:40]),
                               cc.importance(split, texts[:40], predicted_classes=pred[:40]))
    own = torch.stack([imp[i, :, c] for i, c in enumerate(cc.classes)])  # (2, nb_concepts)
    other = torch.stack([imp[i, :, 1 - c] for i, c in enumerate(cc.classes)])
    acc = float((pred.numpy() == labels).mean())
    print(f"\nMiniLM sentiment, {N_TEXTS} held-out reviews (accuracy {acc:.3f}), predicted {counts}; "
          f"activations {t_act:.1f} s, fit {t_fit:.1f} s, importance {t_imp:.1f} s")
    for i, c in enumerate(cc.classes):
        print(f"  class {c} concepts: importance for own class {[round(v, 3) for v in own[i].tolist()]} "
              f"(mean {own[i].mean():.3f}), for other class {[round(v, 3) for v in other[i].tolist()]} "
              f"(mean {other[i].mean():.3f})")
    print(f"  mean over classes and concepts: own {own.mean():.3f}, other {other.mean():.3f}")
    assert own.mean() > other.mean()
    assert (own.mean(1) > other.mean(1)).all()  # also for each class (measured: 0.18 vs -0.23, 0.24 vs -0.18)
