"""Config validation before any Ray work: method parameters through the registries, YAML syntax
errors with line and column, the model's config (read, not its weights) and split point, the
corpus and its columns. Every failure is one ConfigError naming the field."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylens.config import AttributionJobConfig, ConfigError, load_config
from raylens.config.preflight import check_corpus, check_model, preflight


def _err(**overrides) -> str:
    cls = overrides.pop("cls", None)
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides, cls=cls)
    return str(exc.value)


def test_concept_params_checked_on_load():
    assert "concepts.params.top_kk" in _err(**{"concepts.params": {"top_kk": 8}})
    msg = _err(**{"concepts.params": {"top_k": 1000}, "concepts.nb_concepts": 8})
    assert "concepts.params.top_k" in msg and "1000" in msg
    load_config(None, {"concepts.params": {"top_k": 4}, "concepts.nb_concepts": 8})  # in range: fine


def test_attribution_params_checked_on_load():
    msg = _err(cls=AttributionJobConfig, **{"attribution.params": {"IntegratedGradients": {"n_stepz": 8}}})
    assert "attribution.params.IntegratedGradients.n_stepz" in msg
    msg = _err(cls=AttributionJobConfig, **{"attribution.params": {"IntegratedGradients": {"n_steps": 0}}})
    assert "attribution.params.IntegratedGradients.n_steps" in msg
    load_config(None, {"attribution.params": {"IntegratedGradients": {"n_steps": 8}}}, cls=AttributionJobConfig)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus:\n  limit: 10\n  source: [unclosed\nmodel:\n  name: x\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    msg = str(exc.value)
    assert str(bad) in msg and "line " in msg and "column " in msg


def test_model_and_split_point_checked_from_config_only():
    assert check_model("smollm2-135m", None, 15)[1:] == ("causal_lm", "model.layers.15")
    with pytest.raises(ConfigError, match="extraction.split_point: split_point 99 is out of range"):
        check_model("smollm2-135m", None, 99)
    with pytest.raises(ConfigError, match="extraction.split_point: .*not a module"):
        check_model("smollm2-135m", None, "model.layerz.3")
    with pytest.raises(ConfigError, match="model.name: cannot load model 'no-such/model-xyz'"):
        check_model("no-such/model-xyz", None, 3)


def test_corpus_and_columns_checked(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["a", "b"], "y": ["0", "1"]}), path)
    check_corpus(str(path), {"corpus.text_column": "body", "corpus.label_column": "y"})
    with pytest.raises(ConfigError, match="corpus.text_column: .*no column 'text'"):
        check_corpus(str(path), {"corpus.text_column": "text"})
    csv = tmp_path / "c.csv"
    csv.write_text("review,label\nnice,1\n")
    with pytest.raises(ConfigError, match="corpus.label_column: .*no column 'stars'"):
        check_corpus(str(csv), {"corpus.text_column": "review", "corpus.label_column": "stars"})
    with pytest.raises(ConfigError, match="corpus.source: "):
        check_corpus(str(tmp_path / "missing.parquet"), {"corpus.text_column": "text"})


def test_preflight_on_whole_configs(tmp_path):
    preflight(load_config(None, {}))
    cfg = load_config(None, {"corpus.source": str(tmp_path / "nope.csv")})
    with pytest.raises(ConfigError, match="corpus.source"):
        preflight(cfg)
    cfg = load_config(None, {"corpus.target_column": "target"}, cls=AttributionJobConfig)
    with pytest.raises(ConfigError, match="corpus.target_column"):
        preflight(cfg)


@pytest.mark.parametrize("job, override, field", [
    ("concepts", "concepts.params={top_kk: 8}", "concepts.params.top_kk"),
    ("concepts", "concepts.params={top_k: 1000}", "concepts.params.top_k"),
    ("concepts", "extraction.split_point=99", "extraction.split_point"),
    ("concepts", "model.name=no-such/model-xyz", "model.name"),
    ("attribute", "attribution.params={IntegratedGradients: {n_stepz: 8}}",
     "attribution.params.IntegratedGradients.n_stepz"),
    ("attribute", "corpus.text_column=body", "corpus.text_column"),
])
def test_jobs_exit_2_with_one_line_naming_the_field_before_ray(job, override, field, capsys, tmp_path):
    import importlib

    main = importlib.import_module(f"jobs.{job}").main
    code = main(["--set", override, "--set", f"output_uri={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and field in err, err
    assert not (tmp_path / "out" / "logs").exists()  # stopped before the job's log and Ray


def _field_paths(model, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, field in model.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        out |= _field_paths(field.annotation, f"{prefix}{name}.") if sub is not None else {prefix + name}
    return out


def _yaml_paths(d: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in d.items():
        nested = isinstance(v, dict) and v and k != "params"
        out |= _yaml_paths(v, f"{prefix}{k}.") if nested else {prefix + k}
    return out


def test_default_yaml_lists_every_field_and_loads_to_the_defaults():
    """The README sends users to configs/default.yaml for "every field": each field of the
    concept job's config is there, nothing else is, and it loads (it is the main job's config:
    scripts/run_default.sh)."""
    from pathlib import Path

    import yaml

    from raylens.config import ConceptJobConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    listed = _yaml_paths(yaml.safe_load(path.read_text()))
    fields = _field_paths(ConceptJobConfig)
    assert not fields - listed, f"fields missing from default.yaml: {sorted(fields - listed)}"
    assert not listed - fields, f"keys in default.yaml that are no field: {sorted(listed - fields)}"
    assert load_config(str(path)).concepts.method == "topk_sae"
