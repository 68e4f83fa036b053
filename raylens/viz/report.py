"""Self-contained HTML report of a learned concept space.

This is the human-facing end product of the raylens concept job: a single ``.html``
file that a researcher opens in a browser, offline. It has no external dependencies of
any kind (no CDN, no web fonts, no images fetched from anywhere; CSS and JavaScript are
inline and a Content-Security-Policy forbids any network access), and it is built with
the Python standard library only.

What the report shows
---------------------
* A header with the report title, a few derived counts (concepts, labelled concepts,
  examples) and the run ``summary`` (model, layer, corpus, token counts, reconstruction
  metrics, output paths, ... -- whatever flat ``str -> str | number`` mapping the caller
  passes).
* A toolbar with a client-side filter box (matches concept id, label, and promoted /
  suppressed token text) and a sort selector (|importance|, importance, frequency, id).
* One card per concept, ordered by absolute importance, descending (NaN last). A card
  shows the concept id, its LLM label (or "unlabelled", with the labelling error tucked
  away in a collapsed ``<details>``), the signed importance as a diverging bar (green
  to the right for positive, red to the left for negative, scaled to the largest
  |importance| in the report), importance x activation, firing frequency, the tokens
  the concept's direction promotes / suppresses as "chips" (whitespace and byte-level
  BPE markers made visible), and its top-activating corpus examples with the activating
  character spans highlighted. Highlight intensity is the example's (or span's)
  activation relative to the largest activation among that concept's examples; the
  exact value is in the highlight's tooltip. Examples beyond the first few are
  collapsed.

Every piece of corpus / label / token text is HTML-escaped; the small JSON metadata
block embedded for scripting escapes ``<``, ``>`` and ``&`` so it cannot terminate its
``<script>`` element.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import pathlib
from typing import Any, Iterable, Sequence

from raylens.viz.markup import CSP as _CSP
from raylens.viz.markup import PALETTE_DARK as _PALETTE_DARK
from raylens.viz.markup import PALETTE_LIGHT as _PALETTE_LIGHT
from raylens.viz.markup import esc as _esc
from raylens.viz.markup import finite as _finite
from raylens.viz.markup import fmt_num as _fmt_num
from raylens.viz.markup import json_for_script as _json_for_script
from raylens.viz.markup import json_num as _json_num
from raylens.viz.markup import readable_token as _readable_token
from raylens.viz.markup import to_float as _to_float
from raylens.viz.markup import token_html as _token_html
from raylens.viz.issues import issues_html

__all__ = ["render_concept_report"]

#: Examples shown before the "N more examples" fold.
DEFAULT_VISIBLE_EXAMPLES = 3


# --------------------------------------------------------------------------------------
# small value helpers
# --------------------------------------------------------------------------------------


def _fmt_freq(x: float | None) -> str:
    """Frequency is a share in [0, 1]; show it as a percentage."""
    if x is None:
        return "\u2014"
    if not math.isfinite(x):
        return _fmt_num(x)
    return f"{x * 100:.3g}\u202f%"


def _fmt_summary_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    f = _to_float(v) if not isinstance(v, str) else None
    if f is not None:
        if math.isfinite(f) and f == int(f) and abs(f) < 1e15:
            return f"{int(f):,}"
        return f"{f:.4g}" if math.isfinite(f) else _fmt_num(f)
    return str(v)


# --------------------------------------------------------------------------------------
# token display
# --------------------------------------------------------------------------------------


def _chips(tokens: Iterable[Any] | None, cls: str) -> str:
    toks = list(tokens) if tokens is not None else []
    if not toks:
        return '<span class="muted">none</span>'
    return "".join(
        f'<span class="chip {cls}" title="{_esc(repr(str(t)))}">{_token_html(t)}</span>'
        for t in toks
    )


# --------------------------------------------------------------------------------------
# example highlighting
# --------------------------------------------------------------------------------------


def _clean_spans(spans: Any, n: int, default_act: float | None) -> list[tuple[int, int, float | None]]:
    """Clip spans to ``[0, n]``, drop empty/invalid ones, and merge overlaps.

    A span is ``[start, end]`` (character offsets, end exclusive) or optionally
    ``[start, end, activation]``; merged spans keep the largest |activation|.
    """
    cleaned: list[tuple[int, int, float | None]] = []
    for sp in list(spans) if spans is not None else []:
        try:
            parts = list(sp)
            start, end = int(parts[0]), int(parts[1])
        except (TypeError, ValueError, IndexError):
            continue
        act = _to_float(parts[2]) if len(parts) > 2 else default_act
        start, end = max(0, min(start, n)), max(0, min(end, n))
        if end > start:
            cleaned.append((start, end, act))
    cleaned.sort(key=lambda t: (t[0], t[1]))
    merged: list[tuple[int, int, float | None]] = []
    for s, e, a in cleaned:
        if merged and s < merged[-1][1]:  # overlaps the previous span: union them
            ps, pe, pa = merged[-1]
            finite = [x for x in (pa, a) if _finite(x)]
            best = max(finite, key=abs) if finite else (pa if pa is not None else a)
            merged[-1] = (ps, max(pe, e), best)
        else:
            merged.append((s, e, a))
    return merged


def _highlight(text: str, spans: list[tuple[int, int, float | None]], scale: float | None) -> str:
    out: list[str] = []
    pos = 0
    for s, e, act in spans:
        out.append(_esc(text[pos:s]))
        if _finite(act) and _finite(scale) and scale > 0:
            intensity = min(1.0, abs(act) / scale)
        else:
            intensity = 1.0
        alpha = 0.15 + 0.75 * intensity
        act_s = _fmt_num(act)
        out.append(
            f'<mark style="--a:{alpha:.3f}" data-act="{_esc(act_s)}" '
            f'title="activation {_esc(act_s)}">{_esc(text[s:e])}</mark>'
        )
        pos = e
    out.append(_esc(text[pos:]))
    return "".join(out)


def _example_html(ex: dict, scale: float | None) -> str:
    text = ex.get("text")
    text = "" if text is None else str(text)
    act = _to_float(ex.get("activation"))
    spans = _clean_spans(ex.get("spans"), len(text), act)
    doc = ex.get("doc_id")
    body = _highlight(text, spans, scale) if text else '<span class="muted">(empty text)</span>'
    return (
        '<div class="ex">'
        f'<div class="exmeta"><span>doc {_esc(doc if doc is not None else "?")}</span>'
        f'<span>act <b>{_esc(_fmt_num(act))}</b></span></div>'
        f'<div class="extext">{body}</div>'
        "</div>"
    )


def _example_sort_key(ex: dict) -> tuple[int, float]:
    a = _to_float(ex.get("activation"))
    return (0, -a) if _finite(a) else (1, 0.0)


def _examples_html(examples: Sequence[dict], visible: int) -> str:
    if not examples:
        return '<div class="muted noex">no examples</div>'
    acts = [_to_float(ex.get("activation")) for ex in examples]
    for ex in examples:
        for sp in ex.get("spans") or []:
            try:
                if len(sp) > 2:
                    acts.append(_to_float(sp[2]))
            except TypeError:
                pass
    finite = [abs(a) for a in acts if _finite(a)]
    scale = max(finite) if finite else None
    # top-activating first (stable for ties; missing / NaN activations last)
    order = sorted(examples, key=_example_sort_key)
    shown = "".join(_example_html(ex, scale) for ex in order[:visible])
    rest = order[visible:]
    if rest:
        more = "".join(_example_html(ex, scale) for ex in rest)
        shown += (
            f'<details class="more"><summary>{len(rest)} more example'
            f'{"s" if len(rest) != 1 else ""}</summary>{more}</details>'
        )
    return shown


# --------------------------------------------------------------------------------------
# concept cards
# --------------------------------------------------------------------------------------


def _sort_key(c: dict) -> tuple[int, float]:
    imp = _to_float(c.get("importance"))
    if imp is None or math.isnan(imp):
        return (1, 0.0)
    return (0, -abs(imp))


def _bar_html(imp: float | None, max_abs: float) -> str:
    if imp is None or math.isnan(imp):
        return '<div class="bar nan" title="importance unavailable"><i class="axis"></i></div>'
    frac = 1.0 if math.isinf(imp) else (abs(imp) / max_abs if max_abs > 0 else 0.0)
    pct = max(0.0, min(50.0, 50.0 * frac))
    side = "pos" if imp >= 0 else "neg"
    return (
        f'<div class="bar" title="importance {_esc(_fmt_num(imp, signed=True))}">'
        f'<i class="axis"></i><i class="fill {side}" style="width:{pct:.2f}%"></i></div>'
    )


_SCORE_TIP = {
    "detection": "Delphi detection: share of held-out excerpts (half activating, half not) the scorer LLM "
                 "told apart from the label alone. 0.5 = chance, 1 = perfect.",
    "fuzzing": "Delphi fuzzing: share of activating excerpts where the scorer LLM told the truly activating "
               "marked words from random marked words, given the label. 0.5 = chance, 1 = perfect.",
}


def _score_html(det: float | None, fuzz: float | None, err: Any) -> str:
    """The label-score stats of a card (nothing when the concept's label was not scored)."""
    if det is None and fuzz is None and not err:
        return ""
    out = ""
    for task, v in (("detection", det), ("fuzzing", fuzz)):
        out += (f'<div class="stat" title="{_esc(_SCORE_TIP[task])}"><span class="k">{task}</span>'
                f'<span class="v score">{_esc(_fmt_num(v) if _finite(v) else "—")}</span></div>')
    if err:
        out += f'<details class="lerr"><summary>scoring errors</summary><pre>{_esc(err)}</pre></details>'
    return out


def _card_html(c: dict, rank: int, max_abs: float, visible: int) -> str:
    cid = c.get("concept")
    label = c.get("label")
    label = None if label is None or str(label).strip() == "" else str(label)
    err = c.get("label_error")
    imp = _to_float(c.get("importance"))
    ixa = _to_float(c.get("importance_x_activation"))
    freq = _to_float(c.get("frequency"))
    det = _to_float(c.get("detection_accuracy"))
    fuzz = _to_float(c.get("fuzzing_accuracy"))
    score_err = c.get("label_score_error")
    top = list(c.get("top_tokens") or [])
    bottom = list(c.get("bottom_tokens") or [])
    examples = list(c.get("examples") or [])

    search = " ".join(
        [str(cid), label or "unlabelled"]
        + [str(t) for t in top + bottom]
        + [_readable_token(str(t)) for t in top + bottom]
    ).lower()
    sign = "nan" if not (imp is not None and not math.isnan(imp)) else ("pos" if imp >= 0 else "neg")

    label_html = (
        f'<span class="label">{_esc(label)}</span>'
        if label is not None
        else '<span class="label unl">unlabelled</span>'
    )
    err_html = (
        f'<details class="lerr"><summary>labelling failed</summary><pre>{_esc(err)}</pre></details>'
        if err
        else ""
    )
    data = (
        f'data-concept="{_esc(cid)}" data-rank="{rank}" '
        f'data-imp="{_esc(imp if _finite(imp) else "")}" '
        f'data-freq="{_esc(freq if _finite(freq) else "")}" '
        f'data-search="{_esc(search)}"'
    )
    return (
        f'<section class="card {sign}" id="concept-{_esc(cid)}" {data}>'
        '<header class="chead">'
        f'<a class="cid" href="#concept-{_esc(cid)}">#{_esc(cid)}</a>'
        f"{label_html}{err_html}"
        "</header>"
        '<div class="stats">'
        f'<div class="stat"><span class="k">importance</span>'
        f'<span class="v imp {sign}">{_esc(_fmt_num(imp, signed=True))}</span></div>'
        f"{_bar_html(imp, max_abs)}"
        f'<div class="stat"><span class="k">importance\u00d7act</span>'
        f'<span class="v">{_esc(_fmt_num(ixa, signed=True))}</span></div>'
        f'<div class="stat"><span class="k">frequency</span>'
        f'<span class="v">{_esc(_fmt_freq(freq))}</span></div>'
        f"{_score_html(det, fuzz, score_err)}"
        "</div>"
        '<div class="toks">'
        f'<div class="trow"><span class="k">promotes</span><span class="chips">{_chips(top, "pos")}</span></div>'
        f'<div class="trow"><span class="k">suppresses</span><span class="chips">{_chips(bottom, "neg")}</span></div>'
        "</div>"
        f'<div class="examples">{_examples_html(examples, visible)}</div>'
        "</section>"
    )


def _summary_html(summary: dict | None, derived: dict[str, Any]) -> str:
    items = list(derived.items()) + list((summary or {}).items())
    cells = "".join(
        f'<div class="kv"><dt>{_esc(k)}</dt><dd>{_esc(_fmt_summary_value(v))}</dd></div>' for k, v in items
    )
    return f'<dl class="summary">{cells}</dl>'


# --------------------------------------------------------------------------------------
# page
# --------------------------------------------------------------------------------------

_CSS = (
    "\n:root{" + _PALETTE_LIGHT + "}\n@media (prefers-color-scheme:dark){:root{" + _PALETTE_DARK + "}}\n"
) + """*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
.wrap{max-width:1100px;margin:0 auto;padding:20px 16px 60px}
h1{font-size:22px;margin:0 0 4px}
.sub{color:var(--muted);font-size:12px;margin-bottom:12px}
.summary{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:6px 14px;margin:0 0 14px;
padding:12px;background:var(--card);border:1px solid var(--line);border-radius:8px}
.kv{min-width:0}.kv dt{font-size:11px;color:var(--muted);text-transform:uppercase;letter-spacing:.03em}
.kv dd{margin:0;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:13px;overflow-wrap:anywhere}
.toolbar{position:sticky;top:0;z-index:5;display:flex;gap:10px;align-items:center;flex-wrap:wrap;
padding:8px 0;background:var(--bg);border-bottom:1px solid var(--line);margin-bottom:12px}
.toolbar input[type=search]{flex:1;min-width:220px;padding:7px 10px;border:1px solid var(--line);border-radius:6px;
background:var(--card);color:var(--fg);font:inherit}
.toolbar select,.toolbar button{padding:6px 8px;border:1px solid var(--line);border-radius:6px;background:var(--card);
color:var(--fg);font:inherit;cursor:pointer}
#count{color:var(--muted);font-size:12px}
.card{background:var(--card);border:1px solid var(--line);border-left:4px solid var(--muted);border-radius:8px;
padding:12px 14px;margin:0 0 12px}
.card.pos{border-left-color:var(--pos)}.card.neg{border-left-color:var(--neg)}
.chead{display:flex;align-items:baseline;gap:10px;flex-wrap:wrap}
.cid{font-family:ui-monospace,"DejaVu Sans Mono",monospace;color:var(--muted);text-decoration:none;font-size:13px}
.label{font-weight:600;font-size:16px}.label.unl{font-weight:400;font-style:italic;color:var(--muted)}
.lerr{font-size:11px;color:var(--muted)}.lerr summary{cursor:pointer}
.lerr pre{white-space:pre-wrap;margin:4px 0;max-width:800px;font-size:11px}
.stats{display:flex;align-items:center;gap:18px;flex-wrap:wrap;margin:8px 0}
.stat{display:flex;flex-direction:column}.k{font-size:11px;color:var(--muted);text-transform:uppercase;letter-spacing:.03em}
.v{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:14px}
.v.imp.pos{color:var(--pos)}.v.imp.neg{color:var(--neg)}
.bar{position:relative;width:220px;height:12px;background:var(--chip);border-radius:6px;overflow:hidden}
.bar .axis{position:absolute;left:50%;top:0;bottom:0;width:1px;background:var(--muted)}
.bar .fill{position:absolute;top:2px;bottom:2px;border-radius:3px}
.bar .fill.pos{left:50%;background:var(--pos)}.bar .fill.neg{right:50%;background:var(--neg)}
.bar.nan{opacity:.5}
.toks{display:flex;flex-direction:column;gap:4px;margin:6px 0 8px}
.trow{display:flex;gap:8px;align-items:baseline}.trow .k{width:78px;flex:none}
.chips{display:flex;flex-wrap:wrap;gap:4px}
.chip{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;padding:1px 6px;border-radius:10px;
white-space:pre;border:1px solid transparent}
.chip.pos{background:var(--posbg);border-color:var(--pos)}.chip.neg{background:var(--negbg);border-color:var(--neg)}
.ws{color:var(--muted);opacity:.8}
.muted{color:var(--muted);font-size:12px}
.ex{border-top:1px solid var(--line);padding:6px 0}
.exmeta{display:flex;gap:12px;font-size:11px;color:var(--muted);font-family:ui-monospace,"DejaVu Sans Mono",monospace}
.extext{white-space:pre-wrap;overflow-wrap:anywhere;font-size:13px;margin-top:2px}
mark{background:rgba(var(--hl),var(--a,.9));color:inherit;border-radius:2px;padding:0 1px;
box-shadow:0 0 0 1px rgba(var(--hl),.55)}
.more>summary{cursor:pointer;color:var(--muted);font-size:12px;padding:4px 0}
.empty{padding:30px;text-align:center;color:var(--muted);background:var(--card);border:1px dashed var(--line);border-radius:8px}
.hidden{display:none}
"""

_JS = """
(function(){
  var list=document.getElementById('concepts');
  if(!list){return;}
  var cards=Array.prototype.slice.call(list.querySelectorAll('section.card'));
  var q=document.getElementById('q'), sortSel=document.getElementById('sort'), count=document.getElementById('count');
  function num(el,k){var v=el.getAttribute(k);return v===''||v===null?NaN:parseFloat(v);}
  function update(){
    var terms=q.value.toLowerCase().split(/\\s+/).filter(Boolean), n=0;
    cards.forEach(function(c){
      var s=c.getAttribute('data-search')||'';
      var ok=terms.every(function(t){return s.indexOf(t)!==-1;});
      c.classList.toggle('hidden',!ok); if(ok){n++;}
    });
    count.textContent=n+' / '+cards.length+' concepts';
  }
  function key(c,mode){
    var i=num(c,'data-imp'), f=num(c,'data-freq');
    if(mode==='abs'){return isNaN(i)?Infinity:-Math.abs(i);}
    if(mode==='imp_desc'){return isNaN(i)?Infinity:-i;}
    if(mode==='imp_asc'){return isNaN(i)?Infinity:i;}
    if(mode==='freq'){return isNaN(f)?Infinity:-f;}
    if(mode==='id'){var v=parseFloat(c.getAttribute('data-concept'));return isNaN(v)?Infinity:v;}
    return num(c,'data-rank');
  }
  function resort(){
    var m=sortSel.value;
    cards.slice().sort(function(a,b){var d=key(a,m)-key(b,m);
      if(isNaN(d)){d=0;} return d||num(a,'data-rank')-num(b,'data-rank');})
      .forEach(function(c){list.appendChild(c);});
  }
  q.addEventListener('input',update); sortSel.addEventListener('change',resort);
  document.getElementById('expand').addEventListener('click',function(){
    var ds=list.querySelectorAll('details.more'), open=!Array.prototype.some.call(ds,function(d){return d.open;});
    Array.prototype.forEach.call(ds,function(d){d.open=open;});
  });
  update();
})();
"""


def render_concept_report(
    concepts: list[dict],
    out_path: str | os.PathLike,
    *,
    title: str = "raylens concept report",
    summary: dict | None = None,
    max_visible_examples: int = DEFAULT_VISIBLE_EXAMPLES,
    issues: Sequence[dict] | None = None,
) -> pathlib.Path:
    """Write a self-contained, offline HTML report of a learned concept space.

    Args:
        concepts: one dict per concept (any order; the report sorts them by
            ``|importance|`` descending, NaN / missing last). Keys (missing keys are
            treated as ``None`` / empty):

            * ``concept`` (int): concept id (dictionary atom index).
            * ``label`` (str | None): LLM-written label; shown as "unlabelled" if None.
            * ``label_error`` (str | None): why labelling failed; shown collapsed.
            * ``importance`` (float, signed): mean concept-to-output gradient. Sign is
              shown as colour (green +, red -) and as a diverging bar scaled to the
              largest finite |importance| in the report. NaN is allowed.
            * ``importance_x_activation`` (float | None): mean concept x gradient.
            * ``frequency`` (float | None): share of corpus tokens (in [0, 1]) on which
              the concept fires; displayed as a percentage.
            * ``detection_accuracy`` / ``fuzzing_accuracy`` (float | None): Delphi scores of
              the label (`raylens.concepts.scoring`; 0.5 = chance), shown when present;
              ``label_score_error`` (str | None): why scoring failed, shown collapsed.
            * ``top_tokens`` / ``bottom_tokens`` (list[str]): vocabulary tokens the
              concept's decoder direction promotes / suppresses (raw tokenizer strings;
              byte-level "Ġ" markers, SentencePiece "▁" and whitespace are shown readably).
            * ``examples`` (list[dict]): top-activating contexts, each
              ``{"doc_id": int, "activation": float, "text": str,
              "spans": [[start, end], ...]}``, where ``spans`` are character offsets
              (end exclusive) into ``text`` of the activating token(s). A span may carry
              its own activation as a third element ``[start, end, act]``. Spans are
              clipped to the text, empty ones dropped, overlapping ones merged.
              Examples are shown by activation, descending; highlight opacity is
              ``|activation| / max |activation|`` over the concept's examples.
        out_path: file to write (UTF-8). Parent directories are created.
        title: page title / heading.
        summary: flat ``str -> str | number`` mapping shown at the top (model, layer,
            corpus, #documents / #tokens, reconstruction metrics, output paths, ...).
        max_visible_examples: examples per concept shown before the collapsible
            "N more examples" fold.
        issues: the job's ``issues.parquet`` rows (``doc_id``, ``stage``, ``kind``,
            ``message``), shown after the concepts (counts by stage and kind, then the first
            rows; `raylens.viz.issues.issues_html`) and counted in the summary. None: no section.

    Returns:
        The path written, as a :class:`pathlib.Path`.
    """
    concepts = [dict(c) for c in (concepts or [])]
    ordered = sorted(concepts, key=_sort_key)  # stable: ties keep input order

    abs_imps = [abs(v) for v in (_to_float(c.get("importance")) for c in ordered) if _finite(v)]
    max_abs = max(abs_imps) if abs_imps else 0.0
    visible = max(0, int(max_visible_examples))

    n_labelled = sum(1 for c in ordered if c.get("label") not in (None, ""))
    n_examples = sum(len(c.get("examples") or []) for c in ordered)
    derived = {"concepts": len(ordered), "labelled": n_labelled, "examples shown": n_examples}
    if issues is not None:
        derived["per-document issues"] = len(issues)

    if ordered:
        cards = "".join(_card_html(c, i, max_abs, visible) for i, c in enumerate(ordered))
        body = f'<main id="concepts">{cards}</main>'
    else:
        body = '<main id="concepts"><div class="empty">No concepts to show.</div></main>'
    if issues is not None:
        body += issues_html(issues)

    page = _page_html(title, summary, derived, body, _meta_json(ordered, title, summary), len(ordered))
    path = pathlib.Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8", newline="\n")
    return path


def _meta_json(ordered: list[dict], title: str, summary: dict | None) -> str:
    """The JSON metadata block embedded for scripting (safe inside ``<script>``)."""
    meta = {
        "title": str(title),
        "summary": {
            str(k): (v if isinstance(v, (str, int, bool)) or v is None else _json_num(_to_float(v)))
            for k, v in (summary or {}).items()
        },
        "concepts": [
            {
                "concept": c.get("concept"),
                "label": None if c.get("label") is None else str(c.get("label")),
                "importance": _json_num(_to_float(c.get("importance"))),
                "importance_x_activation": _json_num(_to_float(c.get("importance_x_activation"))),
                "frequency": _json_num(_to_float(c.get("frequency"))),
                "detection_accuracy": _json_num(_to_float(c.get("detection_accuracy"))),
                "fuzzing_accuracy": _json_num(_to_float(c.get("fuzzing_accuracy"))),
                "top_tokens": [str(t) for t in (c.get("top_tokens") or [])],
                "bottom_tokens": [str(t) for t in (c.get("bottom_tokens") or [])],
                "n_examples": len(c.get("examples") or []),
            }
            for c in ordered
        ],
    }
    try:
        return _json_for_script(meta)
    except (TypeError, ValueError):  # exotic ids etc.: fall back to strings
        return _json_for_script(json.loads(json.dumps(meta, default=str)))


def _page_html(title: str, summary: dict | None, derived: dict, body: str, meta_json: str, n_concepts: int) -> str:
    """The whole report page around the concept cards ``body``."""
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_esc(_CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        '<div class="wrap">\n'
        f"<h1>{_esc(title)}</h1>\n"
        f'<div class="sub">generated by raylens · {_esc(generated)} · concepts sorted by |importance|</div>\n'
        f"{_summary_html(summary, derived)}\n"
        '<div class="toolbar">'
        '<input type="search" id="q" placeholder="filter by label, token or id…" aria-label="filter concepts">'
        '<select id="sort" aria-label="sort concepts">'
        '<option value="abs">|importance| ↓</option><option value="imp_desc">importance ↓</option>'
        '<option value="imp_asc">importance ↑</option><option value="freq">frequency ↓</option>'
        '<option value="id">concept id</option></select>'
        '<button type="button" id="expand">expand / collapse examples</button>'
        f'<span id="count">{n_concepts} concepts</span>'
        "</div>\n"
        f"{body}\n"
        "</div>\n"
        f'<script type="application/json" id="raylens-data">{meta_json}</script>\n'
        f"<script>{_JS}</script>\n"
        "</body>\n</html>\n"
    )
