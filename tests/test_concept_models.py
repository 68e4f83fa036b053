"""Tests of raylens.concepts.models and raylens.concepts.metrics on synthetic activations.

The data has real structure: each row is a mean vector plus a sparse non-negative
combination of a random ground-truth dictionary plus Gaussian noise, and a few rows carry
a huge value on two fixed dimensions (like the "massive activations" of LLM residual
streams). Real activations are wired in elsewhere.
"""

from __future__ import annotations

import json
import math
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
    JUMP_KERNELS,
    ConceptModel,
    DictionaryConceptModel,
    Param,
    SemiNMFConceptModel,
    TopKSAEConceptModel,
    available_methods,
    build_concept_model,
    check_params,
    concept_model_class,
    load_concept_model,
    register_concept_model,
    reservoir_sample,
    sae_train_step,
    unregister_concept_model,
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


def test_check_params_rejects_unknown_names_and_out_of_range_values():
    with pytest.raises(ValueError, match=r"^method: unknown concept method 'not_a_method'"):
        check_params("not_a_method", {}, nb_concepts=8)
    with pytest.raises(ValueError, match=r"^top_kk: unknown parameter of topk_sae; known: \[") as err:
        check_params("topk_sae", {"top_kk": 8}, nb_concepts=8)
    assert "'top_k'" in str(err.value) and "'outlier_factor'" in str(err.value)
    bad = [
        ("topk_sae", {"top_k": 1000}, r"^top_k: must be <= nb_concepts \(8\), got 1000$"),
        ("topk_sae", {"top_k": 0}, r"^top_k: must be >= 1, got 0$"),
        ("topk_sae", {"lr": -1e-3}, r"^lr: must be > 0, got -0.001$"),
        ("topk_sae", {"lr": "fast"}, r"^lr: must be a number, got 'fast'$"),
        ("vanilla_sae", {"epochs": -2}, r"^epochs: must be >= 1, got -2$"),
        ("topk_sae", {"batch_size": 1.5}, r"^batch_size: must be an integer"),
        ("semi_nmf", {"solver": "adam"}, r"^solver: must be one of \['mu', 'pgd'\], got 'adam'$"),
        ("semi_nmf", {"l1_penalty": 0.1}, r"^l1_penalty: only used by solver='pgd'"),
        ("jumprelu_sae", {"kernel": "box"}, r"^kernel: must be one of"),
        ("batchtopk_sae", {"threshold_momentum": 1.0}, r"^threshold_momentum: must be < 1"),
        ("nmf", {"center": True}, r"^center: unknown parameter of nmf"),
        ("archetypal_sae", {"nb_candidates": 4}, r"^nb_candidates: must be >= nb_concepts \(8\), got 4$"),
        ("neurons", {"neurons": [1, 1, 2, 3, 4, 5, 6, 7]}, r"^neurons: must be 8 distinct indices"),
        ("pca", {}, r"^nb_concepts: must be <= d_model \(4\) for pca, got 8$", 4),
        ("svd", {"seed": 1}, r"^nb_concepts: must be < d_model \(8\) for svd", 8),
    ]
    for method, params, message, *d_model in bad:
        d_model = d_model[0] if d_model else 16
        with pytest.raises(ValueError, match=message):
            check_params(method, params, nb_concepts=8, d_model=d_model)
        with pytest.raises(ValueError, match=message):  # building runs the same check
            build_concept_model(method, nb_concepts=8, d_model=d_model, **params)
    with pytest.raises(ValueError, match=r"^nb_concepts: not a method parameter"):
        check_params("topk_sae", {"nb_concepts": 8}, nb_concepts=8)
    with pytest.raises(ValueError, match=r"^nb_concepts: must be >= 1, got 0$"):
        check_params("pca", {}, nb_concepts=0)
    # checks that need d_model wait until it is known
    check_params("pca", {}, nb_concepts=8)
    # values are coerced as the constructors always did (YAML may give "1e-3" as a string)
    assert build_concept_model("topk_sae", nb_concepts=8, d_model=16, lr="1e-3", epochs=2.0).get_params()["lr"] == 1e-3


def test_every_method_accepts_its_defaults():
    for method in available_methods():
        check_params(method, {}, nb_concepts=4)
        check_params(method, {}, nb_concepts=4, d_model=8)
        params = build_concept_model(method, nb_concepts=4, d_model=8).get_params()
        declared = concept_model_class(method).declared_params()
        assert set(params) == {"nb_concepts", "d_model", *declared}, method
        check_params(method, {k: v for k, v in params.items() if k not in ("nb_concepts", "d_model")},
                     nb_concepts=4, d_model=8)


def test_construction_is_cheap_and_kernels_match_overcomplete():
    """Constructors only store parameters: a 65,536 x 8,192 SAE (4 GiB of weights) is built in
    no time; its overcomplete module appears only when fitted, loaded or asked for."""
    import time

    from raylens._compat import import_overcomplete

    t0 = time.perf_counter()
    for method in ("topk_sae", "batchtopk_sae", "jumprelu_sae", "vanilla_sae", "mp_sae", "archetypal_sae"):
        build_concept_model(method, nb_concepts=65_536, d_model=8_192, device="cuda")
    assert time.perf_counter() - t0 < 1.0
    import_overcomplete()
    from overcomplete.sae import JumpSAE

    assert set(JUMP_KERNELS) == set(JumpSAE._KERNELS)


@pytest.fixture
def toy_method():
    """A concept model defined and registered by this test file alone; unregistered after."""

    @register_concept_model
    class RandomDirectionsConceptModel(DictionaryConceptModel):
        """Toy: ``nb_concepts`` seeded random unit directions ``(nb_concepts, d_model)``; codes
        ``(n_rows, nb_concepts)`` are least-squares coordinates on them. Not streaming."""

        method = "toy_random_directions"
        parameters = {"gain": Param(1.0, float, low=0, low_open=True, doc="scales the directions")}

        def fit(self, activations):
            x = self._bounded(activations)
            self.set_normalization(x)
            d = torch.randn(self.nb_concepts, self.d_model, generator=torch.Generator().manual_seed(self.seed))
            self._set_state(self.gain * d / d.norm(dim=1, keepdim=True))
            self.n_fit_rows = int(x.shape[0])
            return self

        def _encode_normalized(self, x_norm):
            return x_norm @ torch.linalg.pinv(self._D)

    yield RandomDirectionsConceptModel
    unregister_concept_model(RandomDirectionsConceptModel.method)
    assert RandomDirectionsConceptModel.method not in available_methods()


def test_a_toy_method_registered_from_a_test_file(tmp_path, data, toy_method):
    assert "toy_random_directions" in available_methods()
    with pytest.raises(ValueError, match=r"^gain: must be > 0"):
        check_params("toy_random_directions", {"gain": 0}, nb_concepts=4)
    model = build_concept_model("toy_random_directions", nb_concepts=4, d_model=D_MODEL, gain=2.0, seed=3)
    assert type(model) is toy_method and not model.streaming
    model.fit_stream(_batches(data["train"], 500), progress=False)  # the base's reservoir sample
    x = data["test"][:50]
    z = model.encode(x)
    assert z.shape == (50, 4)
    unit = build_concept_model("toy_random_directions", nb_concepts=4, d_model=D_MODEL, seed=3)
    torch.testing.assert_close(model.dictionary, 2.0 * unit.fit(data["train"]).dictionary)
    loaded = load_concept_model(model.save(tmp_path))
    assert type(loaded) is toy_method and loaded.get_params() == model.get_params()
    assert torch.equal(loaded.encode(x), z) and torch.equal(loaded.decode(z), model.decode(z))


def test_saved_models_hold_no_device_and_load_anywhere(tmp_path, data):
    model = build_concept_model("topk_sae", **{**SAE_PARAMS, "epochs": 1}).fit(data["train"][:1000])
    x = data["test"][:20]
    z = model.encode(x)
    model.device = "cuda"  # as if trained on a GPU: the tensors are saved from wherever they are
    model.save(tmp_path / "new")
    assert "device" not in json.loads((tmp_path / "new" / "config.json").read_text())["params"]
    assert load_concept_model(tmp_path / "new").device == "cpu"
    # a folder saved by an earlier raylens on a GPU holds device "cuda": it loads on the CPU too
    model.device = "cpu"
    model.save(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["params"]["device"] = "cuda"
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = load_concept_model(tmp_path / "old")
    assert loaded.device == ("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = load_concept_model(tmp_path / "old", device="cpu")
    assert on_cpu.device == "cpu" and torch.equal(on_cpu.encode(x), z)
    assert on_cpu.get_params() == {**model.get_params(), "device": "cpu"}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device: 'cuda' is not available"):
            load_concept_model(tmp_path / "old", device="cuda")


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


# ============================================================================= every method, real activations
#
# Real activations: the built-in SmolLM2-135M (tests/conftest.py), layer 15 of 30, token
# rows of real movie reviews from the built-in corpus, first token (the attention sink)
# excluded. Documents 0-43 train, 44-59 are held out.
#
# Baseline, the same for every method: the best least-squares reconstruction from a random
# Gaussian dictionary of the same size, with the training mean as offset for free,
# ``x_hat = mu + P_R (x - mu)`` (signed codes, the optimal encoder for that dictionary: no
# encoder of any method can do better on a random dictionary).

from raylens.concepts.metrics import (  # noqa: E402
    dictionary_stability,
    frechet_distance,
    match_concepts,
    sparsity_ratio,
)
from raylens.concepts.models import (  # noqa: E402
    BatchTopKSAEConceptModel,
    JumpReLUSAEConceptModel,
    SAEConceptModel,
)

REAL_K = 16
REAL_LAYER = 15
# small settings per method so that the whole file stays fast on 2 cores
REAL_PARAMS = {
    "topk_sae": dict(top_k=4, epochs=6, batch_size=128),
    "batchtopk_sae": dict(top_k=4, epochs=6, batch_size=128),
    "mp_sae": dict(top_k=4, epochs=6, batch_size=128),
    "archetypal_sae": dict(top_k=4, epochs=6, batch_size=128),
    "vanilla_sae": dict(epochs=6, batch_size=128),
    "jumprelu_sae": dict(epochs=6, batch_size=128),
    "semi_nmf": dict(max_iter=150),
    "convex_nmf": dict(max_iter=300),
    "archetypal_analysis": dict(max_iter=60),
    "nmf": dict(max_iter=200, epochs=2, batch_size=256),
    "dictionary_learning": dict(max_iter=5, epochs=2),
    "kmeans": dict(batch_size=256),
    "pca": dict(batch_size=256),
}
REAL_EV: dict[str, tuple[float, float]] = {}


@pytest.fixture(scope="module")
def real(smollm, tmp_path_factory):
    """Activations from the job's Parquet: the extracted table is written as an activation
    shard of an output store and read back with the trainer's readers (stored as float32,
    the job's ``extraction.activation_dtype: float32``, so the data is what it always was)."""
    import numpy as np

    from raylens.data.corpora import iter_corpus
    from raylens.io.readers import ActivationStream
    from raylens.io.schemas import tensor_column_to_numpy
    from raylens.io.store import OutputStore
    from raylens.models.split import SplitModel

    texts = [t for table in iter_corpus("movie-reviews", limit=60) for t in table.column("text").to_pylist()]
    table, _ = SplitModel(smollm, REAL_LAYER).extract(texts, list(range(len(texts))), dtype="float32",
                                                      max_tokens=40, exclude_first_tokens=1)
    store = OutputStore(str(tmp_path_factory.mktemp("real_activations")))
    store.write_shard("activations", "shard-00000", table, {"n_docs": len(texts)})
    xs, docs = [], []
    for rb in store.iter_shard_batches("activations", columns=["doc_id", "activation"], batch_rows=512):
        xs.append(tensor_column_to_numpy(rb.column("activation")).astype(np.float32))
        docs.append(rb.column("doc_id").to_numpy())
    x, doc = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(docs))
    streamed = torch.cat(list(ActivationStream(store, split="all", batch_rows=512)))
    assert torch.equal(streamed, x) and x.shape[0] == table.num_rows
    train, test = x[doc < 44], x[doc >= 44]
    assert 1000 < train.shape[0] and 300 < test.shape[0]
    return {"train": train, "test": test}


@pytest.fixture(scope="module")
def real_baseline(real):
    mu = real["train"].mean(0)
    r = torch.randn(REAL_K, real["train"].shape[1], generator=torch.Generator().manual_seed(0))
    xc = real["test"] - mu
    coef = torch.linalg.lstsq(r.T, xc.T).solution.T
    return explained_variance(real["test"], mu + coef @ r)


def _real_model(method, **over):
    return build_concept_model(method, nb_concepts=REAL_K, d_model=real_d(), **{**REAL_PARAMS.get(method, {}), **over})


def real_d():
    return 576  # SmolLM2-135M hidden size


@pytest.fixture(scope="module")
def real_fitted(real):
    cache = {}

    def get(method):
        if method not in cache:
            cache[method] = _real_model(method).fit(real["train"])
        return cache[method]

    return get


def _tiny(method):
    """An unfitted model of ``method`` on 8-dim data with 4 concepts."""
    top_k = {"top_k": 1} if "top_k" in concept_model_class(method).declared_params() else {}
    return build_concept_model(method, nb_concepts=4, d_model=8, **top_k)


def test_catalogue_has_fifteen_methods():
    from raylens.config import ConceptsConfig

    methods = available_methods()
    assert len(methods) >= 15, methods
    for m in ("neurons", "pca", "svd", "ica", "kmeans", "nmf", "semi_nmf", "convex_nmf", "vanilla_sae",
              "topk_sae", "batchtopk_sae", "jumprelu_sae", "mp_sae", "archetypal_sae"):
        assert m in methods
        assert ConceptsConfig(method=m, params={}).method == m  # the job config accepts each
    for m in methods:
        cls = type(_tiny(m))
        doc = cls.__doc__ or ""
        assert "(n_rows, nb_concepts)" in doc and "stream" in doc.lower(), m  # shapes + streaming stated
        assert cls.method == m


@pytest.mark.slow
@pytest.mark.parametrize("method", available_methods())
def test_method_on_real_activations(tmp_path, real, real_baseline, real_fitted, method):
    """fit -> held-out EV beats a random dictionary; shapes; decode is linear; save/load is exact."""
    model = real_fitted(method)
    x = real["test"]
    z = model.encode(x)
    assert z.shape == (x.shape[0], REAL_K) and z.dtype == torch.float32 and torch.isfinite(z).all()
    x_hat = model.decode(z)
    assert x_hat.shape == x.shape
    assert model.dictionary.shape == (REAL_K, x.shape[1])
    torch.testing.assert_close(x_hat, z @ model.dictionary + model.decoder_bias, rtol=1e-3, atol=1e-2)
    ev = explained_variance(x, x_hat)
    REAL_EV[method] = (ev, real_baseline)
    print(f"\n{method}: held-out EV {ev:.3f} vs random dictionary {real_baseline:.3f}")
    assert ev > real_baseline + 0.05, (method, ev, real_baseline)
    # codes do not depend on which rows share a batch (BatchTopK included, at inference)
    torch.testing.assert_close(model.encode(x[:7]), z[:7], rtol=1e-4, atol=1e-4)
    # save / load: identical codes, reconstructions, dictionary, parameters
    model.save(tmp_path)
    loaded = load_concept_model(tmp_path)
    assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
    assert torch.equal(loaded.encode(x), z)
    assert torch.equal(loaded.decode(z), x_hat)
    assert torch.equal(loaded.dictionary, model.dictionary)
    assert torch.equal(loaded.decoder_bias, model.decoder_bias)
    # the weights file holds tensors only (safetensors) and nothing is pickled
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("method", available_methods())
def test_fit_stream_on_real_activations(real, real_baseline, method, caplog):
    """Streaming methods learn from a one-shot generator and from a list of batches; the others
    fit a bounded reservoir sample of the stream (and say so)."""
    cls = type(_real_model(method))
    x = real["train"]
    model = _real_model(method, max_fit_rows=1000)
    with caplog.at_level(logging.INFO, logger="raylens.concepts.models"):
        model.fit_stream(_batches(x, 300), progress=False)
    assert model.is_fitted
    ev = _ev(model, real["test"])
    if issubclass(cls, SAEConceptModel):
        # a one-shot generator gives an SAE a single pass: about 13 Adam steps here, too few to
        # learn (measured EV about 0.01); it must train on every row, once
        assert len(model.history) == 1 and model.history[0]["steps"] == math.ceil(x.shape[0] / model.batch_size)
    else:
        assert ev > real_baseline + 0.03, (method, ev, real_baseline)
    if cls.streaming:
        assert model.n_fit_rows == x.shape[0]
        again = _real_model(method, max_fit_rows=1000).fit_stream(list(_batches(x, 250)), progress=False)
        assert again.n_fit_rows == x.shape[0] and _ev(again, real["test"]) > real_baseline + 0.03
    else:
        assert model.n_fit_rows == 1000
        assert any(f"reservoir sample of 1000 of {x.shape[0]} rows" in r.getMessage() for r in caplog.records)


def test_every_sae_shares_the_training_step():
    for m in available_methods():
        model = _tiny(m)
        if m.endswith("_sae"):
            assert isinstance(model, SAEConceptModel) and model.streaming
            assert type(model)._train_batches is SAEConceptModel._train_batches


@pytest.mark.slow
def test_batchtopk_threshold_and_jumprelu_thresholds_survive_save_load(tmp_path, real, real_fitted):
    bt = real_fitted("batchtopk_sae")
    assert isinstance(bt, BatchTopKSAEConceptModel) and bt.threshold > 0
    bt.save(tmp_path / "bt")
    tensors = load_file(str(tmp_path / "bt" / "model.safetensors"))
    assert float(tensors["batchtopk.threshold"]) == pytest.approx(bt.threshold)
    loaded = load_concept_model(tmp_path / "bt")
    assert loaded.threshold == bt.threshold
    z = bt.encode(real["test"])
    # inference keeps exactly the codes above the threshold; about top_k per row on average
    assert float(z[z > 0].min()) >= bt.threshold
    assert 1 <= mean_l0(z) <= 3 * 4
    jr = real_fitted("jumprelu_sae")
    assert isinstance(jr, JumpReLUSAEConceptModel)
    th = jr.thresholds
    assert th.shape == (REAL_K,) and not torch.allclose(th, torch.full_like(th, math.exp(-3.0)))  # learned
    jr.save(tmp_path / "jr")
    assert torch.equal(load_concept_model(tmp_path / "jr").thresholds, th)
    z = jr.encode(real["test"])
    # a code is either 0 or above its own threshold
    assert bool(((z == 0) | (z > th)).all())


@pytest.mark.slow
def test_sklearn_state_is_tensors(tmp_path, real_fitted):
    for method, key in (("pca", "state.explained_variance"), ("ica", "state.unmixing"),
                        ("svd", "state.singular_values"), ("neurons", "state.neurons")):
        real_fitted(method).save(tmp_path / method)
        tensors = load_file(str(tmp_path / method / "model.safetensors"))
        assert key in tensors and "dictionary" in tensors
    ev = load_file(str(tmp_path / "pca" / "model.safetensors"))["state.explained_variance"]
    assert bool((ev[:-1] >= ev[1:]).all())  # sorted principal components
    pca = real_fitted("pca")
    d = pca.dictionary / pca.dictionary.norm(dim=1, keepdim=True)
    torch.testing.assert_close(d @ d.T, torch.eye(REAL_K), atol=1e-4, rtol=0)  # orthonormal axes


def test_neurons_identity_and_subset(data):
    x = data["test"]
    ident = build_concept_model("neurons", nb_concepts=D_MODEL, d_model=D_MODEL, center=False).fit(data["train"])
    assert torch.equal(ident.encode(x), x)
    assert torch.equal(ident.decode(x), x)
    assert explained_variance(x, ident.decode(ident.encode(x))) == pytest.approx(1.0)
    sub = build_concept_model("neurons", nb_concepts=4, d_model=D_MODEL).fit(data["train"])
    var = data["train"].var(0)
    assert set(sub._extra["neurons"].tolist()) == set(var.argsort(descending=True)[:4].tolist())
    picked = build_concept_model("neurons", nb_concepts=3, d_model=D_MODEL, neurons=[5, 1, 9])
    picked.fit_stream(_batches(data["train"], 500), progress=False)
    torch.testing.assert_close(picked.encode(x), x[:, [5, 1, 9]] - data["train"].mean(0)[[5, 1, 9]],
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="distinct"):
        build_concept_model("neurons", nb_concepts=2, d_model=D_MODEL, neurons=[1, 1])


def test_kmeans_codes_are_one_hot_and_decode_to_centroids(data):
    model = build_concept_model("kmeans", nb_concepts=8, d_model=D_MODEL).fit(data["train"][:2000])
    z = model.encode(data["test"])
    assert bool(((z == 0) | (z == 1)).all()) and torch.equal(z.sum(1), torch.ones(N_TEST))
    cent = model.decode(torch.eye(8))
    dist = torch.cdist(data["test"], cent)
    assert torch.equal(z.argmax(1), dist.argmin(1))


def test_nmf_non_negative_dictionary_and_codes(data):
    model = build_concept_model("nmf", nb_concepts=16, d_model=D_MODEL, max_iter=100).fit(data["train"][:2000])
    assert bool((model._normalized_dictionary() >= 0).all())
    assert bool((model.encode(data["test"]) >= 0).all())
    relu = build_concept_model("nmf", nb_concepts=16, d_model=D_MODEL, nonneg="relu", max_iter=100)
    relu.fit(data["train"][:2000])
    assert torch.equal(relu.decoder_bias, torch.zeros(D_MODEL))
    # the shift keeps the negative part of activations: it reconstructs better than rectifying
    assert _ev(model, data["test"]) > _ev(relu, data["test"])


def test_archetypal_analysis_codes_on_simplex(data):
    model = build_concept_model("archetypal_analysis", nb_concepts=8, d_model=D_MODEL, max_iter=20,
                                max_fit_rows=1500).fit(data["train"])
    z = model.encode(data["test"][:200])
    assert bool((z >= 0).all())
    torch.testing.assert_close(z.sum(1), torch.ones(200), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- new metrics


def test_frechet_distance_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) @ torch.randn(8, 8, generator=g) + 3.0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    noisy = [frechet_distance(x, x + s * torch.randn(x.shape, generator=g)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(noisy, noisy[1:])), noisy
    assert noisy[0] > 0
    # closed form for a shifted copy: only the mean term remains
    assert frechet_distance(x, x + 2.0) == pytest.approx(4.0 * 8, rel=1e-4)
    # two independent samples of one Gaussian are close; a different covariance is far
    y = torch.randn(2000, 8, generator=g) @ torch.randn(8, 8, generator=g) + 3.0
    assert frechet_distance(x, x[torch.randperm(2000, generator=g)]) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, y) > 10 * frechet_distance(x[:1000], x[1000:])
    # the (reconstruction-blind) mean predictor is far from the data distribution
    assert frechet_distance(x, x.mean(0).expand_as(x)) > noisy[-1] / 4
    with pytest.raises(ValueError):
        frechet_distance(x, x[:, :3])


def test_sparsity_ratio_values():
    z = torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0]])
    assert sparsity_ratio(z) == pytest.approx(1.5 / 4)
    assert sparsity_ratio(torch.ones(3, 5)) == 1.0 and sparsity_ratio(torch.zeros(3, 5)) == 0.0


def test_dictionary_stability_properties(sae):
    d = sae.dictionary
    assert dictionary_stability(sae, sae) == pytest.approx(1.0)
    perm = torch.randperm(d.shape[0], generator=torch.Generator().manual_seed(1))
    signs = torch.where(torch.rand(d.shape[0], generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0)
    shuffled = d[perm] * signs[:, None] * 3.0  # permuted, sign-flipped, rescaled
    assert dictionary_stability(d, shuffled) == pytest.approx(1.0)
    rows, cols, sims = match_concepts(d, shuffled)
    assert torch.equal(perm[cols], rows)  # the matching recovers the permutation
    assert torch.allclose(sims, torch.ones_like(sims), atol=1e-6)
    rand = torch.randn(d.shape, generator=torch.Generator().manual_seed(3))
    s_rand = dictionary_stability(d, rand)
    assert 0 <= s_rand < 0.5, s_rand
    # invariance to permuting the concepts of either side
    assert dictionary_stability(d[perm], rand) == pytest.approx(s_rand)
    assert dictionary_stability(d, rand[perm]) == pytest.approx(s_rand)
    # Hungarian is optimal: never below the greedy row-wise best of a permutation-free pairing
    assert dictionary_stability(d, rand) >= float(
        (torch.nn.functional.normalize(d, dim=1) * torch.nn.functional.normalize(rand, dim=1)).sum(1).abs().mean())


def test_stability_across_seeds_is_meaningful(data):
    a = build_concept_model("topk_sae", **{**SAE_PARAMS, "epochs": 4, "seed": 0}).fit(data["train"])
    b = build_concept_model("topk_sae", **{**SAE_PARAMS, "epochs": 4, "seed": 1}).fit(data["train"])
    rand = torch.randn(a.dictionary.shape, generator=torch.Generator().manual_seed(0))
    two_seeds = dictionary_stability(a, b)
    assert two_seeds > dictionary_stability(a, rand) + 0.2, two_seeds
    pa = build_concept_model("pca", nb_concepts=8, d_model=D_MODEL, seed=0).fit(data["train"])
    pb = build_concept_model("pca", nb_concepts=8, d_model=D_MODEL, seed=1).fit(data["train"])
    assert dictionary_stability(pa, pb) > 0.99  # PCA is deterministic up to sign


def test_reconstruction_metrics_reports_fid_and_sparsity(data, sae):
    x = data["test"]
    m = reconstruction_metrics(sae, _batches(x, 97), fid_rows=5000)
    z = sae.encode(x)
    assert m["fid_rows"] == N_TEST
    assert m["fid"] == pytest.approx(frechet_distance(x, sae.decode(z)), rel=1e-4)
    assert m["sparsity_ratio"] == pytest.approx(mean_l0(z) / 64)
    sampled = reconstruction_metrics(sae, _batches(x, 97), fid_rows=300)
    assert sampled["fid_rows"] == 300 and sampled["fid"] >= 0
    assert math.isnan(reconstruction_metrics(sae, _batches(x, 97), fid_rows=0)["fid"])


def test_print_real_ev_table():
    """Runs last in this file: prints the per-method held-out EV collected above (-s to see)."""
    for method, (ev, base) in sorted(REAL_EV.items()):
        print(f"{method:22s} EV {ev:.3f}  random dictionary {base:.3f}")
