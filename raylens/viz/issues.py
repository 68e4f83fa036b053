"""The per-document issues section of the HTML outputs: `issues_html`.

Both jobs write ``issues.parquet`` (`raylens.io.schemas.ISSUES_SCHEMA`: ``doc_id``, ``stage``,
``kind``, ``message``): one row per problem with one document that the job recorded and went
past (an empty text, a truncated one, a float16 overflow, an attribution error...). The concept
report (`raylens.viz.report.render_concept_report`) and the attribution gallery
(`raylens.viz.gallery.render_gallery`) show it with this section: the counts by stage and kind,
then the first rows. Every value is escaped (messages may quote corpus text). Standard library
only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from raylens.viz.markup import esc

__all__ = ["ISSUES_CSS", "issues_html"]

#: Styles of the section (scoped to ``.rl-issues``); self-contained so any page can hold it.
ISSUES_CSS = (
    ".rl-issues{margin:14px 0}.rl-issues h2{font-size:18px;margin:18px 0 6px}"
    ".rl-issues table{border-collapse:collapse;font-size:12.5px;margin:6px 0}"
    ".rl-issues th,.rl-issues td{border:1px solid #d9dde5;padding:3px 8px;text-align:left;vertical-align:top}"
    ".rl-issues th{font-weight:600}.rl-issues td.n{text-align:right}"
    ".rl-issues td.msg{max-width:640px;white-space:pre-wrap;overflow-wrap:anywhere}"
    ".rl-issues .rl-isub{font-size:12px;opacity:.75}"
)


def issues_html(rows: Sequence[Mapping[str, Any]] | None, *, max_rows: int = 20) -> str:
    """The issues section: a heading with the total, a table of counts per (stage, kind)
    (largest first), and the first ``max_rows`` rows (document, stage, kind, message).

    Args:
        rows: ``issues.parquet`` rows (``doc_id``, ``stage``, ``kind``, ``message``), in file
            order (by document, then stage). None or empty: a line saying there were none.
        max_rows: rows listed after the counts.

    Returns:
        An HTML fragment ``<section class="rl-issues" id="issues">...</section>``, with its
        own ``<style>``.
    """
    rows = list(rows or [])
    head = f"<style>{ISSUES_CSS}</style><section class=\"rl-issues\" id=\"issues\">"
    if not rows:
        return (head + "<h2>Per-document issues</h2>"
                "<p class=\"rl-isub\">None recorded (issues.parquet is empty).</p></section>")
    counts = Counter((str(r.get("stage")), str(r.get("kind"))) for r in rows)
    count_rows = "".join(f"<tr><td>{esc(s)}</td><td>{esc(k)}</td><td class=\"n\">{n}</td></tr>"
                         for (s, k), n in sorted(counts.items(), key=lambda x: (-x[1], x[0])))
    shown = rows[: max(0, int(max_rows))]
    listed = "".join(
        f"<tr><td class=\"n\">{esc(r.get('doc_id'))}</td><td>{esc(r.get('stage'))}</td>"
        f"<td>{esc(r.get('kind'))}</td><td class=\"msg\">{esc(r.get('message'))}</td></tr>" for r in shown)
    more = (f"<p class=\"rl-isub\">{len(rows) - len(shown)} more in issues.parquet.</p>"
            if len(rows) > len(shown) else "")
    return (
        head + f"<h2>Per-document issues ({len(rows)})</h2>"
        "<p class=\"rl-isub\">Problems with single documents that the job recorded and went past "
        "(all of them are in issues.parquet).</p>"
        "<table class=\"rl-icounts\"><tr><th>stage</th><th>kind</th><th>rows</th></tr>"
        f"{count_rows}</table>"
        "<table class=\"rl-irows\"><tr><th>document</th><th>stage</th><th>kind</th><th>message</th></tr>"
        f"{listed}</table>{more}</section>"
    )
