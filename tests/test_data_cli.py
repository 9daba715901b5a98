"""`megamix data ...` through the real CLI entry point."""
import json

from megamix.cli import main


def test_cli_build_import_stats(tmp_path, capsys):
    d = str(tmp_path / "data")
    rc = main(["data", "build", "--data-dir", d, "--domains", "legal,code_c", "--cap-mb", "0.03"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "legal" in out and "code_c" in out and "total" in out
    assert (tmp_path / "data/tokens/legal/train.idx").is_file()
    src = tmp_path / "mine.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"my own document {i} " * 5}) for i in range(20)))
    assert main(["data", "import", "--data-dir", d, "--domain", "mine", "--from", str(src)]) == 0
    assert "imported domain 'mine'" in capsys.readouterr().out
    assert main(["data", "stats", "--data-dir", d]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "legal" in out
    assert main(["data", "tokenize", "--data-dir", d]) == 0
    assert "3 domains" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys, monkeypatch):
    from megamix.data.fetch import AptFetcher, MissingPackageError

    def boom(self, pkg):
        raise MissingPackageError({pkg: "no network"})

    monkeypatch.setattr(AptFetcher, "fetch", boom)
    d = str(tmp_path / "data")
    assert main(["data", "build", "--data-dir", d, "--domains", "quotes_de", "--cap-mb", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "fortunes-de" in err and "quotes_de" in err
    assert main(["data", "build", "--data-dir", d, "--domains", "nope"]) == 2
    assert "unknown domain" in capsys.readouterr().err
    assert main(["data", "stats", "--data-dir", d]) == 2
    assert main(["data", "import", "--data-dir", d, "--domain", "x", "--from", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "build", "--list"]) == 0
    assert "dictionary" in capsys.readouterr().out


def test_cli_import_megatron(tmp_path, capsys):
    import numpy as np

    from megamix.data.store import TokenStore
    from megamix.data.token_store import write_documents

    write_documents(tmp_path / "m_text_document", [[15496, 995, 50256], [464, 2068, 7586, 50256], [40, 50256]],
                    np.uint16)
    d = str(tmp_path / "data")
    assert main(["data", "import", "--data-dir", d, "--domain", "mega", "--from",
                 str(tmp_path / "m_text_document")]) == 0  # format guessed from the .idx next to it
    store = TokenStore(tmp_path / "data" / "tokens")
    assert store.num_docs("mega", "train") + store.num_docs("mega", "valid") == 3
    assert main(["data", "import", "--data-dir", d, "--domain", "m2", "--from", str(tmp_path / "m_text_document"),
                 "--format", "megatron", "--vocab-size", "32000"]) == 2
    assert "vocab-size mismatch" in capsys.readouterr().err


def test_cli_tokenizer_option(tmp_path, capsys, minilm_tokenizer):
    d = str(tmp_path / "data")
    assert main(["data", "build", "--data-dir", d, "--domains", "legal", "--cap-mb", "0.02", "--no-tokenize"]) == 0
    capsys.readouterr()
    assert main(["data", "tokenize", "--data-dir", d, "--tokenizer", str(minilm_tokenizer)]) == 0
    assert "vocab 30522, uint16" in capsys.readouterr().out
    src = tmp_path / "mine.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"my own document {i} " * 5}) for i in range(20)))
    # the store records MiniLM: an import without --tokenizer uses it; another tokenizer is refused
    assert main(["data", "import", "--data-dir", d, "--domain", "mine", "--from", str(src)]) == 0
    capsys.readouterr()
    assert main(["data", "import", "--data-dir", d, "--domain", "other", "--from", str(src), "--tokenizer", "gpt2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "would mix tokenizers" in err and "Traceback" not in err
    assert not (tmp_path / "data" / "corpus" / "other").exists()   # refused before anything was written
