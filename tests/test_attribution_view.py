"""Tests for raylens.viz.attributions: the HTML view of AttributionOutput.

Fast tests parse the generated HTML with the standard library. The slow test opens a page in
headless Chromium, driven over the Chrome DevTools Protocol on a pipe
(``--remote-debugging-pipe``: NUL-separated JSON on file descriptors 3 and 4), standard
library only: it takes screenshots and clicks the class / output-token buttons with real
mouse events.
"""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import pathlib
import queue
import re
import shutil
import struct
import subprocess
import threading
import time
from html import unescape
from html.parser import HTMLParser

import numpy as np
import pytest

from raylens.attributions.output import AttributionOutput
from raylens.viz.attributions import MAX_ALPHA, attribution_html, save_attribution_html

EVIL = "<script>alert(1)</script>"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# --------------------------------------------------------------------------------------
# fixtures: outputs built by hand
# --------------------------------------------------------------------------------------


def _words(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def make_output(text: str, scores, labels, *, task="sequence_classification", spans=None, elements=None,
                method="IntegratedGradients", params=None, target_scores=None, granularity="word"):
    spans = _words(text) if spans is None else spans
    elements = [text[s:e] for s, e in spans] if elements is None else elements
    n = len(elements)
    return AttributionOutput(
        text=text, task=task, granularity=granularity, elements=elements, element_spans=spans,
        element_tokens=[[i + 1] for i in range(n)], input_ids=list(range(n + 2)),
        scores=np.asarray(scores, dtype=np.float32), targets=list(range(len(labels))),
        target_labels=labels, method=method, params={"n_steps": 50} if params is None else params,
        target_scores=target_scores,
    )


CLS_TEXT = "I really  loved this movie,\nbut the ending was bad & <weird>."
CLS_SCORES = [
    [0.1, -0.4, 2.0, 0.0, 0.3, -0.2, 0.05, -0.6, 0.2, -1.0, 0.1, -0.3],  # class 0
    [-0.3, 0.5, -1.5, 0.2, -0.1, 0.4, 0.0, 0.9, -0.2, 3.0, -0.7, 0.6],  # class 1: mostly flipped signs
]
LM_TEXT = "The film was"
LM_SCORES = [[0.5, -0.25, 1.0], [-1.0, 0.5, 0.25], [0.125, 2.0, -0.75]]
LM_LABELS = ["\u0120great", " movie", "!\n"]


def cls_output(**kw):
    return make_output(CLS_TEXT, CLS_SCORES, ["negative", "positive"], target_scores=np.array([0.12, 0.88]), **kw)


def lm_output(**kw):
    return make_output(LM_TEXT, LM_SCORES, LM_LABELS, task="causal_lm", method="Saliency",
                       params={"abs": False}, granularity="word", **kw)


# --------------------------------------------------------------------------------------
# HTML parsing helpers
# --------------------------------------------------------------------------------------


class _Tree(HTMLParser):
    """Tag balance, the text of every .rl-text, every .rl-el, buttons, scripts and styles."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict]] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.texts: list[str] = []  # text content of each .rl-text, in order
        self.els: list[list[dict]] = []  # per .rl-text: {"attrs", "text"} of each .rl-el
        self.buttons: list[dict] = []
        self.blocks: list[dict] = []
        self.scripts: list[tuple[dict, str]] = []
        self.styles: list[str] = []
        self._buf: list[str] | None = None

    def _in(self, cls: str) -> bool:
        return any(cls in (a.get("class") or "").split() for _, a in self.stack)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag in VOID:
            return
        classes = (a.get("class") or "").split()
        if "rl-text" in classes:
            self.texts.append("")
            self.els.append([])
        if "rl-el" in classes:
            assert not self._in("rl-el"), "nested element spans"
            self.els[-1].append({"attrs": a, "text": ""})
        if tag == "button":
            self.buttons.append(a)
        if tag == "section" and "rl-block" in classes:
            self.blocks.append(a)
        if tag in ("script", "style"):
            self._buf = []
        self.stack.append((tag, a))

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in VOID:
            self.errors.append(f"self-closing non-void <{tag}/>")

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {[t for t, _ in self.stack[-3:]]}")
            return
        _, a = self.stack.pop()
        if tag == "script":
            self.scripts.append((a, "".join(self._buf)))
            self._buf = None
        if tag == "style":
            self.styles.append("".join(self._buf))
            self._buf = None

    def handle_data(self, data):
        if self._buf is not None:
            self._buf.append(data)
            return
        if self._in("rl-text"):
            self.texts[-1] += data
        if self._in("rl-el"):
            self.els[-1][-1]["text"] += data


def parse(html: str) -> _Tree:
    t = _Tree()
    t.feed(html)
    t.close()
    assert not t.errors, t.errors
    assert t.stack == [], f"unclosed tags: {[x for x, _ in t.stack]}"
    return t


def _strict_json(s: str):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(s, parse_constant=bad)


def data_of(tree: _Tree) -> list[dict]:
    blobs = [s for a, s in tree.scripts if a.get("type") == "application/json"]
    assert len(blobs) == 1
    return _strict_json(blobs[0])


def _score(s: str) -> float:
    return {"NaN": math.nan, "+inf": math.inf, "-inf": -math.inf}.get(s, None) or float(s)


# --------------------------------------------------------------------------------------
# fast tests
# --------------------------------------------------------------------------------------


def test_script_in_text_elements_labels_is_escaped(tmp_path):
    text = f"before {EVIL} after \u2028 & end"
    spans = [(0, 6), (7, 7 + len(EVIL)), (8 + len(EVIL), 13 + len(EVIL)), (20, 20)]  # last: empty -> label
    elements = ["before", EVIL, "after", EVIL + "\u2029"]
    out = make_output(
        text, [[1.0, -2.0, 0.5, 0.25]], [EVIL], spans=spans, elements=elements,
        method=EVIL, params={EVIL: EVIL, "bad": "</script><!--", "nan": float("nan")},
    )
    lm = make_output(text, [[1.0, -2.0, 0.5, 0.25]], [EVIL], spans=spans, elements=elements, task="causal_lm")
    for standalone in (True, False):
        html = attribution_html([out, lm], standalone=standalone, title=EVIL)
        assert "<script>alert" not in html
        assert "</script><!--" not in html
        # exactly the view's own two <script> elements (JSON data + code)
        assert len(re.findall(r"<script\b", html)) == 2
        assert html.count("</script>") == 2
        tree = parse(html)
        # escaped, so the text round-trips through a parser, and the JSON data too
        assert tree.texts[0] == text
        data = data_of(tree)
        assert data[0]["elements"] == elements
        assert data[0]["target_labels"] == [EVIL]
        assert data[0]["method"] == EVIL
        assert data[0]["params"][EVIL] == EVIL and data[0]["params"]["nan"] == "NaN"
        ghost = [e for e in tree.els[0] if "rl-ghost" in e["attrs"]["class"].split()]
        assert [g["attrs"]["data-label"] for g in ghost] == [EVIL + "\u2029"]
        blob = next(s for a, s in tree.scripts if a.get("type") == "application/json")
        assert "<" not in blob and ">" not in blob and "&" not in blob
        assert "\u2028" not in blob and "\u2029" not in blob


@pytest.mark.parametrize(
    "text,spans",
    [
        (CLS_TEXT, None),
        ("  lead\t\ttabs\n\n  and trailing   ", None),
        ("caf\u00e9 \U0001f600 na\u00efve <a href='x'>&amp;</a>", None),
        ("subwordtokens", [(0, 3), (3, 7), (7, 13)]),  # adjacent, no gaps
        ("abc def ghi", [(8, 11), (0, 3), (4, 7)]),  # out of order
        ("abc def ghi", [(0, 5), (4, 7), (8, 11)]),  # overlap: second clipped
        ("abc def ghi", [(0, 3), (0, 3), (4, 7)]),  # duplicate span: second is a label
        ("abc def ghi", [(0, 3), (5, 5), (-1, 2), (4, 99), (8, 11)]),  # empty / invalid spans
        ("", [(0, 0)]),
    ],
)
def test_highlighted_spans_reproduce_text_exactly(text, spans):
    spans = _words(text) if spans is None else spans
    n = len(spans)
    out = make_output(text, [list(np.linspace(-1, 1, n))], ["c"], spans=spans,
                      elements=[f"e{i}" for i in range(n)])
    for standalone in (True, False):
        tree = parse(attribution_html([out], standalone=standalone))
        if text:
            assert tree.texts == [text]
        # every element appears exactly once
        idx = sorted(int(e["attrs"]["data-i"]) for e in tree.els[0]) if tree.els else []
        assert idx == list(range(n))
        for e in tree.els[0] if tree.els else []:
            i = int(e["attrs"]["data-i"])
            s, t = spans[i]
            if "rl-ghost" in e["attrs"]["class"].split():
                assert e["text"] == ""
            else:  # an element shows (part of) its own span
                assert e["text"] and e["text"] in text[max(s, 0):t]


def test_word_spans_show_the_words():
    tree = parse(attribution_html([cls_output()]))
    shown = [e["text"] for e in tree.els[0]]
    assert shown == [CLS_TEXT[s:e] for s, e in _words(CLS_TEXT)]
    assert not any("rl-ghost" in e["attrs"]["class"] for e in tree.els[0])


def _check_row_colours(els: list[dict], row: list[float]) -> None:
    finite = [abs(v) for v in row if math.isfinite(v)]
    scale = max(finite) if finite else 0.0
    for e in els:
        a = e["attrs"]
        v = row[int(a["data-i"])]
        cls = set(a["class"].split())
        want = "rl-nan" if math.isnan(v) else "rl-pos" if v > 0 else "rl-neg" if v < 0 else "rl-zero"
        assert want in cls, (v, cls)
        assert not ({"rl-pos", "rl-neg", "rl-zero", "rl-nan"} - {want}) & cls
        got = _score(a["data-score"])
        assert (math.isnan(v) and math.isnan(got)) or got == pytest.approx(v, rel=1e-6)
        assert f"score {'+' if v > 0 else ''}" in a["title"]
        alpha = float(re.fullmatch(r"--rl-a:([0-9.e-]+)", a["style"]).group(1))
        if math.isnan(v):
            assert alpha == 0
        elif math.isinf(v):
            assert alpha == MAX_ALPHA
        else:
            assert alpha == pytest.approx(min(1, abs(v) / scale) * MAX_ALPHA if scale else 0, abs=1e-3)


def test_colour_sign_follows_score_sign():
    html = attribution_html([cls_output(), lm_output()])
    tree = parse(html)
    _check_row_colours(tree.els[0], CLS_SCORES[0])  # first target shown initially
    _check_row_colours(tree.els[1], LM_SCORES[0])
    # the largest |score| of the row gets the full opacity
    top = max(tree.els[0], key=lambda e: abs(_score(e["attrs"]["data-score"])))
    assert top["attrs"]["style"] == f"--rl-a:{MAX_ALPHA:g}" and "rl-pos" in top["attrs"]["class"]
    # positive is green, negative red (the CSS the classes map to)
    css = "".join(tree.styles)
    pos = re.search(r"--rl-pos:(\d+),(\d+),(\d+)", css).groups()
    neg = re.search(r"--rl-neg:(\d+),(\d+),(\d+)", css).groups()
    assert int(pos[1]) > int(pos[0]) and int(neg[0]) > int(neg[1])
    assert ".rl-el.rl-pos{background:rgba(var(--rl-pos)" in css
    assert ".rl-el.rl-neg{background:rgba(var(--rl-neg)" in css
    # the data the script recolours from keeps every row with its sign
    data = data_of(tree)
    np.testing.assert_allclose(data[0]["scores"], CLS_SCORES, rtol=1e-6)
    np.testing.assert_allclose(data[1]["scores"], LM_SCORES, rtol=1e-6)
    assert data[0]["scales"] == pytest.approx([2.0, 3.0])


def test_nan_and_inf_scores_are_safe():
    scores = [[math.nan, 1.0, -math.inf, 0.5, -0.25], [math.nan] * 5]
    out = make_output("a b c d e", scores, ["x", "y"], params={"eps": math.inf, "arr": np.array([1.5, np.nan])},
                      target_scores=np.array([math.nan, 0.5]))
    html = attribution_html([out])
    tree = parse(html)
    data = data_of(tree)  # strict JSON: no NaN / Infinity tokens
    assert data[0]["scores"][0][0] == "NaN" and data[0]["scores"][0][2] == "-inf"
    assert data[0]["scales"] == [1.0, 0.0]
    assert data[0]["params"] == {"eps": "+inf", "arr": [1.5, "NaN"]}
    _check_row_colours(tree.els[0], [math.nan, 1.0, -math.inf, 0.5, -0.25])


def test_fragment_has_no_page_wrapper_and_scoped_css():
    out = cls_output()
    frag = attribution_html([out], standalone=False)
    for tag in ("!doctype", "html", "head", "body", "meta", "title"):
        assert not re.search(rf"<{tag}[\s>]", frag, re.I), tag
    assert re.match(r'<div class="rl-attr" id="(rl-[0-9a-f]{12})">', frag)
    assert frag.endswith("</div>")
    tree = parse(frag)
    # the only id is the random root one, and the script looks that one up
    ids = re.findall(r'\bid="([^"]*)"', frag)
    assert len(ids) == 1 and f"document.getElementById(\"{ids[0]}\")" in frag
    # a second fragment (another notebook cell) gets another id
    assert re.findall(r'\bid="([^"]*)"', out._repr_html_()) != ids
    assert out._repr_html_().startswith('<div class="rl-attr" id="rl-')
    # every CSS rule is scoped under .rl-attr (no :root / body / bare element selectors)
    css = "".join(tree.styles)
    rules = re.sub(r"@media[^{]*\{", "", css)
    selectors = [s.strip() for s in re.findall(r"(?:^|\})\s*([^{}@]+)\{", rules)]
    assert selectors and all(
        all(part.strip().startswith(".rl-attr") for part in sel.split(",")) for sel in selectors
    ), selectors
    # the first class is selected initially
    on = [b for b in tree.buttons if "rl-on" in b["class"].split()]
    assert [b["data-t"] for b in on] == ["0"] and on[0]["aria-selected"] == "true"


def test_standalone_page_is_offline_and_a_gallery(tmp_path):
    outs = [cls_output(), lm_output(), cls_output(method="KernelShap", params={"n_samples": 200, "seed": 0})]
    path = save_attribution_html(outs, tmp_path / "sub" / "view.html", title="my view")
    assert path.exists() and path == tmp_path / "sub" / "view.html"
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in html
    assert "default-src 'none'" in unescape(html)
    assert "<title>my view</title>" in html
    assert not re.search(r"\b(src|href)\s*=", html) and "@import" not in html and "url(" not in html
    assert not re.search(r"https?:", html)
    tree = parse(html)
    assert [b["data-b"] for b in tree.blocks] == ["0", "1", "2"]
    assert "rl-cls" in tree.blocks[0]["class"] and "rl-lm" in tree.blocks[1]["class"]
    for name in ("IntegratedGradients", "Saliency", "KernelShap", "n_steps=50", "abs=false", "n_samples=200"):
        assert name in html
    # causal LM: the output tokens are the buttons, readable (byte-level "Ġ" -> space, visible)
    lm_buttons = [b for b in tree.buttons if "rl-tok" in (b.get("class") or "")]
    assert len(lm_buttons) == 3
    ws = '<span class="ws">{}</span>'.format
    assert ws("\u2423") + "great" in html and ws("\u2423") + "movie" in html and "!" + ws("\u21b5") in html
    # classification: one button per class, labelled, with the model score
    assert ">negative</span> <small class=\"rl-ts\">0.12</small>" in html
    assert attribution_html([]).count("No attribution outputs") == 1


# --------------------------------------------------------------------------------------
# headless Chromium over the DevTools protocol
# --------------------------------------------------------------------------------------

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
)


def find_chromium() -> str | None:
    env = os.environ.get("RAYLENS_CHROMIUM")
    if env:
        return env
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """Minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, user_data_dir, timeout: float = 30.0):
        self.timeout = timeout
        r_in, w_in = os.pipe()  # we write w_in; the browser reads fd 3
        r_out, w_out = os.pipe()  # the browser writes fd 4; we read r_out
        # move the browser's ends out of the way of 3 and 4 before dup2-ing them there
        child_r = fcntl.fcntl(r_in, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(w_out, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(r_in)
        os.close(w_out)

        def _child_fds():  # runs in the child between fork and exec
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.log = open(os.path.join(user_data_dir, "chromium.log"), "wb")
        try:
            self.proc = subprocess.Popen(
                [binary, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe",
                 "--window-size=1100,900", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                preexec_fn=_child_fds, close_fds=False,
            )
        finally:
            os.close(child_r)
            os.close(child_w)
        self._w, self._r = w_in, r_out
        self._id = 0
        self._replies: dict[int, dict] = {}
        self._cv = threading.Condition()
        self.events: queue.Queue = queue.Queue()
        self.all_events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._r, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cv:
                    self._replies[-1] = {"error": "browser closed the pipe"}
                    self._cv.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cv:
                        self._replies[msg["id"]] = msg
                        self._cv.notify_all()
                else:
                    self.all_events.append(msg)
                    self.events.put(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        mid = self._id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cv:
            while mid not in self._replies:
                if -1 in self._replies:
                    raise RuntimeError(f"{method}: {self._replies[-1]['error']}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply to {method} in {self.timeout}s")
                self._cv.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str | None = None) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {method} event in {self.timeout}s")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev.get("method") == method and (session is None or ev.get("sessionId") == session):
                return ev

    def close(self):
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close")
                except Exception:
                    pass
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()  # our own child, by its handle
                    self.proc.wait(10)
        finally:
            for fd in (self._w, self._r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.log.close()


class Page:
    """One tab of :class:`Chromium`, attached with a flat session."""

    def __init__(self, browser: Chromium, width: int = 1100, height: int = 900):
        self.b = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.s = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def send(self, method, params=None):
        return self.b.send(method, params, self.s)

    def goto(self, url: str):
        self.send("Page.navigate", {"url": url})
        self.b.wait_event("Page.loadEventFired", self.s)

    def eval(self, expr: str):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def click(self, selector: str):
        """A real mouse click (press + release) at the centre of the element."""
        box = self.eval(
            f"(function(){{var e=document.querySelector({json.dumps(selector)});"
            "e.scrollIntoView({block:'center'});var r=e.getBoundingClientRect();"
            "return {x:r.left+r.width/2,y:r.top+r.height/2,w:r.width,h:r.height};})()"
        )
        assert box["w"] > 0 and box["h"] > 0, f"{selector} is not visible"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent",
                      {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1})

    def screenshot(self, path) -> tuple[int, int]:
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        w, h = math.ceil(size["width"]), math.ceil(size["height"])
        png = base64.b64decode(self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1},
        })["data"])
        with open(path, "wb") as f:
            f.write(png)
        return w, h


STATE_JS = """(function(b){
  var blk=document.querySelectorAll('section.rl-block')[b];
  return {
    t: blk.getAttribute('data-t'),
    on: Array.prototype.map.call(blk.querySelectorAll('button.rl-on'), function(x){return x.getAttribute('data-t');}),
    cur: blk.querySelector('.rl-cur').textContent,
    max: blk.querySelector('.rl-max').textContent,
    els: Array.prototype.map.call(blk.querySelectorAll('.rl-el'), function(e){
      return {i:+e.getAttribute('data-i'), score:e.getAttribute('data-score'), cls:e.className,
              bg:getComputedStyle(e).backgroundColor, title:e.title};})
  };})(%d)"""


def _rgba(css: str) -> tuple[float, float, float, float]:
    m = re.fullmatch(r"rgba?\(([^)]*)\)", css.strip())
    parts = [float(x) for x in re.split(r"[,\s/]+", m.group(1).strip()) if x]
    return (*parts[:3], parts[3] if len(parts) > 3 else 1.0)


def _check_state(state: dict, row: list[float], t: int) -> None:
    assert state["t"] == str(t) and state["on"] == [str(t)]
    scale = max(abs(v) for v in row)
    assert len(state["els"]) == len(row)
    for e in state["els"]:
        v = row[e["i"]]
        assert float(e["score"]) == pytest.approx(v, rel=1e-6)
        r, g, b_, a = _rgba(e["bg"])
        if v > 0:
            assert "rl-pos" in e["cls"] and g > r and a == pytest.approx(abs(v) / scale * MAX_ALPHA, abs=0.01)
        elif v < 0:
            assert "rl-neg" in e["cls"] and r > g and a == pytest.approx(abs(v) / scale * MAX_ALPHA, abs=0.01)
        else:
            assert "rl-zero" in e["cls"] and a == 0


@pytest.mark.slow
def test_chromium_screenshot_and_clicks(tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not found (Debian packages chromium + chromium-driver; scripts/setup.sh installs "
                    "them when run as root with apt-get; or set RAYLENS_CHROMIUM)")
    cls, lm = cls_output(), lm_output()
    page_path = save_attribution_html([cls, lm], tmp_path / "view.html", title="raylens attributions test")
    shots = os.environ.get("RAYLENS_SCREENSHOT_DIR")
    shot_dir = tmp_path if not shots else pathlib.Path(shots)
    shot_dir.mkdir(parents=True, exist_ok=True)
    profile = tmp_path / "profile"
    profile.mkdir()

    browser = Chromium(binary, str(profile))
    try:
        page = Page(browser)
        page.goto(page_path.as_uri())
        assert page.eval("document.querySelectorAll('section.rl-block').length") == 2
        rid = page.eval("document.querySelector('.rl-attr').id")
        assert rid.startswith("rl-")
        ready = page.eval(f"document.getElementById({json.dumps(rid)}).getAttribute('data-rl-ready')")
        assert ready == "1", "the view's script did not run"

        # initial state: first class / first output token, rendered and then repainted by the script
        s0, l0 = page.eval(STATE_JS % 0), page.eval(STATE_JS % 1)
        _check_state(s0, CLS_SCORES[0], 0)
        _check_state(l0, LM_SCORES[0], 0)
        assert s0["cur"] == "negative" and l0["cur"] == "\u2423great"
        # the text shown is exactly the input text
        assert page.eval("document.querySelectorAll('.rl-text')[0].textContent") == CLS_TEXT

        shot = shot_dir / "attributions.png"
        w, h = page.screenshot(shot)
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
        assert struct.unpack(">II", png[16:24]) == (w, h) and w >= 800 and h >= 300

        # click the second class: the block shows row 1 (scores and colours)
        page.click("section.rl-block:nth-of-type(1) button.rl-tgt[data-t='1']")
        s1 = page.eval(STATE_JS % 0)
        _check_state(s1, CLS_SCORES[1], 1)
        assert s1["cur"] == "positive" and s1["max"] == "3"
        assert [e["bg"] for e in s1["els"]] != [e["bg"] for e in s0["els"]]
        flipped = [e["i"] for e in s1["els"] if np.sign(CLS_SCORES[0][e["i"]]) * np.sign(CLS_SCORES[1][e["i"]]) < 0]
        assert flipped and all(
            s1["els"][i]["cls"] != s0["els"][i]["cls"] and s1["els"][i]["bg"] != s0["els"][i]["bg"] for i in flipped
        )
        assert "positive" in s1["els"][0]["title"]
        assert page.eval(STATE_JS % 1) == l0, "clicking a class changed the other block"

        # click the third output token: the LM block shows row 2
        page.click("section.rl-block:nth-of-type(2) button.rl-tgt[data-t='2']")
        l2 = page.eval(STATE_JS % 1)
        _check_state(l2, LM_SCORES[2], 2)
        assert l2["cur"] == "!\u21b5"
        assert [e["score"] for e in l2["els"]] != [e["score"] for e in l0["els"]]
        assert page.eval(STATE_JS % 0) == s1

        # back to the first class
        page.click("section.rl-block:nth-of-type(1) button.rl-tgt[data-t='0']")
        _check_state(page.eval(STATE_JS % 0), CLS_SCORES[0], 0)
        page.click("section.rl-block:nth-of-type(1) button.rl-tgt[data-t='1']")

        page.screenshot(shot_dir / "attributions_clicked.png")
        assert (shot_dir / "attributions_clicked.png").stat().st_size > 20_000

        # dark colour scheme: dark page, highlights keep their sign colours
        page.send("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        r, g, b_, _ = _rgba(page.eval("getComputedStyle(document.querySelector('.rl-attr')).backgroundColor"))
        assert max(r, g, b_) < 80
        _check_state(page.eval(STATE_JS % 0), CLS_SCORES[1], 1)
        page.screenshot(shot_dir / "attributions_dark.png")

        errors = [e for e in browser.all_events
                  if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        assert not errors, errors
    finally:
        browser.close()
