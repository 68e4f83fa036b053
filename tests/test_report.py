"""Tests for raylens.viz.report (fast, stdlib only)."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import pytest

from raylens.viz.report import render_concept_report

EVIL = "<script>alert(1)</script>"

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Tree(HTMLParser):
    """Collects a tag-balance check, every <mark>'s text, and card order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.marks: list[dict] = []  # {"text": str, "attrs": dict}
        self.cards: list[dict] = []  # attrs of section.card in document order
        self.scripts: list[str] = []
        self._mark: dict | None = None
        self._script: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag in VOID:
            return
        self.stack.append(tag)
        if tag == "mark":
            assert self._mark is None, "nested <mark>"
            self._mark = {"text": "", "attrs": a}
        if tag == "section" and "card" in (a.get("class") or "").split():
            self.cards.append(a)
        if tag == "script":
            self._script = []

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in VOID:
            self.errors.append(f"self-closing non-void <{tag}/>")

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
            return
        self.stack.pop()
        if tag == "mark":
            self.marks.append(self._mark)
            self._mark = None
        if tag == "script":
            self.scripts.append("".join(self._script))
            self._script = None

    def handle_data(self, data):
        if self._mark is not None:
            self._mark["text"] += data
        if self._script is not None:
            self._script.append(data)


def parse(path) -> _Tree:
    t = _Tree()
    t.feed(path.read_text(encoding="utf-8"))
    t.close()
    assert not t.errors, t.errors
    assert t.stack == [], f"unclosed tags: {t.stack}"
    return t


def concept(cid, imp, **kw):
    d = {
        "concept": cid,
        "label": f"label {cid}",
        "label_error": None,
        "importance": imp,
        "importance_x_activation": 0.5 * imp if isinstance(imp, float) and not math.isnan(imp) else None,
        "frequency": 0.01,
        "top_tokens": ["Ġthe", " cat"],
        "bottom_tokens": ["dog"],
        "examples": [],
    }
    d.update(kw)
    return d


def test_script_injection_is_escaped_everywhere(tmp_path):
    text = f"before {EVIL} & \"quotes\" 'single' <!-- --> ]]> after"
    c = concept(
        7,
        1.0,
        label=EVIL,
        label_error=EVIL,
        top_tokens=[EVIL, "Ġ" + EVIL],
        bottom_tokens=[EVIL],
        examples=[{"doc_id": 3, "activation": 2.0, "text": text, "spans": [[7, 7 + len(EVIL)]]}],
    )
    out = render_concept_report(
        [c], tmp_path / "r.html", title=EVIL, summary={EVIL: EVIL, "model": "gpt2"}
    )
    raw = out.read_text(encoding="utf-8")
    assert EVIL not in raw
    assert "<script>alert" not in raw
    assert "alert(1)</script>" not in raw
    # the only script elements are the report's own two (JSON metadata + filter JS)
    assert raw.count("<script") == 2
    assert raw.count("</script>") == 2
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw

    tree = parse(out)
    assert tree.tags.count("script") == 2
    # the embedded JSON round-trips, keeping the evil text as data
    meta = json.loads(tree.scripts[0])
    assert meta["concepts"][0]["label"] == EVIL
    assert meta["title"] == EVIL
    assert "</" not in tree.scripts[0] and "<!--" not in tree.scripts[0]
    # the highlighted span is exactly the (unescaped) evil string
    assert [m["text"] for m in tree.marks] == [EVIL]


@pytest.mark.parametrize(
    "text,spans,expected",
    [
        ("hello world foo", [[6, 11]], ["world"]),
        ("hello world", [[0, 5]], ["hello"]),  # start boundary
        ("hello world", [[6, 11]], ["world"]),  # end boundary
        ("abc", [[0, 3]], ["abc"]),  # whole text
        ("hello world", [[6, 999]], ["world"]),  # clipped end
        ("hello world", [[-5, 5]], ["hello"]),  # clipped start
        ("hello world", [[20, 30], [3, 3], [5, 2]], []),  # out of range / empty / reversed
        ("hello world", [[0, 4], [2, 7]], ["hello w"]),  # overlapping: merged
        ("hello world", [[6, 11], [0, 5]], ["hello", "world"]),  # unsorted
        ("ab cd", [[0, 2], [2, 5]], ["ab", " cd"]),  # adjacent: kept separate
        ("a<b>&c", [[1, 4], [5, 6]], ["<b>", "c"]),  # escaped content
        ("naïve café ✓", [[6, 10], [11, 12]], ["café", "✓"]),  # unicode code points
        ("line1\nline2", [[4, 7]], ["1\nl"]),
    ],
)
def test_highlight_spans_wrap_exact_characters(tmp_path, text, spans, expected):
    c = concept(1, 1.0, examples=[{"doc_id": 0, "activation": 1.0, "text": text, "spans": spans}])
    tree = parse(render_concept_report([c], tmp_path / "r.html"))
    assert [m["text"] for m in tree.marks] == expected
    for m in tree.marks:
        assert m["attrs"]["title"].startswith("activation ")


def test_highlight_intensity_and_tooltip(tmp_path):
    c = concept(
        1,
        1.0,
        examples=[
            {"doc_id": 0, "activation": 1.0, "text": "low one", "spans": [[0, 3]]},
            {"doc_id": 1, "activation": 4.0, "text": "high one", "spans": [[0, 4]]},
        ],
    )
    tree = parse(render_concept_report([c], tmp_path / "r.html"))
    # examples are shown by activation, descending
    assert [m["text"] for m in tree.marks] == ["high", "low"]
    alphas = [float(re.search(r"--a:([0-9.]+)", m["attrs"]["style"]).group(1)) for m in tree.marks]
    assert alphas[0] > alphas[1]
    assert tree.marks[0]["attrs"]["title"] == "activation 4"
    assert tree.marks[1]["attrs"]["title"] == "activation 1"


def test_concepts_sorted_by_abs_importance(tmp_path):
    imps = [0.1, -3.0, 2.0, float("nan"), -0.5, 0.0, 2.5]
    cs = [concept(i, v) for i, v in enumerate(imps)]
    out = render_concept_report(cs, tmp_path / "r.html")
    tree = parse(out)
    order = [int(a["data-concept"]) for a in tree.cards]
    assert order == [1, 6, 2, 4, 0, 5, 3]  # |imp| descending, NaN last
    classes = {int(a["data-concept"]): a["class"].split() for a in tree.cards}
    assert "neg" in classes[1] and "pos" in classes[6] and "nan" in classes[3]
    raw = out.read_text(encoding="utf-8")
    assert "NaN" in raw  # NaN importance shown, not crashed
    meta = json.loads(tree.scripts[0])  # NaN must not produce invalid JSON
    assert [c["concept"] for c in meta["concepts"]] == order
    assert meta["concepts"][-1]["importance"] is None


def test_empty_concept_list(tmp_path):
    out = render_concept_report([], tmp_path / "sub" / "dir" / "empty.html", summary={"model": "gpt2"})
    assert out.exists() and out.suffix == ".html"
    tree = parse(out)
    assert tree.cards == []
    raw = out.read_text(encoding="utf-8")
    assert "No concepts" in raw and "gpt2" in raw


def test_edge_cases_render(tmp_path):
    cs = [
        concept(0, 1.0, label=None, label_error="HTTP 500: <oops>", examples=[]),
        concept(
            1,
            -0.5,
            label="",
            importance_x_activation=None,
            frequency=None,
            top_tokens=[],
            bottom_tokens=None,
            examples=[
                {"doc_id": 9, "activation": float("nan"), "text": "", "spans": [[0, 1]]},
                {"doc_id": 10, "activation": None, "text": "x", "spans": None},
            ],
        ),
    ]
    out = render_concept_report(cs, tmp_path / "r.html")
    raw = out.read_text(encoding="utf-8")
    tree = parse(out)
    assert len(tree.cards) == 2
    assert raw.count("unlabelled") >= 2
    assert "labelling failed" in raw and "HTTP 500: &lt;oops&gt;" in raw
    assert "no examples" in raw
    assert tree.marks == []


def test_tokens_readable_and_examples_collapsed(tmp_path):
    exs = [{"doc_id": i, "activation": float(10 - i), "text": f"ex {i}", "spans": [[0, 2]]} for i in range(6)]
    c = concept(1, 1.0, top_tokens=["Ġthe", "Ċ", "▁word", "Ã©"], examples=exs)
    out = render_concept_report([c], tmp_path / "r.html", max_visible_examples=2)
    raw = out.read_text(encoding="utf-8")
    parse(out)
    assert '<span class="ws">\u2423</span>the' in raw  # "Ġthe" -> visible space + "the"
    assert '<span class="ws">\u21b5</span>' in raw  # "Ċ" -> newline marker
    assert '<span class="ws">\u2423</span>word' in raw  # SentencePiece
    assert ">é</span>" in raw  # byte-level "Ã©" decoded
    assert "4 more examples" in raw
    assert raw.index("doc 1<") < raw.index("<details class=\"more\">") < raw.index("doc 2<")


def test_summary_and_self_contained(tmp_path):
    summary = {"model": "gpt2", "layer": 6, "n_tokens": 1234567, "fvu": 0.123456, "out": "/data/x.parquet"}
    out = render_concept_report([concept(0, 1.0)], tmp_path / "r.html", title="My report", summary=summary)
    raw = out.read_text(encoding="utf-8")
    parse(out)
    assert "<title>My report</title>" in raw
    assert "1,234,567" in raw and "0.1235" in raw and "/data/x.parquet" in raw
    # no network: nothing loaded from elsewhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", raw)
    assert "@import" not in raw and "url(" not in raw
    assert isinstance(out, type(tmp_path))


def test_label_scores_shown_per_card(tmp_path):
    concepts = [concept(0, 2.0, detection_accuracy=0.8333, fuzzing_accuracy=0.5),
                concept(1, 1.0, detection_accuracy=None, fuzzing_accuracy=None,
                        label_score_error="LLM endpoint http://127.0.0.1:9/v1 is unreachable <b>"),
                concept(2, 0.5)]
    out = render_concept_report(concepts, tmp_path / "r.html")
    t = parse(out)
    raw = out.read_text(encoding="utf-8")
    cards = [c.split("</section>")[0] for c in re.split(r'<section class="card', raw)[1:]]
    assert len(cards) == 3
    assert ">detection<" in cards[0] and ">0.833<" in cards[0] and ">fuzzing<" in cards[0] and ">0.5<" in cards[0]
    assert "0.5 = chance" in cards[0]  # the tooltip says what the number means
    assert "scoring errors" in cards[1] and "unreachable &lt;b&gt;" in cards[1] and ">detection<" in cards[1]
    assert "detection" not in cards[2]  # an unscored concept shows no score
    meta = json.loads(t.scripts[0])
    assert meta["concepts"][0]["detection_accuracy"] == pytest.approx(0.8333)
    assert meta["concepts"][2]["fuzzing_accuracy"] is None
