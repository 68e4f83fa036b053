"""The network job end to end: its README command (``python -m jobs.network``) on the built-in default
(the real SmolLM2 over real movie reviews, model-worker actors on a real local Ray, real Parquet),
one row per (document, lens, layer, position), a rerun that rewrites nothing finished and redoes
only a shard whose marker is gone, the report in headless Chromium, and the checks that exit 2
before Ray."""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from raylens.config import NetworkJobConfig, load_config
from raylens.io.store import OutputStore
from tests.procs import run_job

ROLES = {"facilitating", "interfering", "irrelevant"}


# ----------------------------------------------------------------------------- fast: before Ray


@pytest.mark.parametrize("override, field", [
    ("lens.layers=[0, 31]", "lens.layers"),
    ("corpus.text_column=body", "corpus.text_column"),
    ("model.name=no-such/model-xyz", "model.name"),
    ("lens.tuned_stepz=2", "lens.tuned_stepz"),
    ("head_gating.threshold=1.5", "head_gating.threshold"),
    ("lens.train_docs=16", "lens.train_docs"),
])
def test_network_job_exits_2_with_one_line_naming_the_field_before_ray(override, field, capsys, tmp_path):
    from jobs.network import main

    code = main(["--set", override, "--set", f"output_uri={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and field in err, err
    assert not (tmp_path / "out" / "logs").exists()  # stopped before the job's log and Ray


def test_network_job_plan(capsys):
    from jobs.network import main

    assert main(["--plan"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM (causal_lm)" in out and "(31 layers) in 2 shards; 540 head-gating rows" in out, out


def test_report_escapes_every_text():
    from raylens.viz.network import render_network_report

    evil = "</td><script>alert(1)</script>'\""
    rows = [{"lens": "logit", "layer": la, "position": p, "token_id": 1, "next_token_id": 2 if p == 0 else None,
             "kl_to_final": 0.5 * la, "top1_token_id": 3, "top1_agrees": la == 1, "rank_final": 1 - la,
             "rank_next": 4} for la in (0, 1) for p in (0, 1)]
    curves = [{"lens": evil, "layer": la, "kl_q25": 1.0, "kl_q50": 2.0, "kl_q75": 3.0, "top1_agreement": 0.5,
               "mean_rank_next": 10.0, "n_tokens": 2} for la in (0, 1)]
    stability = [{"layer": 0, "head": 0, "role": evil, "agreement": 1.0}]
    html = render_network_report(rows, curves, stability, [{"layer": 0, "head": 0, "seed": 0, "role": evil}],
                                 token_strings={1: evil, 2: "\u0120ok", 3: "<b>"}, doc_id=evil, title=evil,
                                 summary={evil: evil})
    assert "<script>alert" not in html and "<b>" not in html
    assert html.count("<script>") == 1  # the page's own
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 6
    assert "<td class='c' style" in html and "<td class='c next'" not in html  # top-1 3 is never the next token 2


# ----------------------------------------------------------------------------- the job


def _mtimes(store: OutputStore, *kinds: str) -> dict[str, int]:
    return {p: os.stat(p).st_mtime_ns for k in kinds for p in store.shard_paths(k)}


@pytest.fixture(scope="module")
def net_job(tmp_path_factory):
    """``python -m jobs.network`` on the built-in default, only ``output_uri`` set."""
    out = tmp_path_factory.mktemp("network") / "out"
    console = run_job("network", ["--set", f"output_uri={out}"], timeout_s=600)
    cfg = load_config(None, {"output_uri": str(out)}, cls=NetworkJobConfig)
    return cfg, OutputStore(str(out)), console


def _documents(store: OutputStore) -> dict[int, str]:
    return {r["doc_id"]: r["text"] for s in store.read_json("documents/_manifest.json")["shards"]
            for r in store.read_table(f"documents/{s}.parquet").to_pylist()}


@pytest.mark.slow
def test_lens_table_has_one_row_per_document_lens_layer_position(net_job):
    from transformers import AutoTokenizer

    from raylens.models.loading import model_task, resolve_model_source

    cfg, store, console = net_job
    docs = _documents(store)
    assert len(docs) == cfg.corpus.limit
    assert store.done_shards("lens") == store.read_json("documents/_manifest.json")["shards"]
    tok = AutoTokenizer.from_pretrained(resolve_model_source(cfg.model.name))
    n_layers = int(model_task(cfg.model.name)[0].num_hidden_layers)
    rows = pa.concat_tables([store.read_table(f"lens/{s}.parquet", columns=["doc_id", "lens", "layer", "position"])
                      for s in store.done_shards("lens")])
    keys = collections.Counter(zip(*(rows[c].to_pylist() for c in ("doc_id", "lens", "layer", "position"))))
    assert max(keys.values()) == 1, "a (document, lens, layer, position) row is duplicated"
    expected = set()
    for d, text in docs.items():
        n = min(len(tok(text)["input_ids"]), cfg.lens.max_tokens)
        expected |= {(d, lens, layer, p) for lens in cfg.lens.lenses for layer in range(n_layers + 1)
                     for p in range(n)}
    assert set(keys) == expected
    print(f"\nlens table: {len(keys)} rows = {len(docs)} documents x {len(cfg.lens.lenses)} lenses x "
          f"{n_layers + 1} layers x their positions")


@pytest.mark.slow
def test_output_layer_rows_equal_a_direct_forward_pass(net_job, smollm):
    """At layer n_layers both lenses are the model's own output: the rows of a document equal the
    model's logits computed here (top-1, rank of the next token), with KL 0 and agreement."""
    import torch

    cfg, store, _ = net_job
    docs = _documents(store)
    doc = max(docs)
    t = store.read_table(f"lens/{_shard_of(store, doc)}.parquet")
    t = t.filter(pc.and_(pc.equal(t["doc_id"], doc), pc.equal(t["layer"], pc.max(t["layer"])))).to_pylist()
    ids = smollm.tokenizer(docs[doc], truncation=True, max_length=cfg.lens.max_tokens, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = smollm.model(ids).logits[0]
    n = ids.shape[1]
    for name in cfg.lens.lenses:
        rows = sorted((r for r in t if r["lens"] == name), key=lambda r: r["position"])
        assert [r["position"] for r in rows] == list(range(n))
        assert [r["token_id"] for r in rows] == ids[0].tolist()
        assert [r["next_token_id"] for r in rows] == ids[0, 1:].tolist() + [None]
        assert [r["top1_token_id"] for r in rows] == logits.argmax(-1).tolist()
        assert [r["rank_next"] for r in rows[:-1]] == [int((logits[p] > logits[p, ids[0, p + 1]]).sum())
                                                       for p in range(n - 1)]
        assert all(r["kl_to_final"] == 0 and r["top1_agrees"] and r["rank_final"] == 0 for r in rows)


@pytest.mark.slow
def test_aggregate_tables(net_job):
    cfg, store, console = net_job
    lens = pa.concat_tables([store.read_table(f"lens/{s}.parquet") for s in store.done_shards("lens")])
    depth = store.read_table("prediction_depth.parquet")
    per_token = set(zip(*(lens[c].to_pylist() for c in ("doc_id", "lens", "position"))))
    assert sorted(zip(*(depth[c].to_pylist() for c in ("doc_id", "lens", "position")))) == sorted(per_token)
    curves = store.read_table("lens_curves.parquet").to_pylist()
    assert sorted((r["lens"], r["layer"]) for r in curves) == sorted(set(zip(lens["lens"].to_pylist(),
                                                                             lens["layer"].to_pylist())))
    docs = _documents(store)
    train = sorted(d for d, text in docs.items() if text.strip())[:cfg.lens.train_docs]
    held = [d for d in lens.filter(pc.and_(pc.equal(lens["lens"], "logit"), pc.equal(lens["layer"], 0)))["doc_id"]
            .to_pylist() if d not in train]
    assert {r["n_tokens"] for r in curves} == {len(held)}  # the curves are over the held-out tokens only
    kl = {(r["lens"], r["layer"]): r["kl_q50"] for r in curves}
    n_layers = max(r["layer"] for r in curves)
    better = [la for la in range(n_layers) if kl[("tuned", la)] < kl[("logit", la)]]
    print(f"\nheld-out median KL to final (nats), logit / tuned: "
          + ", ".join(f"{la}: {kl[('logit', la)]:.2f} / {kl[('tuned', la)]:.2f}" for la in range(0, n_layers + 1, 3)))
    assert len(better) >= n_layers - 3, better  # measured: layers 0-28 of 30 after 4 steps
    assert kl[("tuned", n_layers)] == kl[("logit", n_layers)] == 0  # the output itself
    roles = store.read_table("head_roles.parquet").to_pylist()
    n_layers, n_heads = 1 + max(r["layer"] for r in roles), 1 + max(r["head"] for r in roles)
    assert sorted((r["seed"], r["layer"], r["head"]) for r in roles) == [
        (s, la, h) for s in sorted(cfg.head_gating.seeds) for la in range(n_layers) for h in range(n_heads)]
    assert {r["role"] for r in roles} <= ROLES
    stability = store.read_table("head_stability.parquet").to_pylist()
    assert len(stability) == n_layers * n_heads
    by_head = collections.defaultdict(list)
    for r in roles:
        by_head[(r["layer"], r["head"])].append(r["role"])
    for s in stability:  # the majority role and its share, computed directly
        counts = collections.Counter(by_head[(s["layer"], s["head"])])
        assert counts[s["role"]] == max(counts.values())
        assert s["agreement"] == pytest.approx(max(counts.values()) / len(cfg.head_gating.seeds))
    issues = store.read_table("issues.parquet").to_pylist()
    assert {i["kind"] for i in issues} <= {"empty", "truncated"} and all(i["stage"] == "lens" for i in issues)
    for line in ("documents: 16 documents in 2 shards", "lens: 0 of 2 shards already done, 2 to do",
                 "head gating: 0 of 2 seeds already done, 2 to do"):
        assert line in console, console


@pytest.mark.slow
def test_rerun_rewrites_nothing_finished_and_redoes_a_lost_shard(net_job):
    cfg, store, _ = net_job
    before = _mtimes(store, "lens", "head_gating")
    tuned = {p.name: p.stat().st_mtime_ns for p in pathlib.Path(store.path("tuned_lens")).iterdir()}
    lost = store.done_shards("lens")[1]
    old_rows = store.read_table(f"lens/{lost}.parquet")
    os.remove(store.path(store.marker("lens", lost)))  # as if its worker had been killed before the commit
    console = run_job("network", ["--set", f"output_uri={cfg.output_uri}"], timeout_s=600)
    for line in ("tuned lens: fitted by an earlier run", "lens: 1 of 2 shards already done, 1 to do",
                 "head gating: 2 of 2 seeds already done, 0 to do"):
        assert line in console, console
    after = _mtimes(store, "lens", "head_gating")
    assert set(after) == set(before)
    changed = [p for p in after if after[p] != before[p]]
    assert changed == [store.path("lens", f"{lost}.parquet")]
    assert store.read_table(f"lens/{lost}.parquet").equals(old_rows)  # the same rows, once
    assert {p.name: p.stat().st_mtime_ns for p in pathlib.Path(store.path("tuned_lens")).iterdir()} == tuned


def _shard_of(store: OutputStore, doc_id: int) -> str:
    return next(s for s in store.read_json("documents/_manifest.json")["shards"]
                if doc_id in store.read_table(f"documents/{s}.parquet")["doc_id"].to_pylist())


@contextlib.contextmanager
def chromium_page(url: str, profile: pathlib.Path):
    """A headless Chromium tab on ``url`` (the test is skipped without a Chromium); yields the
    page and a function returning the page's JS exceptions and console errors so far."""
    from tests.test_attribution_view import Chromium, Page, find_chromium

    if find_chromium() is None:
        pytest.skip("chromium not found (scripts/setup.sh installs it)")
    profile.mkdir()
    browser = Chromium(find_chromium(), str(profile))
    try:
        page = Page(browser, width=1300, height=900)
        page.goto(url)
        yield page, lambda: [e for e in browser.all_events if e.get("method") == "Runtime.exceptionThrown" or (
            e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    finally:
        browser.close()


@pytest.mark.slow
def test_report_in_chromium(net_job, tmp_path):
    cfg, store, _ = net_job
    path = pathlib.Path(store.path("report.html"))
    text = path.read_text()
    assert "<script src" not in text and "http://" not in text.replace("http://www.w3.org", "")
    roles = store.read_table("head_roles.parquet")
    with chromium_page(path.as_uri(), tmp_path / "profile") as (page, errors):
        assert page.eval("document.querySelectorAll('#n-heads td.h').length") == \
            len(set(zip(roles["layer"].to_pylist(), roles["head"].to_pylist())))
        shown = "Array.prototype.map.call(document.querySelectorAll('.n-panel'),function(p){" \
                "return getComputedStyle(p).display;})"
        assert page.eval(shown) == ["block", "none"]  # logit lens first
        doc = int(page.eval("document.querySelector('.n-grid').dataset.docId"))
        lens = store.read_table(f"lens/{_shard_of(store, doc)}.parquet").to_pylist()
        cells = {(r["layer"], r["position"]) for r in lens if r["doc_id"] == doc and r["lens"] == "logit"
                 and r["position"] < cfg.report.max_positions}
        assert page.eval("document.querySelectorAll('.n-panel')[0].querySelectorAll('td.c').length") == len(cells)
        page.click("button[data-group=lens][data-value=tuned]")
        assert page.eval(shown) == ["none", "block"]
        page.click("button[data-group=colour][data-value=agree]")
        assert page.eval("document.querySelectorAll('.n-grid.by-agree').length") == 2
        assert page.eval("document.querySelectorAll('.n-chart polyline').length") == 3 * len(cfg.lens.lenses)
        width, _ = page.screenshot(tmp_path / "report.png")
        assert (tmp_path / "report.png").stat().st_size > 20_000 and width >= 800
        assert not errors(), errors()
