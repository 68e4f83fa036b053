"""Security promises: no pickle is loaded (model and concept-model folders), model code runs only
when the config says so, no output escapes the output URI, and API keys stay out of configs and
outputs. Real parts: the built-in SmolLM2 folder, a real fitted concept model, a real store."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from raylens.io.safety import OutputPathError, UnsafeFileError, check_under_root, refuse_pickle_files, safe_component
from raylens.io.store import OutputStore


# ------------------------------------------------------------------ safetensors only
def _model_copy(tmp_path: Path) -> Path:
    """A copy of the built-in SmolLM2 folder (weights linked, not copied)."""
    from raylens.models.builtins import builtin_model_path

    src = builtin_model_path("smollm2-135m")
    dst = tmp_path / "model"
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).symlink_to(f)
    return dst


class Boom:
    """Unpickling it would write a marker file: proof that a pickle was (or was not) loaded."""

    marker: str = ""

    def __reduce__(self):
        return (Path(self.marker).write_text, ("unpickled",))


def _plant(folder: Path, name: str, marker: Path) -> Path:
    Boom.marker = str(marker)
    path = folder / name
    path.write_bytes(pickle.dumps(Boom()))
    return path


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "extra/state.pkl"])
def test_pickle_in_a_model_folder_is_refused_naming_the_file(tmp_path, name):
    from raylens.models.loading import load_model, model_task

    folder = _model_copy(tmp_path)
    (folder / "extra").mkdir()
    marker = tmp_path / "unpickled"
    planted = _plant(folder, name, marker)
    with pytest.raises(UnsafeFileError, match=str(planted).replace(".", r"\.")) as err:
        load_model(str(folder), device="cpu")
    assert "safetensors" in str(err.value)
    assert not marker.exists()
    planted.unlink()
    refuse_pickle_files(folder)  # the same folder without it passes, and its config reads
    assert model_task(str(folder))[1] == "causal_lm"


def test_pickle_in_a_concept_model_folder_is_refused(tmp_path):
    from raylens.concepts.models import build_concept_model, load_concept_model

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    model = build_concept_model("pca", nb_concepts=3, d_model=8).fit(x)
    model.save(tmp_path / "cm")
    assert torch.equal(load_concept_model(tmp_path / "cm").encode(x), model.encode(x))
    marker = tmp_path / "unpickled"
    planted = _plant(tmp_path / "cm", "model.pt", marker)
    with pytest.raises(UnsafeFileError, match="model.pt"):
        load_concept_model(tmp_path / "cm")
    assert not marker.exists() and planted.exists()


# ------------------------------------------------------------------ remote code
def _custom_code_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose config needs its own Python code; the code writes ``marker``."""
    folder, marker = tmp_path / "custom", tmp_path / "remote_code_ran"
    folder.mkdir()
    (folder / "configuration_x.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\n\nclass XConfig(PretrainedConfig):\n"
        "    model_type = 'custom_x_c1'\n")
    (folder / "config.json").write_text(
        '{"model_type": "custom_x_c1", "auto_map": {"AutoConfig": "configuration_x.XConfig"}, '
        '"architectures": ["XForCausalLM"]}')
    return folder, marker


def test_model_code_runs_only_when_trusted(tmp_path):
    from raylens.models.loading import load_model_config

    folder, marker = _custom_code_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="trust_remote_code"):
        load_model_config(str(folder))
    assert not marker.exists()
    config = load_model_config(str(folder), trust_remote_code=True)
    assert type(config).__name__ == "XConfig" and marker.exists()


# ------------------------------------------------------------------ output paths
ESCAPES = ["../outside.parquet", "concepts/../../outside.json", "/etc/passwd", "a/\0b", "..", "x/../../y"]


@pytest.mark.parametrize("name", ESCAPES)
def test_output_names_cannot_escape_the_output_uri(tmp_path, name):
    store = OutputStore(str(tmp_path / "out"))
    with pytest.raises(OutputPathError, match="output"):
        store.path(name)
    with pytest.raises(OutputPathError):
        store.write_json(name, {"x": 1})
    with pytest.raises(OutputPathError):
        store.exists("concepts", "..", name)  # a name joined one folder down
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written beside the root


def test_names_inside_the_root_still_work(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_json("concepts/a/../b.json", {"x": 1})  # resolves inside: allowed
    assert store.read_json("concepts/b.json") == {"x": 1}
    assert check_under_root("bucket/prefix", "bucket/prefix/x/y") == "bucket/prefix/x/y"
    with pytest.raises(OutputPathError):
        check_under_root("bucket/prefix", "bucket/prefix-other/x")  # a sibling with a common prefix


@pytest.mark.parametrize("text", ["../../etc", "/abs/path", "a/b\\c", "..", ".", "", "label <b>x</b>\0", "é" * 300])
def test_safe_component_is_one_harmless_name(tmp_path, text):
    name = safe_component(text)
    assert name and "/" not in name and "\\" not in name and name not in (".", "..") and not name.startswith(".")
    assert len(name) <= 80
    store = OutputStore(str(tmp_path / "out"))
    store.write_json(f"labels/{name}.json", {})
    assert (tmp_path / "out" / "labels" / f"{name}.json").is_file()
    assert os.path.dirname(store.path("labels", name)) == store.path("labels")


# ------------------------------------------------------------------ API keys
KEY = "sk-raylens-c1-RECOGNISABLE-0123456789abcdef"


def test_key_in_the_config_body_is_refused_without_echoing_it(tmp_path):
    from raylens.config import ConfigError, load_config

    for over in ({"interpretation.labels.api_key": KEY}, {"interpretation.labels.token": KEY},
                 {"interpretation.labels.api_key_env": KEY},
                 {"interpretation.labels.base_url": f"http://user:{KEY}@127.0.0.1:9/v1"}):
        with pytest.raises(ConfigError, match="API keys are not read from the config") as err:
            load_config(None, over)
        assert KEY not in str(err.value) and "api_key_file" in str(err.value)
    with pytest.raises(ConfigError, match="interpretation.labels.api_key_file"):
        load_config(None, {"interpretation.labels.api_key_file": str(tmp_path / "missing")})
    for over in ({"api_key": KEY}, {"model.api_key": KEY}):  # where no field reads it: an unknown key
        with pytest.raises(ConfigError, match="Extra inputs are not permitted") as err:
            load_config(None, over)
        assert KEY not in str(err.value)


def test_key_comes_from_the_file_or_the_environment(tmp_path, monkeypatch):
    from raylens.llm.config import LabelerConfig, read_api_key

    monkeypatch.setenv("RAYLENS_C1_KEY", KEY)
    assert read_api_key("RAYLENS_C1_KEY") == KEY
    assert read_api_key("RAYLENS_C1_UNSET") == "EMPTY"
    (tmp_path / "key").write_text(KEY[::-1] + "\n# comment\n")
    assert read_api_key("RAYLENS_C1_KEY", tmp_path / "key") == KEY[::-1]  # the file wins
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty") as err:
        read_api_key(None, tmp_path / "empty")
    assert KEY not in repr(LabelerConfig("http://127.0.0.1:9/v1", "m", api_key=KEY)) and "empty" in str(err.value)


def _strings_of_parquet(path: Path) -> str:
    """Every value, the schema and the key-value metadata of a Parquet file, as text."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    parts = [str(f.schema_arrow), str(f.metadata.metadata), str(f.schema_arrow.metadata)]
    table = f.read()
    parts += [str(table.column(i).to_pylist()) for i in range(table.num_columns)]
    return "\n".join(parts)


@pytest.mark.slow
def test_concept_job_against_a_faulty_endpoint_keeps_the_key_secret(tmp_path):
    """A small concept job (CLI, own process and local Ray) labels against a fault-injecting
    endpoint that fails the first request twice with HTTP 500, then answers labels holding HTML.
    The key, read from a file, reaches the endpoint as the bearer token, and appears in no output
    file (Parquet values and metadata included), in the job log, nor on the console. The first
    concept is unlabelled with the reason, the others are labelled, and the job completes."""
    import json

    import pyarrow.parquet as pq

    from tests.llm_faults import FaultyLLM
    from tests.procs import run_job, set_args
    from tests.xss import assert_escaped

    key_file = tmp_path / "secrets" / "key"
    key_file.parent.mkdir()
    key_file.write_text(KEY + "\n")
    out = tmp_path / "out"
    label = "<img src=x onerror=alert('xss-label')> praise for the movie"
    with FaultyLLM("500", fail_first=2, reply=label) as server:
        sets = {"output_uri": str(out), "corpus.limit": 16, "extraction.shard_size": 16, "extraction.max_tokens": 32,
                "extraction.split_point": 4, "concepts.nb_concepts": 8, "concepts.params": "{top_k: 2, epochs: 2}",
                "importance.enabled": "false", "interpretation.sampled_per_quantile": 0,
                "interpretation.non_activating_per_concept": 0, "interpretation.labels.base_url": server.base_url,
                "interpretation.labels.model": "m", "interpretation.labels.api_key_file": str(key_file),
                "interpretation.labels.max_concepts": 3, "interpretation.labels.n_examples": 2,
                "interpretation.labels.score_max_concepts": 0, "interpretation.labels.max_concurrency": 1,
                "interpretation.labels.max_retries": 1, "interpretation.labels.backoff_s": 0.05,
                "interpretation.labels.timeout_s": 10, "resources.num_workers": 1}
        console = run_job("concepts", set_args("configs/default.yaml", sets), timeout_s=600)
    print(console[-3000:])
    chats = server.chat_requests()
    assert chats and all(r.authorization == f"Bearer {KEY}" for r in chats)  # the key was used
    rows = pq.read_table(out / "concepts" / "concepts.parquet").to_pylist()
    labelled = [r for r in rows if r["label"]]
    failed = [r for r in rows if r["label_error"] and "HTTP 500" in r["label_error"]]
    assert len(failed) == 1 and "after 2 attempts" in failed[0]["label_error"]  # bounded: 1 + max_retries
    assert labelled and all("praise for the movie" in r["label"] for r in labelled)
    assert len(chats) >= 3  # two failed attempts, then the other labels' requests
    report = (out / "report.html").read_text(encoding="utf-8")
    assert_escaped(report)
    assert "HTTP 500" in report and "praise for the movie" in report
    assert '<section class="rl-issues" id="issues">' in report  # the job's issues.parquet, shown

    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and (out / "logs" / "job.log").is_file()
    leaks = [str(p) for p in files if KEY.encode() in p.read_bytes()
             or (p.suffix == ".parquet" and KEY in _strings_of_parquet(p))]
    assert leaks == []
    assert KEY not in console and KEY[::-1] not in console
    assert KEY not in json.dumps(json.loads((out / "config.json").read_text()))


def test_job_config_refuses_model_code_unless_trusted(tmp_path):
    """``model.trust_remote_code`` (off by default) reaches the pre-flight model check: a model
    folder that needs its own code fails there (exit 2 in a job) and its code does not run."""
    from raylens.config import ConfigError, load_config
    from raylens.config.preflight import check_model

    folder, marker = _custom_code_folder(tmp_path)
    cfg = load_config(None, {"model.name": str(folder)})
    assert cfg.model.trust_remote_code is False
    with pytest.raises(ConfigError, match="model.name"):
        check_model(cfg.model.name, cfg.model.task, trust_remote_code=cfg.model.trust_remote_code)
    assert not marker.exists()
    with pytest.raises(Exception):  # trusted: the code runs (then the toy config has no model class)
        check_model(str(folder), None, trust_remote_code=True)
    assert marker.exists()


def test_pickle_in_a_model_folder_fails_the_pre_flight_check(tmp_path):
    """Refused with the job's config errors (exit 2, before any Ray work), naming the file."""
    from raylens.config import ConfigError
    from raylens.config.preflight import check_model

    folder = _model_copy(tmp_path)
    _plant(folder, "pytorch_model.bin", tmp_path / "unpickled")
    with pytest.raises(ConfigError, match=r"model\.name.*pytorch_model\.bin"):
        check_model(str(folder), None, 3)
    assert not (tmp_path / "unpickled").exists()
