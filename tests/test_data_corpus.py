"""Corpus builder: local sources with a tiny cap, dedup/split, idempotency, missing packages."""
import json
import warnings

import pytest

from megamix.data import corpus as corpus_mod
from megamix.data.corpus import assign_splits, build_corpus, dedup_key, normalize_text, write_domain
from megamix.data.fetch import AptFetcher, MissingPackageError
from megamix.data.sources import DEFAULT_DOMAINS, LOCAL_DOMAINS, SOURCES, read_dictd


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_domains_are_many_and_distinct():
    assert len(DEFAULT_DOMAINS) >= 8
    assert set(LOCAL_DOMAINS) >= {"code_python", "legal", "changelogs", "manpages", "code_c"}
    for name, s in SOURCES.items():
        assert s.license and s.description and s.source_paths, name


def test_build_local_domains_tiny_cap(tmp_path):
    doms = ["code_c", "legal"]
    stats = build_corpus(tmp_path, doms, cap_mb=0.05, valid_fraction=0.2, seed=3, progress=False)
    for d in doms:
        e = stats["domains"][d]
        total = e["train"]["bytes"] + e["valid"]["bytes"]
        assert 0 < total <= 50_000  # cap honoured
        assert e["train"]["docs"] >= 1 and e["valid"]["docs"] >= 1
        assert e["provenance"]["source_paths"] and e["provenance"]["license"]
        rows = _rows(tmp_path / "corpus" / d / "train.jsonl") + _rows(tmp_path / "corpus" / d / "valid.jsonl")
        assert len(rows) == e["train"]["docs"] + e["valid"]["docs"]
        keys = [dedup_key(r["text"]) for r in rows]
        assert len(set(keys)) == len(keys)  # no exact duplicates, not even across splits
        assert sum(len(r["text"].encode()) for r in rows) == total
    assert any(p["package"] == "libc6-dev" and p["version"] for p in
               stats["domains"]["code_c"]["provenance"]["packages"])
    # idempotent: second call reuses, files untouched
    mtime = (tmp_path / "corpus" / "legal" / "train.jsonl").stat().st_mtime_ns
    again = build_corpus(tmp_path, doms, cap_mb=0.05, valid_fraction=0.2, seed=3, progress=False)
    assert (tmp_path / "corpus" / "legal" / "train.jsonl").stat().st_mtime_ns == mtime
    assert again["domains"]["legal"]["build_key"] == stats["domains"]["legal"]["build_key"]
    # a different seed changes the sample/split and rebuilds
    other = build_corpus(tmp_path, ["legal"], cap_mb=0.05, valid_fraction=0.2, seed=4, progress=False)
    assert other["domains"]["legal"]["build_key"] != stats["domains"]["legal"]["build_key"]


def test_write_domain_dedup_split_and_errors(tmp_path):
    docs = [(f"document number {i}\n" * 3, f"s{i}") for i in range(200)]
    docs += [("document number 5\n" * 3, "dup"), ("  document   number 5\n" * 3 + "  ", "dup-ws"), ("tiny", "short")]
    e = write_domain(tmp_path, "syn", docs, cap_bytes=None, valid_fraction=0.1, seed=1, progress=False)
    assert e["duplicates_dropped"] == 2 and e["short_dropped"] == 1
    assert e["train"]["docs"] + e["valid"]["docs"] == 200
    assert 5 <= e["valid"]["docs"] <= 40
    # the split is a function of (seed, text), not of the input order
    e2 = write_domain(tmp_path / "b", "syn", list(reversed(docs)), cap_bytes=None, valid_fraction=0.1,
                      seed=1, progress=False)
    v1 = {r["text"] for r in _rows(tmp_path / "corpus/syn/valid.jsonl")}
    v2 = {r["text"] for r in _rows(tmp_path / "b/corpus/syn/valid.jsonl")}
    assert v1 == v2 and e2["valid"]["docs"] == e["valid"]["docs"]
    with pytest.raises(corpus_mod.EmptyDomainError):
        write_domain(tmp_path, "empty", [("x", "s")], cap_bytes=None, valid_fraction=0.1, seed=1,
                     progress=False)
    with pytest.raises(ValueError, match="domain name"):
        write_domain(tmp_path, "../evil", docs, cap_bytes=None, valid_fraction=0.1, seed=1, progress=False)


def test_split_keeps_both_sides():
    keys = [dedup_key(f"d{i}") for i in range(3)]
    s = assign_splits(keys, seed=0, valid_fraction=0.01)
    assert s.count(True) == 1 and s.count(False) == 2
    assert assign_splits(keys[:1], 0, 0.99) == [False]


def test_normalize():
    assert normalize_text("a  \r\nb\t \r\n\n") == "a\nb"
    assert normalize_text("e\u0301") == "\u00e9"


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    def boom(self, pkg):
        raise MissingPackageError({pkg: "E: Unable to locate package " + pkg})

    monkeypatch.setattr(AptFetcher, "fetch", boom)
    f = AptFetcher(tmp_path / "cache")
    with pytest.raises(MissingPackageError) as ei:
        build_corpus(tmp_path, ["legal", "dictionary", "lexicon_computing"], cap_mb=0.02, fetcher=f,
                     progress=False)
    msg = str(ei.value)
    for s in ("dict-gcide", "dict-foldoc", "dict-jargon", "dictionary", "lexicon_computing", "--skip-missing"):
        assert s in msg
    assert not (tmp_path / "corpus" / "legal").exists()  # fails before doing any work
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        stats = build_corpus(tmp_path, ["legal", "dictionary"], cap_mb=0.02, fetcher=f, skip_missing=True,
                             progress=False)
    assert any("SKIPPING" in str(x.message) and "dictionary" in str(x.message) for x in w)
    assert set(stats["domains"]) == {"legal"}
    # no fetcher at all (library use without network) is also an error naming the package
    with pytest.raises(MissingPackageError, match="dict-gcide"):
        build_corpus(tmp_path, ["dictionary"], cap_mb=0.02, fetcher=None, progress=False)


def test_fetcher_offline_and_cache(tmp_path):
    f = AptFetcher(tmp_path / "cache", offline=True)
    with pytest.raises(MissingPackageError, match="offline"):
        f.fetch("fortunes")


def test_dictd_reader(tmp_path):
    import gzip
    body = b"alpha\n   first letter\n" + b"beta\n   second\n"
    (tmp_path / "t.dict.dz").write_bytes(gzip.compress(body))
    # dictd base64 numbers: 'A'=0, 'W'=22, 'X'=23, 'P'=15
    (tmp_path / "t.index").write_text("00-database-short\tA\tB\nalpha\tA\tW\nalias\tA\tW\nbeta\tW\tP\n")
    ents = read_dictd(tmp_path / "t.dict.dz", tmp_path / "t.index")
    assert ents == [("alpha", "alpha\n   first letter\n"), ("beta", "beta\n   second\n")]


def test_missing_python_reader_package(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(corpus_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "rdata" else real(name, *a))
    with pytest.raises(MissingPackageError) as ei:
        build_corpus(tmp_path, ["novels"], cap_mb=0.01, fetcher=None, progress=False)
    assert "rdata==1.1.0" in str(ei.value) and "r-cran-janeaustenr" in str(ei.value)
    assert "novels" in str(ei.value)


@pytest.mark.slow
def test_build_every_default_domain_with_apt(tmp_path):
    """Needs apt access (Debian mirror): fetches the packages and builds every default domain."""
    import shutil
    if shutil.which("apt-get") is None:
        pytest.skip("no apt-get")
    f = AptFetcher(tmp_path / "cache")
    try:
        f.fetch("fortunes-de")
    except MissingPackageError as e:
        pytest.skip(f"no apt access: {e}")
    stats = build_corpus(tmp_path, list(DEFAULT_DOMAINS), cap_mb=0.05, fetcher=f, progress=False)
    assert set(stats["domains"]) == set(DEFAULT_DOMAINS)
    for d, e in stats["domains"].items():
        assert e["train"]["docs"] >= 1 and e["valid"]["docs"] >= 1, d
        for p in e["provenance"]["packages"]:
            assert p["version"], (d, p)
