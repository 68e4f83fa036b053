"""The attribution job's gallery: one self-contained HTML page with the per-method summary, the
corpus word table and browsable examples rendered with the attribution view.

Sections, in order:

* **Summary**: one row per method: rows explained, errors, rows per second and the four
  faithfulness metrics beside their random-ranking baselines (the better of each pair in
  bold; arrows give each metric's direction).
* **Per-document issues** (when given): counts by stage and kind, then the first rows of
  ``issues.parquet`` (`raylens.viz.issues.issues_html`).
* **What the model relies on**: per method and class (``all`` for a causal LM), the words
  with the highest and the lowest mean attribution across the corpus, with how often they
  occur.
* **Examples**: per method, tabs for the ``best``, ``worst`` and ``random`` rows (best and worst
  by deletion AUC minus its random baseline); each example is an
  :func:`~raylens.viz.attributions.attribution_html` fragment (classes switchable, output tokens
  clickable), with its document id, prediction and metrics.

Offline and escaped like the other views (inline CSS/JS, the shared Content-Security-Policy,
every text through :func:`~raylens.viz.markup.esc`). Standard library only.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

from raylens.attributions.output import AttributionOutput
from raylens.viz.markup import CSP, esc, fmt_num
from raylens.viz.attributions import attribution_html
from raylens.viz.issues import issues_html

KINDS = ("best", "worst", "random")
_METRICS = (("deletion_auc", "deletion AUC", False), ("insertion_auc", "insertion AUC", True),
            ("comprehensiveness", "AOPC compr.", True), ("sufficiency", "AOPC suff.", False))

_CSS = """
body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330;background:#f6f7f9}
.g-wrap{max-width:1180px;margin:0 auto;padding:18px 22px 60px}
h1{font-size:22px;margin:4px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d9dde5;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}.g-sub{color:#5b6475;font-size:12.5px}
table.g{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0}
table.g th,table.g td{border:1px solid #e0e3ea;padding:4px 8px;text-align:right}
table.g th{background:#eef0f4;font-weight:600}table.g td.l,table.g th.l{text-align:left}
.g-rand{color:#7b8394}.g-better{font-weight:700}
.g-words{display:flex;flex-wrap:wrap;gap:14px}.g-words>div{flex:1 1 340px}
.g-tabs{margin:8px 0}.g-tab{border:1px solid #c5cad6;background:#fff;border-radius:14px;padding:3px 12px;
margin-right:6px;cursor:pointer;font:inherit}.g-tab.on{background:#1d4ed8;border-color:#1d4ed8;color:#fff}
.g-panel{display:none}.g-panel.on{display:block}.g-meta{font-size:12.5px;color:#3b4252;margin:10px 0 2px}
.g-err{color:#a12a2a}
"""

_JS = """
(function(){
  document.querySelectorAll('.g-method').forEach(function(m){
    m.querySelectorAll('.g-tab').forEach(function(b){
      b.addEventListener('click', function(){
        m.querySelectorAll('.g-tab').forEach(function(x){x.classList.toggle('on', x===b);});
        m.querySelectorAll('.g-panel').forEach(function(p){p.classList.toggle('on', p.dataset.kind===b.dataset.kind);});
      });
    });
  });
})();
"""


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return fmt_num(float(x)) if digits == 3 else f"{float(x):.{digits}f}"


def _summary_html(summary: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{esc(label)} {'↑' if up else '↓'}</th><th class=g-rand>random</th>"
                   for _, label, up in _METRICS)
    rows = []
    for r in summary:
        cells = []
        for key, _, up in _METRICS:
            v, rv = r.get(key), r.get(key + "_random")
            better = (v is not None and rv is not None and math.isfinite(v) and math.isfinite(rv)
                      and ((v > rv) if up else (v < rv)))
            cells.append(f"<td class='{'g-better' if better else ''}'>{_num(v)}</td><td class=g-rand>{_num(rv)}</td>")
        rows.append(f"<tr><td class=l>{esc(r['method'])}</td><td>{int(r['n_rows'])}</td><td>{int(r['n_errors'])}</td>"
                    f"<td>{_num(r.get('rows_per_second'), 2)}</td>{''.join(cells)}</tr>")
    return (f"<table class=g id=g-summary><tr><th class=l>method</th><th>rows</th><th>errors</th><th>rows/s</th>"
            f"{head}</tr>{''.join(rows)}</table>")


def _words_html(words: Sequence[Mapping[str, Any]], top: int) -> str:
    groups: dict[tuple[str, str], dict[str, list]] = {}
    for w in words:
        if int(w["rank"]) < top:
            groups.setdefault((w["method"], w["group"]), {"positive": [], "negative": []})[w["direction"]].append(w)
    if not groups:
        return "<p class=g-sub>No word occurs often enough to be ranked (see gallery.min_word_count).</p>"
    out = []
    for (method, group), dirs in groups.items():
        tables = []
        for direction, title in (("positive", "highest mean (pushes up)"), ("negative", "lowest mean")):
            body = "".join(f"<tr><td class=l>{esc(w['word'])}</td><td>{_num(w['mean_score'])}</td>"
                           f"<td>{int(w['count'])}</td><td>{int(w['n_docs'])}</td></tr>"
                           for w in sorted(dirs[direction], key=lambda w: w["rank"]))
            tables.append(f"<table class=g><tr><th class=l>{esc(title)}</th><th>mean score</th><th>count</th>"
                          f"<th>docs</th></tr>{body}</table>")
        out.append(f"<div><h3>{esc(method)} · {esc(group)}</h3>{''.join(tables)}</div>")
    return f"<div class=g-words>{''.join(out)}</div>"


def _example_html(out: AttributionOutput, meta: Mapping[str, Any]) -> str:
    metrics = " · ".join(f"{label} {_num(meta.get(key))} (random {_num(meta.get(key + '_random'))})"
                         for key, label, _ in _METRICS if meta.get(key) is not None)
    pred = meta.get("prediction")
    head = (f"<div class=g-meta>document {esc(meta.get('doc_id'))} · prediction <b>{esc(pred)}</b> "
            f"({_num(meta.get('prediction_score'))})" + (f" · {esc(metrics)}" if metrics else "") + "</div>")
    return head + attribution_html([out], standalone=False)


def render_gallery(
    summary: Sequence[Mapping[str, Any]],
    words: Sequence[Mapping[str, Any]],
    examples: Mapping[str, Mapping[str, Sequence[tuple[AttributionOutput, Mapping[str, Any]]]]],
    *,
    title: str = "raylens attribution gallery",
    subtitle: str = "",
    top_words: int = 15,
    issues: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The gallery page (standalone HTML).

    Args:
        summary: one mapping per method (``method``, ``n_rows``, ``n_errors``, ``rows_per_second``
            and the metric columns of :func:`raylens.attributions.corpus.method_summary`).
        words: rows of :func:`raylens.attributions.corpus.word_importance`.
        examples: ``method -> kind ("best" | "worst" | "random") -> [(output, row)]``; ``row``
            holds ``doc_id``, ``prediction``, ``prediction_score`` and the metric columns.
        title, subtitle: page heading and the line below it (escaped).
        top_words: words shown per method, group and direction.
        issues: the job's ``issues.parquet`` rows, shown after the summary
            (`raylens.viz.issues.issues_html`); None: no section.

    Returns:
        The HTML text.
    """
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = []
    for method, kinds in examples.items():
        tabs = "".join(f"<button class='g-tab{' on' if k == 'best' else ''}' data-kind={k}>{k} "
                       f"({len(kinds.get(k, []))})</button>" for k in KINDS)
        panels = "".join(
            f"<div class='g-panel{' on' if k == 'best' else ''}' data-kind={k}>"
            + ("".join(_example_html(o, m) for o, m in kinds.get(k, []))
               or "<p class=g-sub>none (metrics disabled or no explained rows)</p>") + "</div>"
            for k in KINDS)
        sections.append(f"<section class=g-method data-method='{esc(method)}'><h3>{esc(method)}</h3>"
                        f"<div class=g-tabs>{tabs}</div>{panels}</section>")
    return (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body><div class=g-wrap>\n"
        f"<h1>{esc(title)}</h1><div class=g-sub>{esc(subtitle)} · generated by raylens · {esc(generated)}</div>\n"
        "<h2>Summary per method</h2>"
        "<p class=g-sub>Faithfulness averaged over the explained rows, beside the same metric for random "
        "rankings (↑ higher is better, ↓ lower is better; bold: better than random).</p>"
        f"{_summary_html(summary)}\n"
        + ("" if issues is None else issues_html(issues)) +
        "<h2>What the model relies on</h2>"
        "<p class=g-sub>Mean attribution of each word over its occurrences in the corpus, per method and "
        "explained class.</p>"
        f"{_words_html(words, top_words)}\n"
        "<h2>Examples</h2><p class=g-sub>Best and worst by deletion AUC minus its random baseline; random: a "
        "seeded sample. Click a class or an output token to switch the highlighted attributions.</p>"
        + "".join(sections)
        + f"\n</div><script>{_JS}</script>\n</body>\n</html>\n"
    )


__all__ = ["KINDS", "render_gallery"]
