"""The network job's report: one self-contained HTML page on where in the network a causal LM's
predictions form and which attention heads its behaviour needs.

Sections, in order:

* **One document, layer by layer**: a layers x positions grid per lens (logit lens,
  nostalgebraist 2020; tuned lens, Belrose et al. 2023): each cell is the lens' top-1 token at
  that layer and position, coloured by its KL divergence to the model's final distribution
  (nats; darker is further) or by whether it agrees with the final top-1 token (a switch);
  the last layer is on top, the input token of each position and the token that actually
  follows it head the columns. Tooltips give the KL and the ranks of the final top-1 and of the
  next token.
* **Over the corpus**: per layer, the median KL to the final distribution with its
  interquartile band, the top-1 agreement with the final prediction and the mean rank of the
  next token, one line per lens (inline SVG), and the numbers in a table.
* **Attention heads**: a layers x heads map of the roles causal head gating gives each head
  (Nam et al., NeurIPS 2025: facilitating, interfering, irrelevant), the majority role over the
  seeds, its opacity the share of seeds that agree.

Offline and escaped like the other views (inline CSS and JS, the shared Content-Security-Policy,
every text through :func:`~raylens.viz.markup.esc`). Standard library only.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from raylens.viz.markup import CSP, PALETTE_DARK, PALETTE_LIGHT, esc, finite, fmt_num, to_float, token_html

__all__ = ["ROLE_COLOURS", "ROLE_MARKS", "render_network_report"]

#: the colour of each head role (facilitating, interfering, irrelevant) in the head map
ROLE_COLOURS = {"facilitating": "#16a34a", "interfering": "#dc2626", "irrelevant": "#9ca3af"}
#: the mark inside each head's cell (the colour says the same, for colour-blind readers)
ROLE_MARKS = {"facilitating": "+", "interfering": "\u2212", "irrelevant": "\u00b7"}
#: the colour of each lens' curve (others cycle through the rest)
LENS_COLOURS = ("#2563eb", "#ea580c", "#7c3aed", "#0891b2")

_CSS = """
:root{%s}
@media (prefers-color-scheme: dark){:root{%s}}
body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:var(--fg);background:var(--bg)}
.n-wrap{max-width:1280px;margin:0 auto;padding:18px 22px 60px}
h1{font-size:22px;margin:4px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid var(--line);
padding-bottom:4px}h3{font-size:15px;margin:14px 0 6px}.n-sub{color:var(--muted);font-size:12.5px}
table.n-kv td{padding:1px 10px 1px 0;font-size:13px}table.n-kv td:first-child{color:var(--muted)}
.n-scroll{overflow-x:auto;background:var(--card);border:1px solid var(--line);padding:6px}
table.n-grid{border-collapse:collapse;font:12px/1.2 ui-monospace,SFMono-Regular,Menlo,monospace}
table.n-grid th,table.n-grid td{border:1px solid var(--line);padding:2px 4px;white-space:nowrap;max-width:7em;
overflow:hidden;text-overflow:ellipsis}table.n-grid th{background:var(--chip);font-weight:600}
table.n-grid th.n-l{text-align:right;color:var(--muted)}
.n-grid.by-kl td.c{background:var(--kl)}.n-grid.by-agree td.c{background:var(--ag)}
td.c.next{text-decoration:underline}.ws{color:var(--muted)}
.n-btn{border:1px solid var(--line);background:var(--card);color:var(--fg);border-radius:14px;padding:3px 12px;
margin:0 6px 6px 0;cursor:pointer;font:inherit}.n-btn.on{background:#1d4ed8;border-color:#1d4ed8;color:#fff}
.n-panel{display:none}.n-panel.on{display:block}
.n-charts{display:flex;flex-wrap:wrap;gap:14px}.n-chart{background:var(--card);border:1px solid var(--line);padding:6px}
.n-chart text{fill:var(--fg);font-size:11px}.n-chart .ax{stroke:var(--muted);stroke-width:1}
table.n-t{border-collapse:collapse;font-size:12.5px;background:var(--card)}
table.n-t th,table.n-t td{border:1px solid var(--line);padding:2px 8px;text-align:right}
table.n-t th{background:var(--chip)}
table.n-heads{border-collapse:collapse;font-size:11px}table.n-heads td{width:18px;height:18px;
border:1px solid var(--card);text-align:center;color:#fff;padding:0}
table.n-heads th{font-weight:400;color:var(--muted);padding:0 4px}
.n-key span{display:inline-block;width:12px;height:12px;margin:0 4px -2px 12px;border-radius:2px}
"""

_JS = """
(function(){
  document.querySelectorAll('[data-group]').forEach(function(b){
    b.addEventListener('click', function(){
      var g = b.dataset.group;
      document.querySelectorAll('[data-group="'+g+'"]').forEach(function(x){x.classList.toggle('on', x===b);});
      document.querySelectorAll('[data-panel-group="'+g+'"]').forEach(function(p){
        p.classList.toggle('on', p.dataset.panel===b.dataset.value);});
      if (g === 'colour') document.querySelectorAll('.n-grid').forEach(function(t){
        t.classList.toggle('by-kl', b.dataset.value==='kl');
        t.classList.toggle('by-agree', b.dataset.value==='agree');});
    });
  });
})();
"""


def _kv(summary: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in summary.items())
    return f"<table class=n-kv>{rows}</table>"


def _tok(token_strings: Mapping[int, str], token_id: Any) -> tuple[str, str]:
    """(chip HTML, tooltip text) of a token id; ``—`` when there is none."""
    if token_id is None:
        return "\u2014", "none"
    text = token_strings.get(int(token_id), f"<{int(token_id)}>")
    return token_html(text), repr(text)


def _kl_colour(kl: float | None, scale: float) -> str:
    if not finite(kl):
        return "transparent"
    a = min(1.0, max(0.0, kl / scale)) if scale > 0 else 0.0
    return f"rgba(37,99,235,{0.08 + 0.82 * a:.3f})"


def _layer_rows(cells: Mapping[tuple[int, int], Mapping[str, Any]], layers: Sequence[int], columns: Sequence[int],
                cell: Callable[[int, int, Mapping[str, Any]], str], head_class: str) -> list[str]:
    """``<tr>`` rows of a layers x columns table: the layer in a header cell, then ``cell(layer,
    column, row)`` for each column (an empty ``<td>`` where ``cells`` has no row)."""
    cls = f" class={head_class}" if head_class else ""
    return [f"<tr><th{cls}>{la}</th>" + "".join(cell(la, c, cells[(la, c)]) if (la, c) in cells else "<td></td>"
                                               for c in columns) + "</tr>" for la in layers]


def _grid_html(rows: Sequence[Mapping[str, Any]], token_strings: Mapping[int, str], scale: float,
               doc_id: Any) -> str:
    """One lens' layers x positions table (last layer on top)."""
    cells = {(int(r["layer"]), int(r["position"])): r for r in rows}
    layers = sorted({k[0] for k in cells}, reverse=True)
    positions = sorted({k[1] for k in cells})
    first = {p: next(cells[(la, p)] for la in layers if (la, p) in cells) for p in positions}
    head_in = "".join(f"<th title='{esc(_tok(token_strings, first[p]['token_id'])[1])}'>"
                      f"{_tok(token_strings, first[p]['token_id'])[0]}</th>" for p in positions)
    head_next = "".join(f"<th title='{esc(_tok(token_strings, first[p]['next_token_id'])[1])}'>"
                        f"{_tok(token_strings, first[p]['next_token_id'])[0]}</th>" for p in positions)

    def cell(la: int, p: int, r: Mapping[str, Any]) -> str:
        chip, tip = _tok(token_strings, r["top1_token_id"])
        kl = to_float(r["kl_to_final"])
        agree = "#86efac" if r["top1_agrees"] else "#fecaca"
        nxt = " next" if r["next_token_id"] is not None and r["top1_token_id"] == r["next_token_id"] else ""
        title = (f"layer {la}, position {p}: top-1 {tip}; KL to final {fmt_num(kl)} nats; "
                 f"{'agrees' if r['top1_agrees'] else 'differs from'} the final top-1; rank of the final top-1 "
                 f"{r['rank_final']}; rank of the next token {r['rank_next']}")
        return (f"<td class='c{nxt}' style='--kl:{_kl_colour(kl, scale)};--ag:{agree}' "
                f"title='{esc(title)}'>{chip}</td>")

    body = _layer_rows(cells, layers, positions, cell, "n-l")
    return (f"<div class=n-scroll><table class='n-grid by-kl' data-doc-id='{esc(doc_id)}'>"
            f"<tr><th class=n-l>input</th>{head_in}</tr>"
            f"<tr><th class=n-l>next</th>{head_next}</tr>{''.join(body)}</table></div>")


def _document_html(rows: Sequence[Mapping[str, Any]], token_strings: Mapping[int, str], doc_id: Any) -> str:
    if not rows:
        return "<p class=n-sub>No lens rows for this document.</p>"
    lenses = list(dict.fromkeys(r["lens"] for r in rows))
    kls = sorted(k for k in (to_float(r["kl_to_final"]) for r in rows) if finite(k))
    scale = kls[int(0.95 * (len(kls) - 1))] if kls else 1.0
    tabs = "".join(f"<button class='n-btn{' on' if i == 0 else ''}' data-group=lens data-value='{esc(n)}'>"
                   f"{esc(n)} lens</button>" for i, n in enumerate(lenses))
    colour = ("<button class='n-btn on' data-group=colour data-value=kl>colour: KL to final</button>"
              "<button class=n-btn data-group=colour data-value=agree>colour: agrees with final top-1</button>")
    panels = "".join(
        f"<div class='n-panel{' on' if i == 0 else ''}' data-panel-group=lens data-panel='{esc(n)}'>"
        + _grid_html([r for r in rows if r["lens"] == n], token_strings, scale, doc_id) + "</div>"
        for i, n in enumerate(lenses))
    return (f"<p class=n-sub>Document {esc(doc_id)}. Each cell: the lens' most likely next token at that layer "
            f"(rows, last layer on top) and position (columns). Blue: KL divergence to the model's final "
            f"distribution, darkest at {esc(fmt_num(scale))} nats (95th percentile) or more; green / red: the top-1 "
            f"token agrees / differs with the final one. Underlined: the top-1 token is the actual next token.</p>"
            f"<div>{tabs}</div><div>{colour}</div>{panels}")


def _scale(values: Sequence[float], log: bool) -> tuple[float, float]:
    vs = [math.log10(max(v, 1e-9)) if log else v for v in values if finite(v)]
    if not vs:
        return 0.0, 1.0
    lo, hi = min(vs + [0.0]) if not log else min(vs), max(vs)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _chart(curves: Sequence[Mapping[str, Any]], key: str, title: str, *, band: tuple[str, str] | None = None,
           log: bool = False, width: int = 400, height: int = 230) -> str:
    """An inline SVG line chart of ``key`` per layer, one line per lens (optional band)."""
    lenses = list(dict.fromkeys(r["lens"] for r in curves))
    layers = sorted({int(r["layer"]) for r in curves}) or [0]
    values = [to_float(r.get(k)) for r in curves for k in ((key,) + (band or ()))]
    lo, hi = _scale([v for v in values if v is not None], log)
    x0, x1, y0, y1 = 62, width - 10, height - 34, 22
    lmin, lmax = layers[0], max(layers[-1], layers[0] + 1)

    def x(layer: float) -> float:
        return x0 + (layer - lmin) / (lmax - lmin) * (x1 - x0)

    def y(v: float) -> float:
        v = math.log10(max(v, 1e-9)) if log else v
        return y0 - (v - lo) / (hi - lo) * (y0 - y1)

    parts = [f"<line class=ax x1={x0} y1={y0} x2={x1} y2={y0} />", f"<line class=ax x1={x0} y1={y0} x2={x0} y2={y1} />",
             f"<text x={x0} y=14>{esc(title)}</text>",
             f"<text x={(x0 + x1) / 2:.0f} y={height - 6} text-anchor=middle>layer</text>",
             f"<text x={x0 - 4} y={y0} text-anchor=end>{esc(fmt_num(10 ** lo if log else lo))}</text>",
             f"<text x={x0 - 4} y={y1 + 8} text-anchor=end>{esc(fmt_num(10 ** hi if log else hi))}</text>",
             f"<text x={x0} y={y0 + 14} text-anchor=middle>{lmin}</text>",
             f"<text x={x1} y={y0 + 14} text-anchor=middle>{layers[-1]}</text>"]
    for i, name in enumerate(lenses):
        colour = LENS_COLOURS[i % len(LENS_COLOURS)]
        mine = sorted((r for r in curves if r["lens"] == name), key=lambda r: r["layer"])
        pts = [(x(r["layer"]), y(v)) for r in mine if finite(v := to_float(r.get(key)))]
        if band:
            lo_pts = [(x(r["layer"]), y(to_float(r[band[0]]))) for r in mine if finite(to_float(r.get(band[0])))]
            hi_pts = [(x(r["layer"]), y(to_float(r[band[1]]))) for r in mine if finite(to_float(r.get(band[1])))]
            poly = " ".join(f"{a:.1f},{b:.1f}" for a, b in lo_pts + hi_pts[::-1])
            parts.append(f"<polygon points='{poly}' fill='{colour}' fill-opacity=0.15 stroke=none />")
        line = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        parts.append(f"<polyline points='{line}' fill=none stroke='{colour}' stroke-width=2 data-lens='{esc(name)}' />")
        parts.append(f"<text x={x1 - 4} y={y1 + 14 + 13 * i} text-anchor=end style='fill:{colour}'>{esc(name)}</text>")
    return (f"<svg class=n-chart width={width} height={height} viewBox='0 0 {width} {height}' role=img "
            f"aria-label='{esc(title)}'>{''.join(parts)}</svg>")


#: the lens_curves columns shown in the corpus table: (column, heading)
CURVE_COLUMNS = (("n_tokens", "tokens"), ("kl_q10", "KL q10"), ("kl_q25", "KL q25"), ("kl_q50", "KL median"),
                 ("kl_q75", "KL q75"), ("kl_q90", "KL q90"), ("kl_mean", "KL mean"),
                 ("top1_agreement", "top-1 agreement"),
                 ("mean_rank_final", "mean rank of final top-1"), ("mean_rank_next", "mean rank of next token"))


def _curves_html(curves: Sequence[Mapping[str, Any]]) -> str:
    if not curves:
        return "<p class=n-sub>No lens rows.</p>"
    charts = (_chart(curves, "kl_q50", "KL to final (nats): median, q25-q75", band=("kl_q25", "kl_q75"))
              + _chart(curves, "top1_agreement", "top-1 agreement with the final prediction")
              + _chart(curves, "mean_rank_next", "mean rank of the next token (log)", log=True))
    cols = [(k, h) for k, h in CURVE_COLUMNS if any(k in r for r in curves)]
    head = "".join(f"<th>{esc(h)}</th>" for _, h in cols)
    body = "".join(f"<tr><td>{esc(r['lens'])}</td><td>{int(r['layer'])}</td>"
                   + "".join(f"<td>{esc(fmt_num(to_float(r.get(k))))}</td>" for k, _ in cols) + "</tr>"
                   for r in sorted(curves, key=lambda r: (r["lens"], r["layer"])))
    return (f"<div class=n-charts>{charts}</div><details><summary>the numbers per layer</summary>"
            f"<table class=n-t id=n-curves><tr><th>lens</th><th>layer</th>{head}</tr>{body}</table></details>")


def _heads_html(stability: Sequence[Mapping[str, Any]], roles: Sequence[Mapping[str, Any]]) -> str:
    if not stability:
        return "<p class=n-sub>Head gating was not run.</p>"
    cells = {(int(r["layer"]), int(r["head"])): r for r in stability}
    layers = sorted({k[0] for k in cells})
    heads = sorted({k[1] for k in cells})
    seeds: dict[tuple[int, int], list[str]] = {}
    for r in roles:
        seeds.setdefault((int(r["layer"]), int(r["head"])), []).append(f"seed {r['seed']}: {r['role']}")

    def cell(la: int, h: int, r: Mapping[str, Any]) -> str:
        share = to_float(r.get("agreement")) or 0.0
        colour = ROLE_COLOURS.get(str(r["role"]), "#6b7280")
        tip = (f"layer {la}, head {h}: {r['role']} in {share:.0%} of seeds; mean gate when keeping is rewarded "
               f"{fmt_num(to_float(r.get('mean_gate_retain')))}, when removing is "
               f"{fmt_num(to_float(r.get('mean_gate_remove')))}; " + "; ".join(seeds.get((la, h), [])))
        mark = esc(ROLE_MARKS.get(str(r["role"]), "?"))
        return (f"<td class=h data-role='{esc(r['role'])}' style='background:{colour};"
                f"opacity:{0.25 + 0.75 * share:.2f}' title='{esc(tip)}'>{mark}</td>")

    body = _layer_rows(cells, layers, heads, cell, "")
    counts = {role: sum(1 for r in stability if r["role"] == role) for role in ROLE_COLOURS}
    key = "".join(f"<span style='background:{c}'></span>{esc(role)} ({counts[role]})"
                  for role, c in ROLE_COLOURS.items())
    return (f"<p class='n-sub n-key'>Rows: layers; columns: heads. Colour: the majority role over the seeds; "
            f"opacity: the share of seeds that agree. {key}</p>"
            f"<div class=n-scroll><table class=n-heads id=n-heads><tr><th></th>"
            + "".join(f"<th>{h}</th>" for h in heads) + f"</tr>{''.join(body)}</table></div>")


def render_network_report(
    lens_rows: Sequence[Mapping[str, Any]],
    curves: Sequence[Mapping[str, Any]],
    stability: Sequence[Mapping[str, Any]],
    roles: Sequence[Mapping[str, Any]] = (),
    *,
    token_strings: Mapping[int, str],
    doc_id: Any = None,
    title: str = "raylens network report",
    summary: Mapping[str, Any] | None = None,
) -> str:
    """The network report page (standalone HTML).

    Args:
        lens_rows: the lens-table rows of the document shown (`raylens.network.corpus.lens_statistics`:
            ``lens``, ``layer``, ``position``, ``token_id``, ``next_token_id``, ``kl_to_final`` in
            nats, ``top1_token_id``, ``top1_agrees``, ``rank_final``, ``rank_next``).
        curves: `raylens.network.corpus.lens_curves` rows (per lens and layer).
        stability: `raylens.network.corpus.role_stability` rows (``layer``, ``head``, ``role``,
            ``agreement`` in [0, 1], ``mean_gate_retain``, ``mean_gate_remove``).
        roles: `raylens.network.corpus.head_gating_roles` rows (per seed), for the tooltips.
        token_strings: vocabulary string of each token id in ``lens_rows`` (a missing id shows
            as ``<id>``).
        doc_id: the document's id (shown).
        title: the page heading (escaped).
        summary: flat ``name -> value`` pairs shown under the title (escaped).

    Returns:
        The HTML text.
    """
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS % (PALETTE_LIGHT, PALETTE_DARK)}</style>\n</head>\n"
        f"<body><div class=n-wrap>\n<h1>{esc(title)}</h1><div class=n-sub>generated by raylens · {esc(generated)}"
        f"</div>\n{_kv(summary or {})}\n"
        "<h2 id=n-document>One document, layer by layer</h2>"
        f"{_document_html(lens_rows, token_strings, doc_id)}\n"
        "<h2 id=n-corpus>Over the corpus, layer by layer</h2>"
        "<p class=n-sub>Per layer, over every token of the held-out documents: KL divergence of the lens' "
        "distribution to the model's final one (nats), how often its top-1 token is the final top-1, and the mean "
        "rank of the token that actually follows.</p>"
        f"{_curves_html(curves)}\n"
        "<h2 id=n-heads-title>Attention heads: roles from causal head gating</h2>"
        f"{_heads_html(stability, roles)}\n"
        f"</div><script>{_JS}</script>\n</body>\n</html>\n"
    )
