"""Faithfulness metrics on real models: an oracle attribution (the exact leave-one-out effect,
computed here with plain masked forwards) beats random rankings and its reverse loses to them;
curve end points equal manual forwards; batch size 1 equals batch size N; the documented
directions agree with what the oracle shows.

Real SmolLM2 (causal LM, built-in) always; the built-in MiniLM movie-sentiment classifier when
it has been built on this machine (``python scripts/build_classifier.py``), else that part skips.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylens.attributions.metrics import (
    AOPCComprehensiveness,
    AOPCSufficiency,
    Deletion,
    Insertion,
    default_replace_token_id,
    faithfulness,
)
from raylens.attributions.output import AttributionOutput

# Short prompts with a predictable continuation: the leave-one-out effect is large and varied.
LM_PROMPTS = [
    ("The capital of France is", " Paris"),
    ("One, two, three, four,", " five"),
    ("Monday, Tuesday, Wednesday,", " Thursday"),
]
SENTIMENT = [
    ("A wonderful, moving film.", 1),
    ("Dreadful, boring and far too long.", 0),
    ("The plot was dull but the acting was brilliant and the music superb.", 1),
    ("I hated every minute of this awful mess.", 0),
]


def _manual_scores(lm, rows: list[list[int]], n_input: int, targets: list[int], mode: str | None = None) -> np.ndarray:
    """Target scores of equal-length rows: one plain forward of them all (no padding, so no
    attention mask), scores read directly from the logits.

    Default score: log-softmax for the causal LM, softmax for the classifier (the metrics' defaults).
    """
    mode = mode or ("log_softmax" if lm.task == "causal_lm" else "softmax")
    assert len({len(r) for r in rows}) == 1
    with torch.inference_mode():
        if lm.task == "causal_lm":
            logits = lm.model(torch.tensor([list(ids) + list(targets) for ids in rows])).logits.float()
            scores = logits.log_softmax(-1) if mode == "log_softmax" else logits.softmax(-1) if mode == "softmax" else logits
            return np.asarray([[scores[r, n_input - 1 + t, tok].item() for t, tok in enumerate(targets)]
                               for r in range(len(rows))])
        logits = lm.model(torch.tensor([list(ids) for ids in rows])).logits.float()
        scores = logits.log_softmax(-1) if mode == "log_softmax" else logits.softmax(-1) if mode == "softmax" else logits
        return scores[:, list(targets)].double().numpy()


def _masked(ids: list[int], positions: list[int], rid: int) -> list[int]:
    ids = list(ids)
    for p in positions:
        ids[p] = rid
    return ids


def _oracle_output(lm, text: str, targets: list[int], target_labels: list[str], task: str) -> AttributionOutput:
    """Token-level output whose scores are the exact leave-one-out effect on each target."""
    tok = lm.tokenizer
    enc = tok(text, return_offsets_mapping=True)
    ids = enc["input_ids"]
    special = set(tok.all_special_ids)
    positions = [p for p, t in enumerate(ids) if t not in special]
    rid = default_replace_token_id(tok)
    full = _manual_scores(lm, [ids], len(ids), targets)[0]
    loo = _manual_scores(lm, [_masked(ids, [p], rid) for p in positions], len(ids), targets)
    return AttributionOutput(
        text=text, task=task, granularity="token",
        elements=[tok.decode([ids[p]]) for p in positions],
        element_spans=[tuple(enc["offset_mapping"][p]) for p in positions],
        element_tokens=[[p] for p in positions], input_ids=ids,
        scores=(full[None, :] - loo).T, targets=targets, target_labels=target_labels,
        method="LeaveOneOut", target_scores=full,
    )


def _reversed(out: AttributionOutput) -> AttributionOutput:
    return AttributionOutput(**{**out.__dict__, "scores": -out.scores, "method": "ReversedLeaveOneOut"})


@pytest.fixture(scope="module")
def lm_oracles(smollm):
    outs = []
    for prompt, cont in LM_PROMPTS:
        tg = smollm.tokenizer(cont, add_special_tokens=False)["input_ids"]
        outs.append(_oracle_output(smollm, prompt, tg, [smollm.tokenizer.decode([t]) for t in tg], "causal_lm"))
    return outs


@pytest.fixture(scope="module")
def lm_faith(smollm, lm_oracles):
    """Oracle and reversed oracle in one call (their shared random rows run once)."""
    both = lm_oracles + [_reversed(o) for o in lm_oracles]
    res = faithfulness(smollm, both, n_steps=4, n_random=2, batch_size=32, return_per_output=True)
    n = len(lm_oracles)
    per = res["per_output"]
    return {name: (per[name][:n], per[name][n:]) for name in per}


def _mean(results, key):
    return float(np.mean([r[key] for r in results]))


def _check_oracle_beats_random(split):
    del_or, del_rev = split["deletion"]
    ins_or, ins_rev = split["insertion"]
    # (a) the oracle beats random on both AUCs, its reverse loses to random
    assert _mean(del_or, "auc") < _mean(del_or, "random_auc")
    assert _mean(ins_or, "auc") > _mean(ins_or, "random_auc")
    assert _mean(del_rev, "auc") > _mean(del_rev, "random_auc")
    assert _mean(ins_rev, "auc") < _mean(ins_rev, "random_auc")
    # (d) every metric's documented direction agrees: oracle better than random, reverse worse
    for cls in (Deletion, Insertion, AOPCComprehensiveness, AOPCSufficiency):
        key = "auc" if cls in (Deletion, Insertion) else "aopc"
        oracle, rev = split[cls.name]
        sign = 1.0 if cls.higher_is_better else -1.0
        assert sign * (_mean(oracle, key) - _mean(oracle, "random_" + key)) > 0, cls.name
        assert sign * (_mean(rev, key) - _mean(rev, "random_" + key)) < 0, cls.name
        doc = "Higher is better" if cls.higher_is_better else "Lower is better"
        assert doc in cls.__doc__, cls.name


def test_oracle_beats_random_and_reverse_loses_causal_lm(lm_faith):
    _check_oracle_beats_random(lm_faith)


def test_random_baseline_is_the_same_for_oracle_and_reverse(lm_faith):
    # same inputs, same seed: the random rankings (hence their scores) do not depend on the method
    for name in ("deletion", "insertion"):
        oracle, rev = lm_faith[name]
        for a, b in zip(oracle, rev):
            np.testing.assert_array_equal(a["random_auc"], b["random_auc"])


def test_curve_end_points_equal_manual_forwards_causal_lm(smollm, lm_oracles, lm_faith):
    rid = default_replace_token_id(smollm.tokenizer)
    for out, d, ins in zip(lm_oracles, lm_faith["deletion"][0], lm_faith["insertion"][0]):
        all_pos = [p for toks in out.element_tokens for p in toks]
        unmasked = _manual_scores(smollm, [out.input_ids], len(out.input_ids), out.targets)[0]
        masked = _manual_scores(smollm, [_masked(out.input_ids, all_pos, rid)], len(out.input_ids), out.targets)[0]
        np.testing.assert_allclose(d["curve"][:, 0], unmasked, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(d["curve"][:, -1], masked, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ins["curve"][:, 0], masked, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ins["curve"][:, -1], unmasked, rtol=1e-4, atol=1e-6)
        assert d["curve"].shape == (out.n_targets, 5) and d["fractions"][0] == 0 and d["fractions"][-1] == 1
        assert d["auc"].shape == d["random_auc"].shape == (out.n_targets,)


def test_aopc_drops_equal_manual_forwards(smollm, lm_oracles, lm_faith):
    out = lm_oracles[1]
    comp, suff = lm_faith["comprehensiveness"][0][1], lm_faith["sufficiency"][0][1]
    rid = default_replace_token_id(smollm.tokenizer)
    order = np.argsort(-out.scores[0], kind="stable")
    n = len(out.input_ids)
    rows = [out.input_ids]
    for count in comp["counts"]:
        rows.append(_masked(out.input_ids, [out.element_tokens[e][0] for e in order[:count]], rid))  # top removed
        rows.append(_masked(out.input_ids, [out.element_tokens[e][0] for e in order[count:]], rid))  # only top kept
    manual = _manual_scores(smollm, rows, n, out.targets)[:, 0]
    full, removed, kept = manual[0], manual[1::2], manual[2::2]
    np.testing.assert_allclose(comp["drops"][0], full - removed, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(suff["drops"][0], full - kept, rtol=1e-4, atol=1e-5)
    assert comp["aopc"][0] == pytest.approx(comp["drops"][0].mean())
    # ceil(f * n_elements) over ERASER's 1, 5, 10, 20, 50 %
    assert list(comp["counts"]) == [int(np.ceil(f * out.n_elements)) for f in (0.01, 0.05, 0.1, 0.2, 0.5)]


def test_batch_size_one_equals_batch_size_n(smollm, lm_oracles):
    outs = lm_oracles[:2]  # different lengths, so the batch is right-padded
    assert len(outs[0].input_ids) != len(outs[1].input_ids)
    # mid points of every metric coincide (half the elements), so few rows: bs=1 is slow on CPU
    kw = dict(n_steps=2, n_random=1, fractions=(0.5,), return_per_output=True)
    a = faithfulness(smollm, outs, batch_size=1, **kw)["per_output"]
    b = faithfulness(smollm, outs, batch_size=64, **kw)["per_output"]
    for name in a:
        for ra, rb in zip(a[name], b[name]):
            for key in ra:
                if key == "inference_mode":
                    assert ra[key] == rb[key]
                    continue
                np.testing.assert_allclose(ra[key], rb[key], rtol=1e-4, atol=1e-6, err_msg=f"{name}.{key}")


def test_metric_classes_match_faithfulness_and_modes(smollm, lm_oracles, lm_faith):
    out = lm_oracles[0]
    d = Deletion(smollm, n_steps=4, n_random=2)(out)[0]
    assert d["inference_mode"] == "log_softmax"  # the causal-LM default
    np.testing.assert_allclose(d["auc"], lm_faith["deletion"][0][0]["auc"], rtol=1e-6)
    np.testing.assert_allclose(d["random_auc"], lm_faith["deletion"][0][0]["random_auc"], rtol=1e-6)
    # logits mode: the first point is the raw logit of the target
    d_log = Deletion(smollm, n_steps=2, n_random=0, inference_mode="logits")([out])[0]
    manual = _manual_scores(smollm, [out.input_ids], len(out.input_ids), out.targets, mode="logits")[0]
    np.testing.assert_allclose(d_log["curve"][:, 0], manual, rtol=1e-4)
    assert np.isnan(d_log["random_auc"]).all()
    with pytest.raises(ValueError, match="inference_mode"):
        Insertion(smollm, inference_mode="probabilities")


def test_multi_token_targets_teacher_forced(smollm):
    """Each target token is scored on input + the target prefix, all in one forward."""
    tok = smollm.tokenizer
    text = "One, two, three,"
    tg = tok(" four, five", add_special_tokens=False)["input_ids"]
    assert len(tg) >= 3
    ids = tok(text)["input_ids"]
    out = AttributionOutput(
        text=text, task="causal_lm", granularity="token", elements=[tok.decode([t]) for t in ids],
        element_spans=[(0, 0)] * len(ids), element_tokens=[[p] for p in range(len(ids))], input_ids=ids,
        scores=np.random.default_rng(0).normal(size=(len(tg), len(ids))), targets=tg,
        target_labels=[tok.decode([t]) for t in tg], method="Random")
    d = Deletion(smollm, n_steps=1, n_random=0, inference_mode="softmax")([out])[0]
    manual = _manual_scores(smollm, [ids], len(ids), tg, mode="softmax")[0]
    np.testing.assert_allclose(d["curve"][:, 0], manual, rtol=1e-4, atol=1e-6)
    assert manual[1] > 0.5  # "," after " four" given the prefix: teacher forcing really happened


# --------------------------------------------------------------------------- real classifier


@pytest.fixture(scope="module")
def classifier():
    from raylens.models.zoo.classifier import default_folder

    if not (default_folder() / ".complete").exists():
        pytest.skip("the minilm-movie-sentiment classifier is not built here "
                    "(python scripts/build_classifier.py; tests/test_classifier.py builds it)")
    from raylens.models import load_model

    return load_model("minilm-movie-sentiment")


def test_oracle_beats_random_classifier(classifier):
    outs = [_oracle_output(classifier, text, [0, 1], ["negative", "positive"], "sequence_classification")
            for text, _ in SENTIMENT]
    both = outs + [_reversed(o) for o in outs]
    res = faithfulness(classifier, both, n_steps=5, n_random=3, batch_size=32, return_per_output=True)
    n = len(outs)
    split = {name: (p[:n], p[n:]) for name, p in res["per_output"].items()}
    _check_oracle_beats_random(split)
    # end points equal manual forwards ([MASK] replaces every word piece)
    rid = classifier.tokenizer.mask_token_id
    assert default_replace_token_id(classifier.tokenizer) == rid
    for out, d in zip(outs, split["deletion"][0]):
        all_pos = [p for toks in out.element_tokens for p in toks]
        np.testing.assert_allclose(d["curve"][:, 0], _manual_scores(classifier, [out.input_ids], 0, [0, 1])[0],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(d["curve"][:, -1],
                                   _manual_scores(classifier, [_masked(out.input_ids, all_pos, rid)], 0, [0, 1])[0],
                                   rtol=1e-4, atol=1e-6)
        assert d["curve"].shape == (2, 6)
    outs = outs[1:3]  # 8 and 14 word pieces: the batch is right-padded
    a = faithfulness(classifier, outs, n_steps=3, n_random=1, batch_size=1, return_per_output=True)["per_output"]
    b = faithfulness(classifier, outs, n_steps=3, n_random=1, batch_size=64, return_per_output=True)["per_output"]
    for name in a:
        for ra, rb in zip(a[name], b[name]):
            for key in ra:
                if key == "inference_mode":
                    assert ra[key] == rb[key]
                    continue
                np.testing.assert_allclose(ra[key], rb[key], rtol=1e-4, atol=1e-6, err_msg=f"{name}.{key}")
