"""Security promises: no pickle is loaded (model and concept-model folders), model code runs only
when the config says so, no output escapes the output URI, and API keys stay out of configs and
outputs. Real parts: the built-in SmolLM2 folder, a real fitted concept model, a real store."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from raylens.io.safety import OutputPathError, UnsafeFileError, check_under_root, safe_component
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
    from raylens.models.loading import load_model

    folder = _model_copy(tmp_path)
    (folder / "extra").mkdir()
    marker = tmp_path / "unpickled"
    planted = _plant(folder, name, marker)
    with pytest.raises(UnsafeFileError, match=str(planted).replace(".", r"\.")) as err:
        load_model(str(folder), device="cpu")
    assert "safetensors" in str(err.value)
    assert not marker.exists()
    planted.unlink()
    lm = load_model(str(folder), device="cpu")  # the same folder without it loads
    assert lm.task == "causal_lm"


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
