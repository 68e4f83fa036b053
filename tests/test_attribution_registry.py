"""The attribution-method registry and parameter checks: ``check_params`` without a model, the same
declarations in the constructors, and a toy method registered from this file alone."""

from __future__ import annotations

import numpy as np
import pytest

from raylens.attributions import METHODS, Occlusion, PerturbationExplainer, check_params, register_method
from raylens.attributions.aggregators import OcclusionAggregator
from raylens.attributions.constraints import Int, check_values
from raylens.attributions.corpus import attribute_documents, build_explainers
from raylens.attributions.methods import available_methods, unregister_method
from raylens.attributions.perturbations import MaskPerturbator
from tests.test_attributions_helpers import manual_scores, masked, sentiment_classifier, tiny_models

# ----------------------------------------------------------------------------- check_params, no model

BAD = [  # (method, params, the parameter the message must start with)
    ("IntegratedGradients", {"n_stepz": 3}, "n_stepz"),
    ("IntegratedGradients", {"n_steps": 0}, "n_steps"),
    ("IntegratedGradients", {"n_steps": 2.5}, "n_steps"),
    ("IntegratedGradients", {"integration": "simpson"}, "integration"),
    ("IntegratedGradients", {"integration": "trapezoid", "n_steps": 1}, "n_steps"),
    ("IntegratedGradients", {"baseline": "noise"}, "baseline"),
    ("IntegratedGradients", {"baseline": -1}, "baseline"),
    ("SmoothGrad", {"n_samples": 0}, "n_samples"),
    ("SmoothGrad", {"noise_std": -0.1}, "noise_std"),
    ("SquareGrad", {"noise_std": float("nan")}, "noise_std"),
    ("VarGrad", {"input_x_gradient": "yes"}, "input_x_gradient"),
    ("GradientShap", {"n_samples": -3}, "n_samples"),
    ("Lime", {"n_samples": 1}, "n_samples"),
    ("Lime", {"distance": "euclid"}, "distance"),
    ("Lime", {"kernel_width": 0}, "kernel_width"),
    ("Lime", {"alpha": -1.0}, "alpha"),
    ("KernelShap", {"n_samples": 0}, "n_samples"),
    ("Sobol", {"n_samples": 1}, "n_samples"),
    ("Saliency", {"n_steps": 4}, "n_steps"),  # a parameter of another method
    ("Occlusion", {"inference_mode": "probs"}, "inference_mode"),
    ("Occlusion", {"granularity": "char"}, "granularity"),
    ("Occlusion", {"batch_size": 0}, "batch_size"),
    ("Occlusion", {"max_new_tokens": 0}, "max_new_tokens"),
    ("Occlusion", {"seed": -1}, "seed"),
    ("Occlusion", {"task": "translation"}, "task"),
    ("Saliency", {"target_chunk": 0}, "target_chunk"),
]


@pytest.mark.parametrize("method,params,name", BAD, ids=[f"{m}-{n}" for m, _, n in BAD])
def test_check_params_rejects_with_the_parameter_name_first(method, params, name):
    with pytest.raises(ValueError) as exc:
        check_params(method, params)
    assert str(exc.value).startswith(name), str(exc.value)


def test_check_params_unknown_parameter_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"^n_stepz: unknown parameter of IntegratedGradients; known: \[") as exc:
        check_params("IntegratedGradients", {"n_stepz": 3})
    assert "'n_steps'" in str(exc.value) and "'batch_size'" in str(exc.value)


def test_check_params_unknown_method():
    with pytest.raises(ValueError, match="unknown attribution method 'IntegratedGradient'.*IntegratedGradients"):
        check_params("IntegratedGradient", {})


def test_check_params_accepts_defaults_and_good_values():
    for name in METHODS:
        check_params(name, {})
        check_params(name, {"batch_size": 8, "granularity": "sentence", "inference_mode": "log_softmax",
                            "seed": None, "max_batch_tokens": None, "progress": False})
    check_params("IntegratedGradients", {"n_steps": 32, "baseline": "mask", "integration": "trapezoid"})
    check_params("IntegratedGradients", {"baseline": np.int64(3)})
    check_params("SmoothGrad", {"n_samples": 4, "noise_std": 0, "input_x_gradient": False})
    check_params("Lime", {"n_samples": 2, "distance": "hamming", "kernel_width": 0.5, "alpha": 0})


def test_registry_lists_every_method_once_in_order():
    assert available_methods() == ["Occlusion", "Lime", "KernelShap", "Sobol", "Saliency", "IntegratedGradients",
                                   "SmoothGrad", "SquareGrad", "VarGrad", "GradientShap", "AttentionRollout",
                                   "GradientAttentionRollout", "AttnLRP"]
    assert all(METHODS[n].__name__ == n for n in METHODS)


# ----------------------------------------------------------------------------- declarations == constructors

#: (method, parameter, value): values on both sides of each declared bound
PROBES = [
    ("IntegratedGradients", "n_steps", 0), ("IntegratedGradients", "n_steps", 1),
    ("IntegratedGradients", "integration", "simpson"), ("IntegratedGradients", "integration", "midpoint"),
    ("IntegratedGradients", "baseline", "noise"), ("IntegratedGradients", "baseline", "pad"),
    ("SmoothGrad", "n_samples", 0), ("SmoothGrad", "n_samples", 1),
    ("SmoothGrad", "noise_std", -0.5), ("SmoothGrad", "noise_std", 0.0),
    ("VarGrad", "input_x_gradient", "no"), ("VarGrad", "input_x_gradient", False),
    ("GradientShap", "n_samples", 0), ("GradientShap", "noise_std", 0.2),
    ("Lime", "n_samples", 1), ("Lime", "n_samples", 2), ("Lime", "kernel_width", 0.0), ("Lime", "alpha", -1),
    ("Lime", "distance", "euclid"), ("KernelShap", "n_samples", 0), ("KernelShap", "n_samples", 1),
    ("Sobol", "n_samples", 1), ("Sobol", "n_samples", 2),
    ("Occlusion", "granularity", "char"), ("Occlusion", "granularity", "token"),
    ("Occlusion", "batch_size", 0), ("Occlusion", "batch_size", 1),
    ("Occlusion", "max_batch_tokens", 0), ("Occlusion", "max_batch_tokens", 1),
    ("Occlusion", "inference_mode", "probs"), ("Occlusion", "max_new_tokens", 0),
    ("Saliency", "target_chunk", 0), ("Saliency", "target_chunk", 1),
]


@pytest.mark.parametrize("method,name,value", PROBES, ids=[f"{m}-{n}-{v}" for m, n, v in PROBES])
def test_constructors_accept_what_check_params_accepts(method, name, value):
    """One declaration serves both: a value check_params rejects, the constructor rejects with the
    same message; a value it accepts, the constructor builds with."""
    (bert, btok), _ = tiny_models()
    try:
        check_params(method, {name: value})
        expected = None
    except ValueError as exc:
        expected = str(exc)
    if expected is None:
        METHODS[method](bert, btok, **{name: value})
    else:
        with pytest.raises(ValueError) as exc:
            METHODS[method](bert, btok, **{name: value})
        assert str(exc.value) == expected


def test_register_method_refuses_undeclared_or_clashing_classes():
    class Undeclared(PerturbationExplainer):
        def __init__(self, model, tokenizer=None, *, width: int = 2, **kwargs):
            super().__init__(model, tokenizer, perturbator=WindowMasks(width), aggregator=OcclusionAggregator(),
                             **kwargs)

    with pytest.raises(TypeError, match=r"without a declared constraint \['width'\]"):
        register_method(Undeclared)

    class Overdeclared(Occlusion):
        param_constraints = {"width": Int(min=1)}

    with pytest.raises(TypeError, match=r"not taken by the constructor \['width'\]"):
        register_method(Overdeclared)

    Clash = type("Occlusion", (Occlusion,), {})
    with pytest.raises(ValueError, match="already registered"):
        register_method(Clash)
    with pytest.raises(TypeError):
        register_method(WindowMasks)
    assert "Undeclared" not in METHODS and METHODS["Occlusion"] is Occlusion


# ----------------------------------------------------------------------------- a toy method from this file


class WindowMasks(MaskPerturbator):
    """Row 0 unperturbed, row ``1 + e`` masks elements ``e .. e + width - 1``."""

    first_row_is_clean = True
    param_constraints = {"width": Int(min=1)}

    def __init__(self, width: int = 2):
        check_values(self.param_constraints, {"width": width})
        self.width = int(width)

    def params(self) -> dict:
        return {"width": self.width}

    def masks(self, n_elements, rng):
        keep = np.ones((n_elements + 1, n_elements), dtype=bool)
        for e in range(n_elements):
            keep[1 + e, e: e + self.width] = False
        return keep, {}


class WindowOcclusion(PerturbationExplainer):
    """Occlusion of a window of ``width`` elements starting at each element (``width=1``: Occlusion)."""

    param_constraints = {"width": Int(min=1)}
    _stochastic = False

    def __init__(self, model, tokenizer=None, *, width: int = 2, **kwargs):
        super().__init__(model, tokenizer, perturbator=WindowMasks(width), aggregator=OcclusionAggregator(), **kwargs)


@pytest.fixture()
def window_occlusion():
    register_method(WindowOcclusion)
    yield WindowOcclusion
    unregister_method("WindowOcclusion")
    assert "WindowOcclusion" not in METHODS


def test_toy_method_registered_from_a_test_file(window_occlusion):
    clf = sentiment_classifier()  # the real MiniLM encoder with a trained sentiment head
    assert "WindowOcclusion" in available_methods()
    check_params("WindowOcclusion", {"width": 3, "batch_size": 4})
    with pytest.raises(ValueError, match="^width must be an int >= 1"):
        check_params("WindowOcclusion", {"width": 0})
    with pytest.raises(ValueError, match="^widht: unknown parameter of WindowOcclusion"):
        check_params("WindowOcclusion", {"widht": 2})

    explainers = build_explainers(clf, ["WindowOcclusion", "Occlusion"], params={"WindowOcclusion": {"width": 1}},
                                  batch_size=4, progress=False)
    text = "The hotel was lovely, but the food was awful."
    one, occ = (explainers[m](text, targets=1)[0] for m in ("WindowOcclusion", "Occlusion"))
    assert one.method == "WindowOcclusion" and one.params["width"] == 1
    np.testing.assert_array_equal(one.scores, occ.scores)  # same rows, same batches: the same numbers

    out = build_explainers(clf, ["WindowOcclusion"], params={"WindowOcclusion": {"width": 2}})["WindowOcclusion"](
        text, targets=1)[0]
    rid = clf.tokenizer.mask_token_id
    toks = out.element_tokens
    rows = [out.input_ids] + [masked(out.input_ids, [p for t in toks[e: e + 2] for p in t], rid)
                              for e in range(len(toks))]
    f = manual_scores(clf.model, rows, None, [1])[:, 0]
    np.testing.assert_allclose(out.scores[0], f[0] - f[1:], rtol=1e-4, atol=1e-4)

    table, _ = attribute_documents(clf, explainers, [0, 1], [text, ""], metrics=False)
    assert table.column("method").to_pylist() == ["WindowOcclusion", "Occlusion", "WindowOcclusion", "Occlusion"]
    assert table.column("error").to_pylist()[2:] == ["empty text", "empty text"]
