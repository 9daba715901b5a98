"""Static mixtures and mixture files (megamix.mixture), the static strategy's inputs."""
import json

import numpy as np
import pytest

from megamix.config import MixtureConfig
from megamix.mixture import (explicit_weights, initial_weights, load_mixture, natural_weights,
                             save_mixture, temperature_weights, uniform_weights)
from megamix.simplex import normalize, validate

NAMES = ["a", "b", "c"]
SIZES = {"a": 100.0, "b": 300.0, "c": 600.0}


def test_static_constructors():
    np.testing.assert_allclose(natural_weights(SIZES, NAMES), [0.1, 0.3, 0.6])
    np.testing.assert_allclose(uniform_weights(3), [1 / 3] * 3)
    np.testing.assert_allclose(temperature_weights(SIZES, 1.0, NAMES), [0.1, 0.3, 0.6])
    t2 = temperature_weights(SIZES, 2.0, NAMES)
    np.testing.assert_allclose(t2, np.sqrt([1, 3, 6]) / np.sqrt([1, 3, 6]).sum())
    big = temperature_weights(SIZES, 1e6, NAMES)
    np.testing.assert_allclose(big, [1 / 3] * 3, atol=1e-5)
    # huge sizes and small temperatures do not overflow
    w = temperature_weights([1e300, 1e299], 0.01)
    assert np.all(np.isfinite(w)) and w[0] > 0.999
    np.testing.assert_allclose(explicit_weights({"a": 0.5, "c": 0.5}, NAMES), [0.5, 0, 0.5])


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown domains"):
        explicit_weights({"zz": 1.0}, NAMES)
    with pytest.raises(ValueError, match="sum to 1"):
        explicit_weights({"a": 0.5}, NAMES)
    with pytest.raises(ValueError):
        natural_weights([0, 0, 0])
    with pytest.raises(ValueError):
        natural_weights({"a": 1.0}, NAMES)
    with pytest.raises(ValueError):
        temperature_weights(SIZES, 0.0, NAMES)
    with pytest.raises(ValueError):
        normalize([1.0, -1.0])
    with pytest.raises(ValueError):
        validate([0.5, 0.6])


def test_mixture_file_round_trip_and_validation(tmp_path):
    p = save_mixture(tmp_path / "m.json", NAMES, [0.2, 0.3, 0.5], "da2", {"note": "x"})
    w, doc = load_mixture(p, ["c", "a", "b"])  # order follows the caller
    np.testing.assert_allclose(w, [0.5, 0.2, 0.3])
    assert doc["method"] == "da2" and doc["meta"] == {"note": "x"}
    with pytest.raises(ValueError, match="missing"):
        load_mixture(p, ["a", "b", "c", "d"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"domains": ["a", "b"], "weights": {"a": 0.7, "b": 0.7}}))
    with pytest.raises(ValueError, match="sum to 1"):
        load_mixture(bad)
    np.testing.assert_allclose(load_mixture(bad, renormalize=True)[0], [0.5, 0.5])
    with pytest.raises(FileNotFoundError):
        load_mixture(tmp_path / "nope.json")
    with pytest.raises(ValueError):
        save_mixture(tmp_path / "x.json", NAMES, [0.5, 0.5, 0.5], "x")


def test_initial_weights_from_config(tmp_path):
    sizes = [100, 300, 600]
    assert np.allclose(initial_weights(MixtureConfig(kind="natural"), NAMES, sizes), [0.1, 0.3, 0.6])
    assert np.allclose(initial_weights(MixtureConfig(kind="uniform"), NAMES, sizes), 1 / 3)
    t = initial_weights(MixtureConfig(kind="temperature", temperature=2.0), NAMES, sizes)
    assert np.allclose(t, temperature_weights(sizes, 2.0))
    e = initial_weights(MixtureConfig(kind="explicit", weights={"a": 1.0}), NAMES, sizes)
    assert np.allclose(e, [1, 0, 0])
    p = save_mixture(tmp_path / "m.json", NAMES, [0.2, 0.3, 0.5], "regmix")
    assert np.allclose(initial_weights(MixtureConfig(kind="file", file=str(p)), NAMES, sizes), [0.2, 0.3, 0.5])
