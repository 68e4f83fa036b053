"""Tests of raylens.concepts.models and raylens.concepts.metrics on synthetic activations.

The data has real structure: each row is a mean vector plus a sparse non-negative
combination of a random ground-truth dictionary plus Gaussian noise, and a few rows carry
a huge value on two fixed dimensions (like the "massive activations" of LLM residual
streams). Real activations are wired in elsewhere.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from raylens.concepts.metrics import (
    dead_concepts,
    explained_variance,
    mean_l0,
    reconstruction_metrics,
    reconstruction_mse,
)
from raylens.concepts.models import (
    ConceptModel,
    SemiNMFConceptModel,
    TopKSAEConceptModel,
    available_methods,
    build_concept_model,
    load_concept_model,
    reservoir_sample,
    sae_train_step,
)

D_MODEL = 64
N_TRAIN = 6000
N_TEST = 1000
OUTLIER_VALUE = 60.0


def synthetic_activations(n, d=D_MODEL, n_atoms=48, k_active=3, noise=0.05, outlier_rate=0.002, seed=0):
    """Rows ``(n, d)``: mean + sparse positive mix of ``n_atoms`` unit atoms + noise; a few outliers."""
    g = torch.Generator().manual_seed(1234)  # the same ground truth for every split
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    mean = 0.5 * torch.randn(d, generator=g)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, n_atoms, generator=g).argsort(dim=1)[:, :k_active]
    coef = 0.5 + 2 * torch.rand(n, k_active, generator=g)
    z = torch.zeros(n, n_atoms).scatter(1, idx, coef)
    x = mean + z @ atoms + noise * torch.randn(n, d, generator=g)
    n_out = max(1, int(outlier_rate * n))
    rows = torch.randperm(n, generator=g)[:n_out]
    x[rows, :2] += OUTLIER_VALUE
    return x


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """One intra-op thread for this module (restored after): these matrices are small, and on
    a busy 2-core machine two spinning OpenMP threads made the file 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return {"train": synthetic_activations(N_TRAIN, seed=0), "test": synthetic_activations(N_TEST, seed=1)}


def _batches(x, size):
    """A one-shot generator of batches (not re-iterable)."""
    for i in range(0, x.shape[0], size):
        yield x[i:i + size]


SAE_PARAMS = dict(nb_concepts=64, d_model=D_MODEL, top_k=8, epochs=8, batch_size=128, seed=0)
NMF_PARAMS = dict(nb_concepts=48, d_model=D_MODEL, max_iter=200, seed=0)


@pytest.fixture(scope="module")
def sae(data):
    return build_concept_model("topk_sae", **SAE_PARAMS).fit(data["train"])


@pytest.fixture(scope="module")
def nmf(data):
    return build_concept_model("semi_nmf", **NMF_PARAMS).fit(data["train"])


def _ev(model, x):
    return explained_variance(x, model.decode(model.encode(x)))


# ----------------------------------------------------------------------------- registry


def test_registry_and_unknown_method():
    assert {"topk_sae", "semi_nmf"} <= set(available_methods())
    with pytest.raises(ValueError, match="not_a_method") as err:
        build_concept_model("not_a_method", nb_concepts=4, d_model=8)
    assert "topk_sae" in str(err.value) and "semi_nmf" in str(err.value)
    with pytest.raises(ValueError, match="bogus_param"):
        build_concept_model("topk_sae", nb_concepts=4, d_model=8, bogus_param=1)
    with pytest.raises(ValueError, match="top_k"):
        build_concept_model("topk_sae", nb_concepts=4, d_model=8, top_k=5)
    m = build_concept_model("semi_nmf", nb_concepts=4, d_model=8)
    assert isinstance(m, ConceptModel) and m.method == "semi_nmf" and not m.streaming
    assert TopKSAEConceptModel.streaming and TopKSAEConceptModel.method == "topk_sae"
    with pytest.raises(RuntimeError, match="not fitted"):
        m.encode(torch.zeros(2, 8))


# ----------------------------------------------------------------------------- TopK SAE


def test_topk_sae_beats_untrained(data, sae):
    x = data["test"]
    trained = _ev(sae, x)
    # the same SAE before training (same seed -> same initialisation), same normalisation
    untrained_sae = build_concept_model("topk_sae", **SAE_PARAMS).sae.eval()
    with torch.no_grad():
        x_hat = sae.denormalize(untrained_sae(sae.normalize(x))[2])
    untrained = explained_variance(x, x_hat)
    assert trained > 0.9, trained
    assert trained > untrained + 0.5, (trained, untrained)
    # ... and beats the best rank-8 linear reconstruction (PCA with as many components as top_k)
    xc = x - x.mean(0)
    _, _, v = torch.linalg.svd(xc, full_matrices=False)
    pca8 = x.mean(0) + xc @ v[:8].T @ v[:8]
    assert trained > explained_variance(x, pca8) + 0.1


def test_topk_sae_sparsity_and_shapes(data, sae):
    x = data["test"]
    z = sae.encode(x)
    assert z.shape == (N_TEST, 64) and z.dtype == torch.float32
    nnz = (z != 0).sum(dim=1)
    assert int(nnz.max()) <= 8 and float(nnz.float().mean()) > 4
    assert (z >= 0).all()
    assert sae.dictionary.shape == (64, D_MODEL)
    # decode is z @ dictionary + decoder_bias, and matches overcomplete's own decoder
    torch.testing.assert_close(sae.decode(z), z @ sae.dictionary + sae.decoder_bias, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ref = sae.denormalize(sae.sae.decode(z))
    torch.testing.assert_close(sae.decode(z), ref, rtol=1e-4, atol=1e-4)
    # float16 input works and gives float32 codes
    assert sae.encode(x[:5].half()).dtype == torch.float32
    with pytest.raises(ValueError, match="d_model=64"):
        sae.encode(torch.zeros(3, D_MODEL + 1))


@pytest.mark.parametrize("method", ["topk_sae", "semi_nmf"])
def test_decode_is_differentiable(data, sae, nmf, method):
    model = sae if method == "topk_sae" else nmf
    z = model.encode(data["test"][:16]).clone().requires_grad_(True)
    model.decode(z).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    # d/dz sum(z @ D + b) = row sums of the dictionary, for every row
    expected = model.dictionary.sum(dim=1).expand(16, -1)
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-4)
    assert float(z.grad.abs().sum()) > 0


def test_sae_train_step_reduces_loss(data):
    model = build_concept_model("topk_sae", **SAE_PARAMS)
    model.set_normalization(data["train"][:2000])
    opt = model.make_optimizer()
    batch = model.normalize(data["train"][:256])
    first = sae_train_step(model.sae, opt, batch)
    assert set(first) >= {"loss", "explained_variance", "l0"}
    assert first["l0"] <= 8
    for _ in range(60):
        last = sae_train_step(model.sae, opt, batch)
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["explained_variance"] > first["explained_variance"] + 0.3


def test_topk_sae_fit_stream_generator(data):
    model = build_concept_model("topk_sae", **SAE_PARAMS)
    gen = _batches(data["train"], 500)  # one-shot: only one pass is possible
    out = model.fit_stream(gen, progress=False)
    assert out is model and model.is_fitted
    assert len(model.history) == 1 and model.n_fit_rows == N_TRAIN
    assert _ev(model, data["test"]) > 0.45  # one pass of 47 steps: about 0.6 measured
    # a re-iterable stream (list) gets `epochs` passes and a better model
    model2 = build_concept_model("topk_sae", **{**SAE_PARAMS, "epochs": 3})
    model2.fit_stream(list(_batches(data["train"], 333)), progress=False)
    assert len(model2.history) == 3 and model2.n_fit_rows == N_TRAIN
    assert _ev(model2, data["test"]) > _ev(model, data["test"])


def test_normalization_is_robust_to_outliers(data, sae):
    x = data["train"]
    inliers = x[x[:, 0] < OUTLIER_VALUE / 2]
    assert inliers.shape[0] < x.shape[0]  # the data does have outliers
    xn = sae.normalize(inliers)
    rms = float(xn.pow(2).sum(dim=1).mean().sqrt())
    assert 0.8 < rms < 1.2, rms
    assert float(xn.mean(0).norm()) < 0.1
    # outlier rows are still reconstructed in the original space (they are structured)
    outliers = x[x[:, 0] >= OUTLIER_VALUE / 2]
    rel = (sae.decode(sae.encode(outliers)) - outliers).norm(dim=1) / outliers.norm(dim=1)
    assert float(rel.mean()) < 0.3


# ----------------------------------------------------------------------------- Semi-NMF


def test_semi_nmf_beats_untrained(tmp_path, data, nmf):
    x = data["test"]
    trained = _ev(nmf, x)
    # the same model with a random dictionary (same atom norms), through the public file format
    nmf.save(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    d = tensors["dictionary"]
    rand = torch.randn(d.shape, generator=torch.Generator().manual_seed(0))
    tensors["dictionary"] = rand / rand.norm(dim=1, keepdim=True) * d.norm(dim=1, keepdim=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    untrained = _ev(load_concept_model(tmp_path), x)
    assert trained > 0.9, trained
    assert trained > untrained + 0.5, (trained, untrained)
    z = nmf.encode(x)
    assert z.shape == (N_TEST, 48) and (z >= 0).all()


def test_semi_nmf_encode_is_deterministic_and_batch_independent(data, nmf):
    x = data["test"][:200]
    z = nmf.encode(x)
    assert torch.equal(z, nmf.encode(x))
    torch.testing.assert_close(nmf.encode(x[:7]), z[:7], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nmf.encode(x[5:6]), z[5:6], rtol=1e-4, atol=1e-5)


def test_semi_nmf_encode_matches_overcomplete(data, nmf):
    """Our deterministic NNLS encode reconstructs better than overcomplete's SemiNMF.encode."""
    from raylens._compat import import_overcomplete

    import_overcomplete()
    from overcomplete.optimization import SemiNMF

    onc = SemiNMF(48)
    onc.D = nmf._normalized_dictionary().clone()
    onc._set_fitted()
    x = data["test"][:300]
    a = nmf.normalize(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        z_onc = onc.encode(a)
    err_onc = float((a - z_onc @ onc.D).pow(2).sum())
    err_ours = float((a - nmf.encode(x) @ onc.D).pow(2).sum())
    assert err_ours < err_onc, (err_ours, err_onc)


def test_semi_nmf_fit_stream_respects_sample_bound(data, caplog):
    model = build_concept_model("semi_nmf", **{**NMF_PARAMS, "max_fit_rows": 1500, "max_iter": 100})
    with caplog.at_level(logging.INFO, logger="raylens.concepts.models"):
        model.fit_stream(_batches(data["train"], 700), progress=False)
    assert model.n_fit_rows == 1500
    assert any("reservoir sample of 1500 of 6000 rows" in r.getMessage() for r in caplog.records)
    assert _ev(model, data["test"]) > 0.8
    # in-memory fit with more rows than max_fit_rows also subsamples
    small = build_concept_model("semi_nmf", **{**NMF_PARAMS, "max_fit_rows": 800, "max_iter": 20})
    assert small.fit(data["train"]).n_fit_rows == 800


def test_semi_nmf_pgd_l1_under_no_grad(tmp_path, data):
    model = build_concept_model("semi_nmf", nb_concepts=16, d_model=D_MODEL, solver="pgd", l1_penalty=0.01,
                                max_iter=50, encode_iters=50, max_fit_rows=1000)
    with torch.no_grad():  # fit and encode need autograd inside; they must not depend on the caller
        model.fit(data["train"])
        z = model.encode(data["test"][:100])
    assert (z >= 0).all() and _ev(model, data["test"]) > 0.2
    loaded = load_concept_model(model.save(tmp_path))
    assert torch.equal(loaded.encode(data["test"][:100]), z)
    with pytest.raises(ValueError, match="l1_penalty"):
        build_concept_model("semi_nmf", nb_concepts=4, d_model=8, l1_penalty=0.1)


def test_topk_sae_fit_under_no_grad(data):
    with torch.no_grad():
        model = build_concept_model("topk_sae", **{**SAE_PARAMS, "epochs": 1}).fit(data["train"][:1000])
    assert model.history and model.history[-1]["explained_variance"] > 0


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("method", ["topk_sae", "semi_nmf"])
def test_save_load_roundtrip(tmp_path, data, sae, nmf, method):
    model = sae if method == "topk_sae" else nmf
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == method and config["params"]["nb_concepts"] == model.nb_concepts
    loaded = load_concept_model(tmp_path)
    assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
    x = data["test"]
    z = model.encode(x)
    assert torch.equal(loaded.encode(x), z)
    assert torch.equal(loaded.decode(z), model.decode(z))
    assert torch.equal(loaded.dictionary, model.dictionary)
    assert torch.equal(loaded.decoder_bias, model.decoder_bias)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_concept_model(tmp_path)
    with pytest.raises(RuntimeError, match="not fitted"):
        build_concept_model("topk_sae", nb_concepts=4, d_model=8).save(tmp_path)


# ----------------------------------------------------------------------------- sampling


def test_reservoir_sample_uniform_and_bounded():
    rows = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    sample, n_seen = reservoir_sample(_batches(rows, 30), 10, 1, seed=3)
    assert n_seen == 100 and sample.shape == (10, 1)
    assert len(set(sample.flatten().tolist())) == 10  # without replacement
    again, _ = reservoir_sample(_batches(rows, 30), 10, 1, seed=3)
    assert torch.equal(sample, again)  # seeded
    short, n = reservoir_sample(_batches(rows[:4], 3), 10, 1)
    assert n == 4 and sorted(short.flatten().tolist()) == [0, 1, 2, 3]
    counts = torch.zeros(100)
    for seed in range(600):  # a single batch makes many rows compete for the same slots
        s, _ = reservoir_sample([rows], 10, 1, seed=seed)
        counts[s.flatten().long()] += 1
    # each row is kept with probability 1/10: 60 expected, sd about 7.3
    assert counts.min() > 30 and counts.max() < 95, counts
    assert abs(float(counts[:50].sum() - counts[50:].sum())) < 300


# ----------------------------------------------------------------------------- metrics


def test_metrics_values():
    x = torch.randn(50, 6)
    assert explained_variance(x, x) == pytest.approx(1.0)
    assert explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-9)
    assert explained_variance(x, torch.zeros_like(x)) < explained_variance(x, 0.5 * x)
    assert reconstruction_mse(x, x + 2) == pytest.approx(4.0)
    z = torch.tensor([[0.0, 1.0, 0.0], [2.0, 3.0, 0.0]])
    assert mean_l0(z) == pytest.approx(1.5)
    assert dead_concepts(z) == pytest.approx(1 / 3)
    assert dead_concepts(iter([z[:1], z[1:]])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        explained_variance(x, x[:, :3])


def test_reconstruction_metrics_streams(data, sae):
    x = data["test"]
    stream = reconstruction_metrics(sae, _batches(x, 97))
    z = sae.encode(x)
    x_hat = sae.decode(z)
    assert stream["n_rows"] == N_TEST
    assert stream["explained_variance"] == pytest.approx(explained_variance(x, x_hat), abs=1e-6)
    assert stream["mse"] == pytest.approx(reconstruction_mse(x, x_hat), rel=1e-6)
    assert stream["mean_l0"] == pytest.approx(mean_l0(z), rel=1e-9)
    assert stream["dead_fraction"] == pytest.approx(dead_concepts(z))
    assert 0 <= stream["dead_fraction"] < 0.5


def test_library_does_not_import_ray():
    code = (
        "import sys, torch; import raylens.concepts.models as m, raylens.concepts.metrics; "
        "m.build_concept_model('topk_sae', nb_concepts=4, d_model=8); "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
