"""End-to-end Regroup on ~54 short real documents with the MiniLM embedder (offline), through the
CLI: embeddings -> k sweep by silhouette -> cluster_XX corpus + token store + report + PNG."""
import json

import numpy as np
import pytest

from megamix.cli import main
from megamix.data.store import TokenStore
from megamix.data.testing import build_tiny_store


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rg") / "data"
    build_tiny_store(root, domains=("code_python", "legal", "changelogs"), max_docs=18,
                     max_doc_chars=800)
    return root


def test_regroup_cli_minilm(tiny_data, tmp_path, capsys):
    out = tmp_path / "regrouped"
    rc = main(["regroup", "--data-dir", str(tiny_data), "--out-dir", str(out), "--k", "2,3,4",
               "--max-tokens", "64", "--no-progress"])
    assert rc == 0
    assert "best k" in capsys.readouterr().out
    rep = json.loads((out / "regroup" / "report.json").read_text())
    sil = {int(k): v["silhouette"] for k, v in rep["per_k"].items()}
    assert set(sil) == {2, 3, 4} and rep["best_k"] == max(sil, key=sil.get)
    assert all(-1 <= s <= 1 for s in sil.values()) and sil[rep["best_k"]] > 0
    k = rep["best_k"]
    store = TokenStore(out / "tokens")
    assert store.domains == [f"cluster_{c:02d}" for c in range(k)]
    src = TokenStore(tiny_data / "tokens")
    for split in ("train", "valid"):
        n_src = sum(src.num_docs(d, split) for d in src.domains)
        assert sum(store.num_docs(d, split) for d in store.domains) == n_src
    assert 40 <= rep["documents"] <= 60
    # the clusters follow the (very different) source domains: majority purity
    cont = rep["contingency"]
    table = np.array([[cont[d].get(c, 0) for c in rep["clusters"]] for d in sorted(cont)])
    purity = table.max(axis=0).sum() / table.sum()
    assert purity >= 0.8, (purity, cont)
    png = out / "regroup" / "regroup.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert len((out / "regroup" / "mapping.jsonl").read_text().splitlines()) == rep["documents"]
    shard = out / "regroup" / "shards" / "rank00000-of-00001.npy"
    assert np.load(shard, mmap_mode="r").shape == (rep["documents"], 384)
