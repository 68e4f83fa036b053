"""Interactive, self-contained HTML view of attribution results (like Interpreto's view).

:func:`attribution_html` renders one or several
:class:`~raylens.attributions.output.AttributionOutput` as HTML; :func:`save_attribution_html`
writes a standalone page; ``AttributionOutput._repr_html_`` shows one in a notebook.

What a block shows
------------------
* A header with the method name, the task, the granularity, the number of elements and
  targets, and the method's parameters.
* The targets as a row of buttons: the classes (``target_labels``) for sequence
  classification, the output tokens for a causal LM (the generated continuation, whitespace
  and byte-level BPE markers made readable). Clicking one displays the input attributions
  for that target (its row of ``scores``); the first target is shown initially.
* The input ``text`` with every element highlighted by its signed importance for the
  selected target: green for positive, red for negative, opacity ``|score| / max |score|``
  over that row (finite scores only; ``±inf`` is full intensity, NaN is hatched grey). The
  exact score is in the element's tooltip and ``data-score`` attribute. The text between
  elements is kept verbatim (spaces, newlines), using ``element_spans`` against ``text``;
  an element without a usable span (empty, out of range, or covered by an earlier one) is
  drawn as a small label whose text is CSS-generated, so the text content of the
  highlighted block is always exactly ``text``.
* A legend with the colour scale and the row's max |score|.

The HTML is self-contained (inline CSS and JavaScript, no network; a standalone page carries
the same Content-Security-Policy as the concept report). Every piece of text is escaped; the
data the script uses is embedded as JSON in a ``<script type="application/json">`` element
with ``<``, ``>``, ``&``, U+2028 and U+2029 escaped, and non-finite numbers written as the
strings ``"NaN"``, ``"+inf"``, ``"-inf"``. The first target's colours are rendered
server-side too, so the view reads correctly where scripts do not run (untrusted notebooks).

A fragment (``standalone=False``, used by ``_repr_html_``) has no ``<html>`` wrapper: its CSS
is scoped under the ``.rl-attr`` class (CSS variables included, nothing on ``:root`` or
``body``) and its only id is a random per-fragment one, which its script looks up, so several
outputs in one notebook do not interfere.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import pathlib
import uuid
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from raylens.viz.markup import (
    CSP,
    PALETTE_DARK,
    PALETTE_LIGHT,
    esc,
    fmt_num,
    json_for_script,
    readable_token,
    to_float,
    token_html,
)

if TYPE_CHECKING:
    from raylens.attributions.output import AttributionOutput

__all__ = ["attribution_html", "save_attribution_html"]

#: Highlight opacity of an element whose |score| is the row's max.
MAX_ALPHA = 0.8

_TASK_NAMES = {"sequence_classification": "sequence classification", "causal_lm": "causal LM"}


# --------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------


def _cell(x: Any) -> float | str:
    """A score as embedded in the JSON data: the shortest decimal that round-trips its
    float32 value, or ``"NaN"`` / ``"+inf"`` / ``"-inf"``."""
    v = to_float(x)
    if v is None or math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    v = float(str(np.float32(v)))
    return 0.0 if v == 0 else v


def _num_str(v: float | str) -> str:
    """``String(v)`` as JavaScript writes it (what the tooltip and ``data-score`` show)."""
    if isinstance(v, str):
        return v
    if v == 0:
        return "0"
    if 1e-6 <= abs(v) < 1e21:
        s = np.format_float_positional(v, unique=True, trim="-")
    else:
        mant, _, exp = repr(v).partition("e")
        s = f"{mant.removesuffix('.0')}e{'-' if exp.startswith('-') else '+'}{int(exp.lstrip('+-'))}"
    return s


def _signed_str(v: float | str) -> str:
    s = _num_str(v)
    return "+" + s if isinstance(v, float) and v > 0 else s


def _sign_alpha(v: float | str, scale: float) -> tuple[str, float]:
    """CSS class and highlight opacity of one score (mirrors ``paint`` in the script)."""
    if isinstance(v, str):
        if v == "NaN":
            return "rl-nan", 0.0
        return ("rl-pos" if v == "+inf" else "rl-neg"), MAX_ALPHA
    cls = "rl-pos" if v > 0 else "rl-neg" if v < 0 else "rl-zero"
    frac = min(1.0, abs(v) / scale) if scale > 0 else 0.0
    return cls, round(frac * MAX_ALPHA, 3)


def _jsonable(obj: Any) -> Any:
    """``obj`` with everything JSON can't hold made JSON-safe (non-finite floats -> str)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, np.integer)):
        return obj.item()
    f = to_float(obj)
    if f is not None:
        return f if math.isfinite(f) else _cell(f)
    return str(obj)


# --------------------------------------------------------------------------------------
# one output
# --------------------------------------------------------------------------------------


def _segments(text: str, spans: Iterable[Any], n: int) -> list[tuple[str, Any]]:
    """Split ``text`` into ``("gap", str)``, ``("el", (i, s, e))`` and ``("ghost", i)`` pieces.

    Concatenating the ``gap`` strings and ``text[s:e]`` of the ``el`` pieces, in order, gives
    ``text`` exactly. Elements are laid out by span start; an element with no usable span
    (or one entirely covered by earlier elements) becomes a ``ghost``, placed right after the
    element that precedes it in index order.
    """
    spans = list(spans)
    n_text = len(text)
    keyed: list[tuple[int, int, int, int]] = []  # (pos, i, start, end) ; end < 0: ghost
    anchor = 0
    for i in range(n):
        try:
            s, e = int(spans[i][0]), int(spans[i][1])
        except (TypeError, ValueError, IndexError):
            s, e = -1, -1
        if 0 <= s < e <= n_text:
            keyed.append((s, i, s, e))
            anchor = e
        else:
            keyed.append((anchor, i, -1, -1))
    keyed.sort()
    out: list[tuple[str, Any]] = []
    pos = 0
    for _, i, s, e in keyed:
        s = max(s, pos)
        if e < 0 or s >= e:
            out.append(("ghost", i))
            continue
        if s > pos:
            out.append(("gap", text[pos:s]))
        out.append(("el", (i, s, e)))
        pos = e
    if pos < n_text:
        out.append(("gap", text[pos:]))
    return out


def _row_scale(row: list[float | str]) -> float:
    finite = [abs(v) for v in row if isinstance(v, float)]
    return max(finite) if finite else 0.0


def _target_tip(out: AttributionOutput, t: int) -> str:
    label = str(out.target_labels[t])
    if out.task == "causal_lm":
        return f"output token {readable_token(label)!r}"
    return f"class {label}"


def _params_html(params: dict) -> str:
    chips = []
    for k, v in (params or {}).items():
        jv = v if isinstance(v, str) else _jsonable(v)
        full = jv if isinstance(jv, str) else json.dumps(jv, ensure_ascii=False, sort_keys=True)
        short = full if len(full) <= 60 else full[:57] + "\u2026"
        chips.append(f'<span class="rl-chip" title="{esc(f"{k}={full}")}">{esc(k)}={esc(short)}</span>')
    return "".join(chips) or '<span class="rl-muted">no parameters</span>'


def _targets_html(out: AttributionOutput, tscores: list[float | None] | None) -> str:
    """The row of target buttons (classes, or output tokens of a causal LM); the first is on."""
    is_lm = out.task == "causal_lm"
    tabs = []
    for t, label in enumerate(out.target_labels):
        ts = tscores[t] if tscores is not None and t < len(tscores) else None
        ts_title = "" if ts is None else f" \u00b7 model score {fmt_num(ts, signed=True)}"
        if is_lm:
            lab = token_html(label)
            tip = f"output token {t + 1}: {str(label)!r}{ts_title}"
            extra = ""
        else:
            lab = esc(label)
            tip = f"class {label} (target {out.targets[t]}){ts_title}"
            extra = "" if ts is None else f' <small class="rl-ts">{esc(fmt_num(ts))}</small>'
        on = t == 0
        tabs.append(
            f'<button type="button" class="rl-tgt{" rl-tok" if is_lm else ""}{" rl-on" if on else ""}" '
            f'role="tab" aria-selected="{"true" if on else "false"}" data-t="{t}" title="{esc(tip)}">'
            f'<span class="rl-lab">{lab}</span>{extra}</button>'
        )
    if not tabs:
        return '<div class="rl-row"><span class="rl-k">targets</span><span class="rl-muted">none</span></div>'
    return (
        f'<div class="rl-row"><span class="rl-k">{"output" if is_lm else "class"}</span>'
        f'<div class="rl-tabs" role="tablist">{"".join(tabs)}</div></div>'
    )


def _text_html(out: AttributionOutput, text: str, row0: list[float | str], scale0: float, tip0: str) -> str:
    """The input text with its elements highlighted for one row of scores (rendered server-side)."""
    parts = []
    for kind, val in _segments(text, out.element_spans, out.n_elements):
        if kind == "gap":
            parts.append(esc(val))
            continue
        i = val if kind == "ghost" else val[0]
        v = row0[i]
        cls, alpha = _sign_alpha(v, scale0)
        tip = "score " + _signed_str(v) + " \u2192 " + tip0
        common = f'data-i="{i}" data-score="{esc(_num_str(v))}" style="--rl-a:{alpha:g}" title="{esc(tip)}"'
        if kind == "ghost":
            el = str(out.elements[i]) if i < len(out.elements) else ""
            label = el if el.strip() else "\u2205"
            parts.append(f'<span class="rl-el rl-ghost {cls}" {common} data-label="{esc(label)}"></span>')
        else:
            _, s, e = val
            parts.append(f'<span class="rl-el {cls}" {common}>{esc(text[s:e])}</span>')
    return "".join(parts) if parts else '<span class="rl-muted">(empty text)</span>'


def _legend_html(out: AttributionOutput, maxs: list[str]) -> str:
    """The colour legend of the first target's row."""
    is_lm, n_t = out.task == "causal_lm", out.n_targets
    cur = token_html(out.target_labels[0]) if (is_lm and n_t) else esc(out.target_labels[0]) if n_t else "\u2014"
    m0 = esc(maxs[0]) if maxs else "\u2014"
    return (
        '<div class="rl-legend">'
        f'<span>input attributions for {"output token" if is_lm else "class"} '
        f'<b class="rl-cur">{cur}</b></span>'
        '<span class="rl-scale" title="colour scale: \u00b1 the largest |score| of the row shown">'
        f'<span class="rl-muted">\u2212<b class="rl-max">{m0}</b></span><i class="rl-grad"></i>'
        f'<span class="rl-muted">+<b class="rl-max">{m0}</b></span></span>'
        "</div>"
    )


def _block(out: AttributionOutput, b: int) -> tuple[str, dict]:
    """HTML of one output's block and the data its script needs."""
    text = "" if out.text is None else str(out.text)
    n_el, n_t = out.n_elements, out.n_targets
    scores = np.asarray(out.scores, dtype=np.float32).reshape(n_t, n_el)
    rows = [[_cell(x) for x in r] for r in scores]
    scales = [_row_scale(r) for r in rows]
    tips = [_target_tip(out, t) for t in range(n_t)]
    tscores = None if out.target_scores is None else [
        to_float(x) for x in np.asarray(out.target_scores, dtype=np.float64).reshape(-1)
    ]
    is_lm = out.task == "causal_lm"
    row0: list[float | str] = rows[0] if rows else ["NaN"] * n_el
    body = _text_html(out, text, row0, scales[0] if scales else 0.0, tips[0] if tips else "")
    maxs = [fmt_num(s) for s in scales]
    what = ("output token" if n_t == 1 else "output tokens") if is_lm else ("class" if n_t == 1 else "classes")
    meta = (
        f'{esc(_TASK_NAMES.get(out.task, out.task))} \u00b7 {esc(out.granularity)} \u00b7 '
        f'{n_el} element{"s" if n_el != 1 else ""} \u00b7 {n_t} {what}'
    )
    html = (
        f'<section class="rl-block rl-{"lm" if is_lm else "cls"}" data-b="{b}" data-t="0">'
        '<header class="rl-head">'
        f'<span class="rl-method">{esc(out.method)}</span><span class="rl-meta">{meta}</span>'
        f'<span class="rl-params">{_params_html(out.params)}</span>'
        "</header>"
        f"{_targets_html(out, tscores)}{_legend_html(out, maxs)}"
        f'<div class="rl-row rl-in"><span class="rl-k">input</span><div class="rl-text">{body}</div></div>'
        "</section>"
    )
    data = {
        "method": str(out.method),
        "task": str(out.task),
        "granularity": str(out.granularity),
        "params": _jsonable(out.params),
        "elements": [str(e) for e in out.elements],
        "targets": [int(t) for t in out.targets],
        "target_labels": [str(t) for t in out.target_labels],
        "target_scores": None if tscores is None else [_jsonable(x) for x in tscores],
        "scores": rows,
        "scales": scales,
        "maxs": maxs,
        "tips": tips,
    }
    return html, data


# --------------------------------------------------------------------------------------
# page / fragment
# --------------------------------------------------------------------------------------

_CSS = (
    ".rl-attr{" + PALETTE_LIGHT + ";--rl-pos:34,197,94;--rl-neg:239,68,68;"
    "color:var(--fg);font:14px/1.45 system-ui,-apple-system,\"Segoe UI\",Roboto,\"DejaVu Sans\",sans-serif}\n"
    "@media (prefers-color-scheme:dark){.rl-attr{" + PALETTE_DARK + ";--rl-pos:22,163,74;--rl-neg:220,38,38}}\n"
) + """.rl-attr *{box-sizing:border-box}
.rl-attr.rl-page{min-height:100vh;background:var(--bg)}
.rl-attr .rl-wrap{max-width:1100px;margin:0 auto;padding:20px 16px 60px}
.rl-attr h1{font-size:22px;margin:0 0 4px}
.rl-attr .rl-sub{color:var(--muted);font-size:12px;margin-bottom:12px}
.rl-attr .rl-block{background:var(--card);border:1px solid var(--line);border-left:4px solid var(--muted);
border-radius:8px;padding:12px 14px;margin:0 0 12px;text-align:left}
.rl-attr .rl-head{display:flex;align-items:baseline;gap:10px;flex-wrap:wrap;margin-bottom:8px}
.rl-attr .rl-method{font-weight:600;font-size:16px}
.rl-attr .rl-meta,.rl-attr .rl-muted{color:var(--muted);font-size:12px}
.rl-attr .rl-params{display:flex;flex-wrap:wrap;gap:4px}
.rl-attr .rl-chip{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;padding:1px 6px;
border-radius:10px;background:var(--chip);white-space:pre}
.rl-attr .rl-row{display:flex;gap:8px;align-items:baseline;margin:6px 0}
.rl-attr .rl-k{width:56px;flex:none;font-size:11px;color:var(--muted);text-transform:uppercase;letter-spacing:.03em}
.rl-attr .rl-tabs{display:flex;flex-wrap:wrap;gap:4px}
.rl-attr button.rl-tgt{margin:0;padding:3px 10px;border:1px solid var(--line);border-radius:14px;background:var(--card);
color:var(--fg);font:inherit;font-size:13px;cursor:pointer;line-height:1.4}
.rl-attr button.rl-tgt:hover{border-color:var(--muted)}
.rl-attr button.rl-tgt.rl-on{background:var(--fg);color:var(--card);border-color:var(--fg)}
.rl-attr button.rl-tgt.rl-on .ws,.rl-attr button.rl-tgt.rl-on .rl-ts{color:inherit}
.rl-attr button.rl-tok{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;padding:2px 7px;
border-radius:4px;white-space:pre}
.rl-attr .rl-ts{color:var(--muted);font-size:11px}
.rl-attr .ws{color:var(--muted);opacity:.8}
.rl-attr .rl-legend{display:flex;gap:14px;align-items:center;flex-wrap:wrap;font-size:12px;margin:8px 0 4px}
.rl-attr .rl-cur{white-space:pre}.rl-attr .rl-lm .rl-cur{font-family:ui-monospace,"DejaVu Sans Mono",monospace}
.rl-attr .rl-scale{display:inline-flex;gap:6px;align-items:center}
.rl-attr .rl-grad{display:inline-block;width:120px;height:10px;border-radius:5px;border:1px solid var(--line);
background:linear-gradient(to right,rgba(var(--rl-neg),.8),rgba(var(--rl-neg),0) 50%,rgba(var(--rl-pos),0) 50%,rgba(var(--rl-pos),.8))}
.rl-attr .rl-text{flex:1;min-width:0;white-space:pre-wrap;overflow-wrap:anywhere;font-size:15px;line-height:1.9;
padding:8px 10px;background:var(--bg);border-radius:6px}
.rl-attr .rl-el{border-radius:3px;padding:2px 0;-webkit-box-decoration-break:clone;box-decoration-break:clone;
cursor:default}
.rl-attr .rl-el.rl-pos{background:rgba(var(--rl-pos),var(--rl-a,0))}
.rl-attr .rl-el.rl-neg{background:rgba(var(--rl-neg),var(--rl-a,0))}
.rl-attr .rl-el.rl-nan{background:repeating-linear-gradient(45deg,transparent 0 3px,rgba(127,127,127,.35) 3px 5px)}
.rl-attr .rl-el:hover{outline:1px solid var(--fg)}
.rl-attr .rl-ghost::before{content:attr(data-label);font-family:ui-monospace,"DejaVu Sans Mono",monospace;
font-size:11px;padding:0 3px;border:1px dashed var(--muted);border-radius:3px}
.rl-attr .rl-empty{padding:30px;text-align:center;color:var(--muted);background:var(--card);
border:1px dashed var(--line);border-radius:8px}
"""

_JS = """
(function(){
  var root=document.getElementById(%(rid)s)||(document.currentScript&&document.currentScript.parentNode);
  if(!root||root.getAttribute('data-rl-ready')){return;}
  var node=root.querySelector('script.rl-data'), data;
  try{data=JSON.parse(node.textContent);}catch(e){return;}
  root.setAttribute('data-rl-ready','1');
  var MAXA=%(maxa)s, KINDS=['rl-pos','rl-neg','rl-zero','rl-nan'];
  function each(list,f){Array.prototype.forEach.call(list,f);}
  function sign(v){if(typeof v==='number'){return v>0?1:(v<0?-1:0);}return v==='+inf'?1:(v==='-inf'?-1:NaN);}
  function signed(v){return (typeof v==='number'&&v>0?'+':'')+String(v);}
  each(root.querySelectorAll('section.rl-block'),function(b){
    var d=data[+b.getAttribute('data-b')];
    if(!d){return;}
    var els=b.querySelectorAll('.rl-el'), tabs=b.querySelectorAll('button.rl-tgt');
    var cur=b.querySelector('.rl-cur'), mx=b.querySelectorAll('.rl-max');
    function show(t){
      var row=d.scores[t]||[], scale=d.scales[t]||0, tip=d.tips[t]||'';
      each(els,function(el){
        var v=row[+el.getAttribute('data-i')], s=sign(v), a=0, k;
        if(v===undefined){v='NaN';s=NaN;}
        if(isNaN(s)){k='rl-nan';}
        else{
          k=s>0?'rl-pos':(s<0?'rl-neg':'rl-zero');
          a=typeof v==='number'?(scale>0?Math.min(1,Math.abs(v)/scale):0):1;
          a=Math.round(a*MAXA*1000)/1000;
        }
        KINDS.forEach(function(c){el.classList.toggle(c,c===k);});
        el.style.setProperty('--rl-a',String(a));
        el.setAttribute('data-score',String(v));
        el.title='score '+signed(v)+' \\u2192 '+tip;
      });
      each(tabs,function(x){
        var on=+x.getAttribute('data-t')===t;
        x.classList.toggle('rl-on',on); x.setAttribute('aria-selected',on?'true':'false');
        if(on&&cur){
          var lab=x.querySelector('.rl-lab');
          while(cur.firstChild){cur.removeChild(cur.firstChild);}
          each(lab.childNodes,function(n){cur.appendChild(n.cloneNode(true));});
        }
      });
      each(mx,function(x){x.textContent=d.maxs[t]||'\\u2014';});
      b.setAttribute('data-t',String(t));
    }
    each(tabs,function(x){x.addEventListener('click',function(){show(+x.getAttribute('data-t'));});});
    show(+b.getAttribute('data-t')||0);
  });
})();
"""


def attribution_html(
    outputs: list[AttributionOutput] | AttributionOutput,
    *,
    standalone: bool = True,
    title: str = "raylens attributions",
) -> str:
    """HTML view of attribution outputs: one block per output (a gallery), in order.

    Args:
        outputs: the :class:`~raylens.attributions.output.AttributionOutput` to show (a single
            one is accepted too).
        standalone: ``True``: a complete offline HTML page (``<!DOCTYPE html>``, CSP, title);
            ``False``: a fragment for a notebook output cell (scoped CSS, one random id).
        title: page title and heading (standalone only).

    Returns:
        The HTML text.
    """
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    outputs = list(outputs)
    rid = "rl-" + uuid.uuid4().hex[:12]
    blocks, data = [], []
    for b, out in enumerate(outputs):
        h, d = _block(out, b)
        blocks.append(h)
        data.append(d)
    body = "".join(blocks) if blocks else '<div class="rl-empty">No attribution outputs to show.</div>'
    js = _JS % {"rid": json.dumps(rid), "maxa": json.dumps(MAX_ALPHA)}
    inner = (
        f'<script type="application/json" class="rl-data">{json_for_script(data)}</script>'
        f"<script>{js}</script>"
    )
    if not standalone:
        return f'<div class="rl-attr" id="{rid}"><style>{_CSS}</style>{body}{inner}</div>'
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n = len(outputs)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>body{{margin:0}}\n{_CSS}</style>\n</head>\n<body>\n"
        f'<div class="rl-attr rl-page" id="{rid}"><div class="rl-wrap">\n'
        f"<h1>{esc(title)}</h1>\n"
        f'<div class="rl-sub">generated by raylens \u00b7 {esc(generated)} \u00b7 {n} attribution '
        f'output{"s" if n != 1 else ""} \u00b7 click a class or an output token to show its attributions</div>\n'
        f'<main class="rl-gallery">{body}</main>\n'
        f"</div>{inner}</div>\n"
        "</body>\n</html>\n"
    )


def save_attribution_html(
    outputs: list[AttributionOutput] | AttributionOutput,
    path: str | os.PathLike,
    *,
    title: str = "raylens attributions",
) -> pathlib.Path:
    """Write :func:`attribution_html` (standalone) to ``path`` (UTF-8; parents created)."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(attribution_html(outputs, standalone=True, title=title), encoding="utf-8", newline="\n")
    return p
