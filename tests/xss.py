"""Hostile text for the HTML outputs and the browser check that it stayed inert (no tests here).

Any job's HTML (the concept report, the attribution gallery, the attribution view, a third
job's report) is checked the same way:

1. build it with `PAYLOADS` in every place that corpus, model or LLM text can reach
   (`hostile_texts` mixes them into corpus-like documents);
2. ``assert_escaped(html)``: no payload appears verbatim in the file (a fast check, no browser);
3. with one headless Chromium per test module (`browser()`), ``check_inert(browser, path,
   visible=[...])`` opens the file with ``window.alert``/``confirm``/``prompt``/``print`` hooked
   before any script runs, fires mouse, focus, load, error, toggle and click events on every
   element, and asserts: no hook was called, no element carries an ``on*`` attribute, no element
   of a kind only a payload could add (``iframe``, ``img``, ``svg``, ``form``, ``textarea``,
   ``meta`` refresh, ...), no ``javascript:`` URL, no executable ``<script>`` holding payload
   code and every JSON ``<script>`` still parses, no bidi control character in the rendered
   text, and each ``visible`` string shows as text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from raylens.viz.markup import BIDI_CONTROLS

#: Each payload calls ``alert('xss-...')`` (or changes the page) if it is ever parsed as markup.
PAYLOADS = [
    "<script>alert('xss-script')</script>",
    "<img src=x onerror=alert('xss-img')>",
    "<svg onload=alert('xss-svg')><circle r=5></svg>",
    "<a href=\"javascript:alert('xss-js')\">click me</a>",
    "<a href=' JaVaScRiPt:alert(`xss-js2`)'>x</a>",
    "</textarea><script>alert('xss-textarea')</script><textarea>",
    "</style><script>alert('xss-style')</script><style>",
    "</script><script>alert('xss-endscript')</script>",
    "<iframe srcdoc=\"<script>parent.alert('xss-srcdoc')</script>\"></iframe>",
    "\" onmouseover=\"alert('xss-dq')\" data-x=\"",
    "' onfocus='alert(`xss-sq`)' autofocus tabindex='1",
    "<details open ontoggle=alert('xss-details')><summary>s</summary></details>",
    "<body onload=alert('xss-body')>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert('xss-math')></style></mglyph></table></mtext></math>",
    "<meta http-equiv=refresh content=\"0;url=javascript:alert('xss-meta')\">",
    "<base href=\"javascript:alert('xss-base')//\">",
    "<form action=\"javascript:alert('xss-form')\"><button>go</button></form>",
    "<!-- unclosed comment",
    "]]> <![CDATA[ x",
    "&lt;script&gt;alert('xss-entity')&lt;/script&gt;",
    "{{constructor.constructor('alert(`xss-template`)')()}}",
    "evil\u202egnp.exe\u202c and \u2067isolated\u2069 and \u200fmark",
]

#: Elements the raylens pages never make: one of them in the DOM means a payload was parsed.
FORBIDDEN = ("iframe, frame, frameset, img, svg, math, object, embed, base, form, textarea, video, audio, "
             "link, marquee, meta[http-equiv=refresh], meta[http-equiv=Refresh]")


def hostile_texts(n: int) -> list[str]:
    """``n`` corpus-like documents, each a sentence with two payloads in it."""
    k = len(PAYLOADS)
    return [f"Doc {i}: a film {PAYLOADS[i % k]} with {PAYLOADS[(i + 7) % k]} inside." for i in range(n)]


def visible_form(text: str) -> str:
    """What ``text`` looks like rendered by `raylens.viz.markup.esc` (bidi controls made visible)."""
    return text.translate({c: f"\u2039U+{c:04X}\u203a" for c in BIDI_CONTROLS})


def assert_escaped(html: str) -> None:
    """No payload holding a tag appears verbatim in ``html``, and no bidi control character at
    all. (Quote payloads may appear verbatim inside JSON ``<script>`` blocks, where they are
    harmless; the browser check catches one that breaks out of an attribute.)"""
    raw = [p for p in PAYLOADS if "<" in p and p in html]
    assert not raw, f"payloads found unescaped: {raw}"
    bidi = sorted({f"U+{ord(c):04X}" for c in html if ord(c) in BIDI_CONTROLS})
    assert not bidi, f"bidi control characters left in the page: {bidi}"


HOOK_JS = """
window.__xss = [];
['alert', 'confirm', 'prompt', 'print'].forEach(function (n) {
  window[n] = function (m) { (window.top.__xss || window.__xss).push(n + ':' + String(m)); };
});
"""

CHECK_JS = """(function(visible){
  var all = Array.prototype.slice.call(document.querySelectorAll('*'));
  ['mouseover','mouseenter','focus','focusin','load','error','toggle','animationstart','click'].forEach(function(t){
    all.forEach(function(el){ try { el.dispatchEvent(new Event(t, {bubbles: false})); } catch (e) {} });
  });
  var on = [], js = [], bad = [];
  all.forEach(function(el){
    Array.prototype.forEach.call(el.attributes, function(a){
      var v = (a.value || '').replace(/[\\s\\u0000-\\u001f]/g, '').toLowerCase();
      if (a.name.toLowerCase().indexOf('on') === 0) { on.push(el.tagName + '[' + a.name + ']'); }
      if (/^(href|src|action|formaction|xlink:href|data|srcdoc)$/i.test(a.name) && v.indexOf('javascript:') === 0) {
        js.push(el.tagName + '[' + a.name + ']');
      }
    });
  });
  var scripts = Array.prototype.map.call(document.querySelectorAll('script'), function(s){
    var json = (s.type || '').toLowerCase() === 'application/json', ok = true;
    if (json) { try { JSON.parse(s.textContent); } catch (e) { ok = false; } }
    return {json: json, ok: ok, payload: !json && /xss-|alert\\(/.test(s.textContent)};
  });
  var clone = document.body.cloneNode(true);
  Array.prototype.forEach.call(clone.querySelectorAll('script, style'), function(s){ s.remove(); });
  var text = clone.textContent;
  var shown = document.body.innerText;
  return {
    on: on, js: js, forbidden: Array.prototype.map.call(document.querySelectorAll(%s), function(e){ return e.outerHTML.slice(0, 120); }),
    scripts: scripts, missing: visible.filter(function(v){ return text.indexOf(v) === -1; }),
    bidi: /[\\u061c\\u200e\\u200f\\u202a-\\u202e\\u2066-\\u2069]/.test(shown),
    location: String(location.href), title: document.title
  };
})(%s)"""


def browser(tmp_path_factory):
    """A headless Chromium (`tests.test_attribution_view.Chromium`) for one test module, or a
    skip when none is installed. Close it with ``.close()``."""
    import pytest

    from tests.test_attribution_view import Chromium, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not found (Debian package chromium; or set RAYLENS_CHROMIUM)")
    profile = tmp_path_factory.mktemp("xss-profile")
    return Chromium(binary, str(profile))


def check_inert(chromium, path, visible: Sequence[str] = (), own: dict[str, int] | None = None) -> dict:
    """Open ``path`` in a new tab of ``chromium`` with the alert hooks, fire every event on every
    element, and assert the page stayed inert (see the module docstring). ``own``: elements of
    :data:`FORBIDDEN` the page draws itself (e.g. ``{"svg": 3}`` for its charts), checked by count
    (a payload adding one more fails). Returns what was seen."""
    from tests.test_attribution_view import Page

    own = own or {}
    forbidden = ", ".join(t for t in (x.strip() for x in FORBIDDEN.split(",")) if t not in own)
    page = Page(chromium)
    page.send("Page.addScriptToEvaluateOnNewDocument", {"source": HOOK_JS})
    url = path.as_uri()
    page.goto(url)
    counts = {tag: page.eval(f"document.querySelectorAll({json.dumps(tag)}).length") for tag in own}
    assert counts == own, f"elements the page draws itself, by count: {counts} (expected {own})"
    seen = page.eval(CHECK_JS % (json.dumps(forbidden), json.dumps([visible_form(v) for v in visible])))
    time.sleep(0.3)  # anything scheduled by a handler (timers, iframe loads) gets its turn
    seen["calls"] = page.eval("window.__xss")
    assert seen["calls"] == [], f"a payload ran: {seen['calls']}"
    assert seen["on"] == [], f"event-handler attributes in the DOM: {seen['on'][:10]}"
    assert seen["js"] == [], f"javascript: URLs in the DOM: {seen['js'][:10]}"
    assert seen["forbidden"] == [], f"elements only a payload could add: {seen['forbidden'][:5]}"
    assert all(s["ok"] and not s["payload"] for s in seen["scripts"]), seen["scripts"]
    assert not seen["bidi"], "bidi control characters in the rendered text"
    assert seen["missing"] == [], f"not shown as text: {seen['missing'][:3]}"
    assert page.eval("location.href").split("#")[0] == url, "the page navigated away"
    return seen
