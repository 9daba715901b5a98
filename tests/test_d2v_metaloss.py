"""Per-meta-domain targets measured on documents (megamix/domain2vec/metaloss.py) and the RegMix
predictor's handling of meta-domains without a target."""
import numpy as np
import pytest
import torch

from megamix.domain2vec.metaloss import assignment, doc_weights, meta_losses_from_docs, score_documents
from megamix.domain2vec.regmix import D2VRegMix, domain_to_meta_losses


def _cross_cutting():
    """Two domains, two meta-domains; inside each domain half the documents belong to each
    meta-domain and meta-domain 1's documents are harder (loss +2) in every proxy."""
    P = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.2, 0.8]])
    dom = np.array([0, 0, 1, 1])
    base = np.array([[1.0, 3.0, 1.5, 3.5], [2.0, 4.0, 2.2, 4.4], [0.5, 2.5, 1.0, 3.0]])  # [M proxies, N docs]
    return P, dom, base


def test_targets_differ_from_bayes_when_assignments_cut_across_domains():
    P, dom, D = _cross_cutting()
    w = np.array([0.5, 0.5])
    a = doc_weights(dom, w)
    np.testing.assert_allclose(a, 0.25)
    V_valid = np.stack([P[dom == k].mean(axis=0) for k in range(2)])  # both [0.5, 0.5]: domains look alike
    L = np.stack([D[:, dom == k].mean(axis=1) for k in range(2)], axis=1)
    bayes = domain_to_meta_losses(L, V_valid, w)
    hard = meta_losses_from_docs(D, P, a, "argmax")
    soft = meta_losses_from_docs(D, P, a, "proba")
    # the Bayes mapping cannot tell the meta-domains apart: both get the domain average
    np.testing.assert_allclose(bayes[:, 0], bayes[:, 1])
    # measured on documents, meta-domain 1 is the hard one, by exactly the planted +2
    np.testing.assert_allclose(hard, [[1.25, 3.25], [2.1, 4.2], [0.75, 2.75]])
    assert np.all(soft[:, 1] - soft[:, 0] > 1.0)
    assert np.abs(hard - bayes).max() > 0.9 and np.abs(soft - bayes).max() > 0.5


def test_proba_targets_decompose_the_document_loss_exactly_argmax_does_not():
    rng = np.random.default_rng(0)
    n, counts = 5, [3, 7, 4]                        # unequal documents per domain
    dom = np.repeat(np.arange(3), counts)
    P = rng.dirichlet(np.full(n, 0.5), size=len(dom))
    w = np.array([0.2, 0.5, 0.3])
    a = doc_weights(dom, w)
    q = w @ np.stack([P[dom == k].mean(axis=0) for k in range(3)])  # v_valid as `d2v vectorize` builds it
    D = rng.uniform(2, 6, size=(6, len(dom)))
    soft = meta_losses_from_docs(D, P, a, "proba")
    np.testing.assert_allclose(soft @ q, D @ a, rtol=1e-12)
    hard = meta_losses_from_docs(D, P, a, "argmax")
    ok = np.isfinite(hard[0])
    assert np.abs(hard[:, ok] @ (q[ok] / q[ok].sum()) - D @ a).max() > 1e-3
    W = assignment(P, "argmax")
    np.testing.assert_array_equal(W.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="argmax"):
        assignment(P, "bayes")
    with pytest.raises(ValueError, match="finite"):
        meta_losses_from_docs(np.full((1, len(dom)), np.nan), P, a)


def test_meta_domain_without_documents_has_no_target_and_regmix_renormalises_q():
    rng = np.random.default_rng(1)
    P = rng.dirichlet(np.ones(3), size=30)
    P[:, 2] *= 0.1                                   # meta-domain 2 is never anyone's argmax
    P /= P.sum(axis=1, keepdims=True)
    a = np.full(30, 1 / 30)
    R = rng.dirichlet(np.ones(2), size=12)
    D = 3 + R[:, :1] * rng.uniform(0, 1, size=(1, 30))  # document losses depend on the mixture
    Y = meta_losses_from_docs(D, P, a, "argmax")
    assert np.isnan(Y[:, 2]).all() and np.isfinite(Y[:, :2]).all()
    V = rng.dirichlet(np.ones(3), size=2)
    model = D2VRegMix(V, lgbm_params={"n_estimators": 20}).fit(R, Y)
    assert model.fitted.tolist() == [True, True, False] and model.models[2] is None
    q = np.array([0.3, 0.5, 0.2])
    meta = model.predict_meta(R)
    assert np.isnan(meta[:, 2]).all()
    np.testing.assert_allclose(model.predict(R, q), meta[:, :2] @ (q[:2] / 0.8), rtol=1e-12)
    with pytest.raises(ValueError, match="no mass"):
        model.predict(R, np.array([0.0, 0.0, 1.0]))
    Y[0, 1] = np.nan
    with pytest.raises(ValueError, match="some proxies only"):
        D2VRegMix(V).fit(R, Y)


def _tiny_lm(vocab=64, seq=12):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0))


def test_score_documents_is_the_mean_token_loss_and_padding_free():
    import torch.nn.functional as F

    model = _tiny_lm()
    rng = np.random.default_rng(0)
    toks = [rng.integers(0, 64, size=L) for L in (2, 5, 13, 9, 13, 3)]
    batched = score_documents(model, toks, batch_size=4)
    one = np.array([score_documents(model, [t], batch_size=1)[0] for t in toks])
    np.testing.assert_allclose(batched, one, rtol=1e-5)
    t = torch.as_tensor(toks[2])
    with torch.no_grad():
        logits = model(input_ids=t[None, :-1], position_ids=torch.arange(12)[None]).logits[0]
    np.testing.assert_allclose(batched[2], float(F.cross_entropy(logits, t[1:])), rtol=1e-5)
    assert model.training  # the model's mode is restored
