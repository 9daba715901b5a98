"""One owner for the domain weights: the strategy's weights are exactly the loader's, the drift bound of
a prior is part of the strategy's update, and the loader's history is the one weight history."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megamix.config import MegamixConfig

NAMES = ["changelogs", "code_python", "legal", "manpages"]
PRIOR = np.array([0.1, 0.2, 0.3, 0.4])
MAX_DRIFT = 0.05


def _cfg(data_dir: Path, prior_path: Path, *extra: str) -> MegamixConfig:
    ov = [f"data.data_dir={data_dir}", "model.seq_len=32", "train.global_batch_size=16",
          "train.micro_batch_size=8", "projection.k1=4", "projection.k2=4", "mixing.strategy=rnb",
          "mixing.update_every=1", "mixing.rnb_lambda=20", "mixing.min_weight=0.01", "mixture.kind=file",
          f"mixture.file={prior_path}", *extra]
    return MegamixConfig.from_yaml(None, ov).validate()


def _feed(mixer, step: int) -> None:
    """One optimizer step of synthetic projected gradients: one direction per domain, so R&B moves."""
    rng = np.random.default_rng(step)
    centers = np.eye(len(NAMES), mixer.k) * np.array([[4.0], [1.0], [0.5], [0.2]])
    for batch in mixer.next_step():
        d = batch.domain_ids.numpy()
        g = centers[d] + 0.1 * rng.normal(size=(len(d), mixer.k))
        mixer.stats.update(torch.tensor(g, dtype=torch.float32), batch.domain_ids)
    mixer.step(step)


def _check_one_owner(mixer) -> None:
    w = mixer.weights
    assert not hasattr(mixer.strategy, "weights")     # one owner: the strategy keeps no copy of its own
    step, last = mixer.weight_history[-1]
    assert last == w.tolist() and step <= mixer.loader.step
    assert np.all(np.abs(w - PRIOR) <= MAX_DRIFT + 1e-12) and w.min() >= 0.01 - 1e-12


@pytest.fixture()
def prior_file(tmp_path):
    from megamix.mixture import write_mixture

    path = tmp_path / "prior.json"
    write_mixture(path, NAMES, PRIOR, "da2", {}, max_drift=MAX_DRIFT)
    return path


def test_strategy_weights_are_the_loader_weights_under_a_drift_bound(tiny_store, prior_file):
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer

    store = TokenStore(tiny_store)
    cfg = _cfg(Path(tiny_store).parent, prior_file)
    mixer = Mixer(cfg, store)
    assert mixer.max_drift == MAX_DRIFT and mixer.strategy.max_drift == MAX_DRIFT
    _check_one_owner(mixer)
    for step in range(4):
        _feed(mixer, step)
        _check_one_owner(mixer)
    # the bound was active: R&B (λ=20) would go much further than prior ± 0.05
    assert np.isclose(np.abs(mixer.weights - PRIOR).max(), MAX_DRIFT, atol=1e-9)
    assert len(mixer.weight_history) >= 2
    with pytest.raises(AttributeError):
        mixer.weight_history = []  # read-only: the loader owns it
    assert not hasattr(mixer.strategy, "history")

    # a checkpoint carries the history once (in the loader) and resumes to the same weights
    sd = copy.deepcopy(mixer.state_dict())
    assert "weight_history" not in sd and "history" not in sd["strategy"]
    resumed = Mixer(cfg, store)
    resumed.load_state_dict(sd)
    assert resumed.weight_history == mixer.weight_history
    _check_one_owner(resumed)
    for step in range(4, 6):
        _feed(mixer, step)
        _feed(resumed, step)
        _check_one_owner(resumed)
        np.testing.assert_array_equal(resumed.weights, mixer.weights)
    assert resumed.weight_history == mixer.weight_history


def test_bad_max_drift_in_the_prior_is_a_clear_error(tiny_store, tmp_path):
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer

    path = tmp_path / "prior.json"
    doc = {"domains": NAMES, "weights": dict(zip(NAMES, PRIOR.tolist())), "method": "da2",
           "meta": {"max_drift": 3}}
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="meta.max_drift must be in"):
        Mixer(_cfg(Path(tiny_store).parent, path), TokenStore(tiny_store))
