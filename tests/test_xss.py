"""Corpus, model and LLM text in the HTML outputs is escaped: the concept report, the attribution
gallery and the attribution view, built with the hostile text of `tests.xss` everywhere text can
reach (documents, tokens, LLM labels with HTML in them, label and scoring errors, summary values,
method names and parameters, class labels, output tokens, the per-document issues table), are
checked in the file (fast) and rendered inert in headless Chromium (one browser for the module)."""

from __future__ import annotations

import numpy as np
import pytest

from raylens.viz.attributions import attribution_html, save_attribution_html
from raylens.viz.gallery import render_gallery
from raylens.viz.network import render_network_report
from raylens.viz.issues import issues_html
from raylens.viz.report import render_concept_report
from tests.test_attribution_view import make_output
from tests.xss import PAYLOADS, assert_escaped, browser, check_inert, hostile_texts

TEXTS = hostile_texts(len(PAYLOADS))
LABEL = "<b onmouseover=alert('xss-label')>Praise</b> <script>alert('xss-label2')</script>"  # an LLM's "label"


def _issues() -> list[dict]:
    return [{"doc_id": i, "stage": PAYLOADS[i % 5], "kind": PAYLOADS[(i + 1) % len(PAYLOADS)], "message": t}
            for i, t in enumerate(TEXTS)]


def _concepts() -> list[dict]:
    out = []
    for i, text in enumerate(TEXTS):
        out.append({
            "concept": i, "label": LABEL if i == 0 else PAYLOADS[i], "importance": 1.0 / (i + 1),
            "label_error": None if i % 3 else PAYLOADS[-i], "label_score_error": PAYLOADS[i - 2],
            "detection_accuracy": 0.5, "fuzzing_accuracy": 0.75, "frequency": 0.1,
            "top_tokens": [PAYLOADS[i], "\u0120" + PAYLOADS[-i]], "bottom_tokens": [PAYLOADS[i - 1]],
            "examples": [{"doc_id": PAYLOADS[i], "activation": 2.0, "text": text, "spans": [[2, 9]]},
                         {"doc_id": i, "activation": 1.0, "text": TEXTS[i - 1], "spans": [[0, 4]]}],
        })
    return out


def _outputs() -> list:
    outs = []
    for i, text in enumerate(TEXTS[:6]):
        n = len(text.split())
        scores = np.linspace(-1, 1, 2 * n).reshape(2, n)
        if i % 2:
            outs.append(make_output(text, scores, [PAYLOADS[i], PAYLOADS[i + 1]], method=PAYLOADS[i + 2],
                                    params={PAYLOADS[i]: PAYLOADS[i + 3]}, target_scores=np.array([0.2, 0.8])))
        else:
            outs.append(make_output(text, scores, [PAYLOADS[i], "\u0120" + PAYLOADS[i + 4]], task="causal_lm",
                                    method="Saliency", params={"abs": PAYLOADS[i]}))
    return outs


def _gallery() -> str:
    metrics = {"deletion_auc": 0.2, "deletion_auc_random": 0.4, "insertion_auc": 0.6, "insertion_auc_random": 0.4,
               "comprehensiveness": 0.3, "comprehensiveness_random": 0.1, "sufficiency": 0.1,
               "sufficiency_random": 0.2}
    summary = [{"method": PAYLOADS[0], "n_rows": 6, "n_errors": 1, "rows_per_second": 2.0, **metrics}]
    words = [{"method": PAYLOADS[0], "group": PAYLOADS[1], "direction": d, "rank": r, "word": PAYLOADS[r + 3 * k],
              "mean_score": 0.5 - k, "count": 3, "n_docs": 2}
             for k, d in enumerate(("positive", "negative")) for r in range(3)]
    outs = _outputs()
    rows = [{"doc_id": PAYLOADS[i], "prediction": PAYLOADS[i + 1], "prediction_score": 0.8, **metrics}
            for i in range(len(outs))]
    examples = {PAYLOADS[0]: {"best": list(zip(outs[:2], rows[:2])), "worst": list(zip(outs[2:4], rows[2:4])),
                              "random": list(zip(outs[4:], rows[4:]))}}
    return render_gallery(summary, words, examples, title=PAYLOADS[7], subtitle=PAYLOADS[9], issues=_issues())


def _report(path):
    return render_concept_report(_concepts(), path, title=PAYLOADS[6], summary={PAYLOADS[1]: PAYLOADS[2], "n": 3},
                                 issues=_issues())


# ------------------------------------------------------------------ fast: the files themselves
def test_files_hold_no_payload_verbatim(tmp_path):
    report, gallery = _report(tmp_path / "report.html").read_text(encoding="utf-8"), _gallery()
    assert_escaped(report)
    assert_escaped(gallery)
    for page in (report, gallery):  # the issues section is there: the total, the first 20 rows
        assert f"Per-document issues ({len(TEXTS)})" in page and page.count('<td class="msg">') == 20
        assert f"{len(TEXTS) - 20} more in issues.parquet" in page
    assert_escaped(attribution_html(_outputs()))
    assert_escaped(attribution_html(_outputs(), standalone=False))
    assert_escaped(issues_html(_issues()))


def test_issues_section_counts_by_stage_and_kind_and_lists_the_first_rows():
    rows = [{"doc_id": d, "stage": s, "kind": k, "message": f"m{d}"}
            for d, s, k in [(1, "extract", "empty"), (2, "extract", "empty"), (3, "extract", "truncated"),
                            (4, "attribute", "error")] * 8]
    html = issues_html(rows, max_rows=5)
    assert "Per-document issues (32)" in html
    assert "<td>extract</td><td>empty</td><td class=\"n\">16</td>" in html  # largest count first
    assert html.index(">16<") < html.index(">8<")
    assert html.count("<td class=\"msg\">") == 5 and "27 more in issues.parquet" in html
    assert "None recorded" in issues_html([]) and issues_html(None) == issues_html([])


def _network_report() -> str:
    """The network job's report with a payload as every token string, lens name, head role,
    document id, summary value and the title."""
    n = len(PAYLOADS)
    rows = [{"lens": "logit", "layer": la, "position": p, "token_id": p, "next_token_id": (p + 1) % n,
             "kl_to_final": 0.5 * la, "top1_token_id": (p + 2) % n, "top1_agrees": la == 1, "rank_final": 1 - la,
             "rank_next": 4} for la in (0, 1) for p in range(n)]
    curves = [{"lens": PAYLOADS[la], "layer": la, "kl_q25": 1.0, "kl_q50": 2.0, "kl_q75": 3.0,
               "top1_agreement": 0.5, "mean_rank_next": 10.0, "n_tokens": 2} for la in (0, 1)]
    stability = [{"layer": 0, "head": h, "role": PAYLOADS[h], "agreement": 1.0} for h in range(3)]
    roles = [{"layer": 0, "head": h, "seed": 0, "role": PAYLOADS[h]} for h in range(3)]
    return render_network_report(rows, curves, stability, roles, token_strings=dict(enumerate(PAYLOADS)),
                                 doc_id=PAYLOADS[3], title=PAYLOADS[6], summary={PAYLOADS[4]: PAYLOADS[5]})


def test_network_report_holds_no_payload_verbatim():
    assert_escaped(_network_report())


# ------------------------------------------------------------------ slow: in a browser
@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    b = browser(tmp_path_factory)
    yield b
    b.close()


@pytest.mark.slow
def test_concept_report_is_inert_in_chromium(chromium, tmp_path):
    path = _report(tmp_path / "report.html")
    seen = check_inert(chromium, path, visible=TEXTS + [LABEL, PAYLOADS[6]])
    assert seen["title"] == PAYLOADS[6]


@pytest.mark.slow
def test_attribution_gallery_is_inert_in_chromium(chromium, tmp_path):
    path = tmp_path / "gallery.html"
    path.write_text(_gallery(), encoding="utf-8")
    check_inert(chromium, path, visible=TEXTS[:6] + [PAYLOADS[7]])


@pytest.mark.slow
def test_attribution_view_is_inert_in_chromium(chromium, tmp_path):
    path = save_attribution_html(_outputs(), tmp_path / "view.html", title=PAYLOADS[5])
    check_inert(chromium, path, visible=TEXTS[:6])


@pytest.mark.slow
def test_the_check_catches_each_payload_left_unescaped(chromium, tmp_path):
    """The browser check is not vacuous: a page with one payload written raw (as text and in
    double- and single-quoted attributes, as a careless renderer would) fails it, for every
    payload that means anything as raw HTML (the template one only matters to template engines)."""
    caught = []
    for i, p in enumerate(PAYLOADS):
        if p.startswith("{{"):
            continue
        path = tmp_path / f"raw{i}.html"
        path.write_text(f"<!DOCTYPE html><html><head><meta charset=utf-8><title>t</title></head><body><p>{p}</p>"
                        f"<p title=\"{p}\">a</p><p title='{p}'>b</p><p>after</p></body></html>", encoding="utf-8")
        try:
            check_inert(chromium, path, visible=[p, "after"])
        except AssertionError:
            caught.append(i)
    assert caught == [i for i, p in enumerate(PAYLOADS) if not p.startswith("{{")]


@pytest.mark.slow
def test_network_report_is_inert_in_chromium(chromium, tmp_path):
    path = tmp_path / "network.html"
    path.write_text(_network_report(), encoding="utf-8")
    seen = check_inert(chromium, path, visible=[PAYLOADS[6]], own={"svg": 3})  # its three charts
    assert seen["title"] == PAYLOADS[6]
