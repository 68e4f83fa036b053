"""The bad-inputs table of the README ("What raylens promises"): each bad config or input given to
``python -m jobs.concepts`` / ``python -m jobs.attribute`` (their ``main``, in this process) stops
before Ray with exit code 2 and one line naming the field (or the file); no log file, no Ray.
Row problems that do not stop a job (invalid UTF-8, non-string texts, repeated ids, bad target
values) are checked in tests/test_corpus_inputs.py and below."""

from __future__ import annotations

import importlib

import pytest

from raylens.config import AttributionJobConfig, load_config

BLANK_CSV = b"text\n\n   \n\t\n"


def _files(tmp):
    """The files some rows name: ``{tmp}`` in a row is this test's temporary folder."""
    (tmp / "bad.yaml").write_text("corpus:\n  limit: 10\n  source: [unclosed\nmodel:\n  name: x\n")
    (tmp / "list.yaml").write_text("- corpus\n- model\n")
    (tmp / "blank.csv").write_bytes(BLANK_CSV)
    (tmp / "empty.csv").write_bytes(b"text,label\n")
    (tmp / "reviews.csv").write_bytes(b"review,stars\ngood,5\n")
    (tmp / "a_file").write_text("not a folder")


#: (id, job, arguments, what the one line must hold); every row: exit 2, before Ray
ROWS = [
    ("unknown-key", "concepts", ["--set", "corpus.sourse=x.csv"], "corpus.sourse: Extra inputs are not permitted"),
    ("unknown-section", "concepts", ["--set", "extration.split_point=3"], "extration: Extra inputs"),
    ("negative-shard-size", "concepts", ["--set", "extraction.shard_size=-5"], "extraction.shard_size"),
    ("zero-limit", "concepts", ["--set", "corpus.limit=0"], "corpus.limit"),
    ("max-tokens-0", "concepts", ["--set", "extraction.max_tokens=0"], "extraction.max_tokens"),
    ("negative-gpus", "concepts", ["--set", "resources.gpus_per_worker=-1"], "resources.gpus_per_worker"),
    ("unknown-concept-method", "concepts", ["--set", "concepts.method=kmeanz"], "concepts.method 'kmeanz' unknown"),
    ("unknown-granularity", "concepts", ["--set", "extraction.granularity=paragraph"], "extraction.granularity"),
    ("wrong-type", "concepts", ["--set", "concepts.nb_concepts=many"], "concepts.nb_concepts"),
    ("yaml-syntax", "concepts", ["--config", "{tmp}/bad.yaml"], "bad.yaml, line 4, column 6"),
    ("yaml-not-a-mapping", "concepts", ["--config", "{tmp}/list.yaml"], "must hold a mapping at the top level"),
    ("config-file-missing", "concepts", ["--config", "{tmp}/nope.yaml"], "No such file or directory"),
    ("set-without-equals", "concepts", ["--set", "corpus.limit"], "--set expects key=value"),
    ("corpus-missing", "concepts", ["--set", "corpus.source={tmp}/nope.csv"], "corpus.source: corpus"),
    ("text-column-missing", "concepts", ["--set", "corpus.source={tmp}/reviews.csv"],
     "corpus.text_column: corpus '{tmp}/reviews.csv' has no column 'text'"),
    ("label-column-missing", "concepts", ["--set", "corpus.label_column=stars"],
     "corpus.label_column: corpus 'movie-reviews' has no column 'stars'"),
    ("id-column-missing", "concepts", ["--set", "corpus.id_column=uid"], "corpus.id_column"),
    ("invalid-utf8-policy", "concepts", ["--set", "corpus.invalid_utf8=drop"], "corpus.invalid_utf8"),
    ("blank-corpus", "concepts", ["--set", "corpus.source={tmp}/blank.csv"],
     "corpus.source: no document to explain in '{tmp}/blank.csv': every text"),
    ("empty-corpus", "concepts", ["--set", "corpus.source={tmp}/empty.csv"], "it has no rows"),
    ("unknown-model", "concepts", ["--set", "model.name=no-such/model-xyz"], "model.name: cannot load model"),
    ("split-point-out-of-range", "concepts", ["--set", "extraction.split_point=99"],
     "extraction.split_point: split_point 99 is out of range"),
    ("module-path-missing", "concepts", ["--set", "extraction.split_point=model.layerz.3"],
     "extraction.split_point"),
    ("top-k-above-nb-concepts", "concepts", ["--set", "concepts.params={top_k: 1000}"], "concepts.params.top_k"),
    ("unknown-concept-param", "concepts", ["--set", "concepts.params={top_kk: 8}"], "concepts.params.top_kk"),
    ("sampling-without-samples", "concepts",
     ["--set", "interpretation.labels.example_sampling=top+quantile", "--set", "interpretation.sampled_per_quantile=0"],
     "interpretation: Value error, labels.example_sampling"),
    ("output-uri-is-a-file", "concepts", ["--set", "output_uri={tmp}/a_file"], "output_uri: '{tmp}/a_file' is a file"),
    ("output-uri-other-settings", "concepts", ["--set", "extraction.split_point=2"],
     "holds results made with other settings (extraction.split_point)"),
    ("unknown-attribution-method", "attribute", ["--set", "attribution.methods=[Saliency, Foo]"],
     "attribution.methods: Value error, unknown method(s) ['Foo']"),
    ("method-listed-twice", "attribute", ["--set", "attribution.methods=[Saliency, Saliency]"], "listed twice"),
    ("unknown-attribution-param", "attribute", ["--set", "attribution.params={IntegratedGradients: {n_stepz: 8}}"],
     "attribution.params.IntegratedGradients.n_stepz"),
    ("attribution-param-out-of-range", "attribute",
     ["--set", "attribution.params={IntegratedGradients: {n_steps: 0}}"], "attribution.params.IntegratedGradients.n_steps"),
    ("params-for-unlisted-method", "attribute", ["--set", "attribution.params={Lime: {n_samples: 8}}"],
     "params given for method(s) not in methods: ['Lime']"),
    ("unknown-attribution-granularity", "attribute", ["--set", "attribution.granularity=paragraph"],
     "attribution.granularity"),
    ("attribution-max-tokens-0", "attribute", ["--set", "attribution.max_tokens=0"], "attribution.max_tokens"),
    ("target-column-missing", "attribute", ["--set", "corpus.target_column=target"], "corpus.target_column"),
    ("targets-column-without-column", "attribute", ["--set", "attribution.targets=column"],
     "attribution.targets is 'column' but corpus.target_column is not set"),
    ("attribution-blank-corpus", "attribute", ["--set", "corpus.source={tmp}/blank.csv"], "every text"),
]


@pytest.mark.parametrize("job, args, expect", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line_before_ray(job, args, expect, tmp_path, capsys):
    _files(tmp_path)
    out = tmp_path / "out"
    if "other-settings" in str(args) or expect.startswith("holds results"):  # an earlier run at split point 3
        from raylens.io.store import OutputStore

        OutputStore(str(out)).write_json("job_key.json", load_config(
            None, {"extraction.split_point": 3, "output_uri": str(out)}).extraction_key())
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if not any(a.startswith("output_uri=") for a in argv):
        argv += ["--set", f"output_uri={out}"]
    code = importlib.import_module(f"jobs.{job}").main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("[raylens] ") and "\n" not in err, err  # one line
    assert expect.replace("{tmp}", str(tmp_path)) in err, err
    assert not (out / "logs").exists()  # stopped before the job's log and Ray


def test_the_table_has_at_least_25_rows_with_distinct_ids():
    assert len(ROWS) >= 25 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.slow
def test_bad_target_values_are_error_rows_and_the_others_are_explained():
    """A target column value that is no class of the model (a name it does not know, a missing
    value) gives that document an error row (recorded in issues.parquet by the job, kind
    ``error``); the other documents are explained."""
    from raylens.attributions.corpus import attribute_documents, build_explainers
    from raylens.models import load_model

    cfg = load_config(None, {"attribution.methods": ["Saliency"]}, cls=AttributionJobConfig)
    lm = load_model(cfg.model.name, device="cpu")
    explainers = build_explainers(lm, ["Saliency"], granularity="word")
    texts = ["A wonderful film.", "A dull film.", "An average film.", "Fine."]
    table, _ = attribute_documents(lm, explainers, [0, 1, 2, 3], texts, ["positive", "banana", None, 0],
                                   target_mode="column", metrics=False)
    rows = {r["doc_id"]: r for r in table.to_pylist()}
    assert rows[0]["error"] is None and rows[3]["error"] is None
    assert "'banana' is neither a class index nor a class name" in rows[1]["error"]
    assert rows[2]["error"] == "bad target: missing target"
