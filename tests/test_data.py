import shutil

import numpy as np
import pytest

from cfmoe import data


def test_shipped_files_match_their_checksums():
    for name in data.CHECKSUMS:
        assert data.verified_file(name).is_file()


def test_altered_file_names_file_and_expected_checksum(tmp_path, monkeypatch):
    shutil.copytree(data.WIKITEXT_DIR, tmp_path / "wikitext-2")
    with open(tmp_path / "wikitext-2" / "test.raw.json", "a") as f:
        f.write(" ")
    monkeypatch.setattr(data, "WIKITEXT_DIR", tmp_path / "wikitext-2")
    data.verified_file.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"test.raw.json is corrupt or altered: sha256 [0-9a-f]{64}, expected 492b723e"):
            data.verified_file("test.raw.json")
    finally:
        data.verified_file.cache_clear()


def test_detokenize_undoes_wikitext_markers():
    text = ' = Title = \n \n It was a guest @-@ starring role ( 2000 ) , worth $ 1 @,@ 000 @.@ 5 . He said " hi " and John \'s dog didn \'t . \n'
    assert "It was a guest-starring role (2000), worth $1,000.5." in data.detokenize(text)
    assert "\"hi\"" in data.detokenize(text) and "John's dog" in data.detokenize(text)


def test_splits_have_60_articles_with_titles():
    valid, test = data.load_wikitext("validation"), data.load_wikitext("test")
    assert len(valid) == 60 and len(test) == 60
    assert valid[0]["title"] == "Homarus gammarus" and test[0]["title"] == "Robert Boulter"
    assert " @-@ " not in "".join(valid["text"]) and not test[0]["text"].startswith("=")


def test_unknown_split_and_source_are_rejected():
    with pytest.raises(ValueError, match=r"unknown WikiText split 'train'; valid splits are \['validation', 'test'\]"):
        data.load_wikitext("train")
    with pytest.raises(ValueError, match=r"unknown data source 'web'"):
        data.load_wikitext("test", source="web")


def test_pretraining_corpus_has_both_sources_and_no_test_article():
    corpus = data.pretraining_corpus()
    sources = set(corpus["source"])
    assert sources == {"wikitext2-validation", "wiki-lead-sections"}
    test_titles = {t.casefold() for t in data.load_wikitext("test")["title"]}
    assert not test_titles & {t.casefold() for t in corpus["title"]}
    assert len(corpus) > 10_000
    assert len(data.pretraining_corpus(max_documents=50)) == 50


def test_study_splits_are_disjoint_whole_articles_and_validation_is_never_trained_on():
    finetune, validation, test = (data.study_articles(s) for s in data.STUDY_SPLITS)
    wikitext_validation = data.load_wikitext("validation")
    assert len(finetune) + len(validation) == len(wikitext_validation)
    assert len(validation) == len(wikitext_validation) // data.HELDOUT_EVERY
    assert not set(finetune["text"]) & set(validation["text"])
    assert not set(validation["text"]) & set(test["text"])
    corpus = data.pretraining_corpus()
    trained = {t for t, h in zip(corpus["text"], corpus["heldout"]) if not h}
    assert not trained & set(validation["text"])
    assert set(validation["text"]) <= {t for t, h in zip(corpus["text"], corpus["heldout"]) if h}
    leads = [h for s, h in zip(corpus["source"], corpus["heldout"]) if s == "wiki-lead-sections"]
    assert 0.015 < sum(leads) / len(leads) < 0.025  # heldout_fraction 0.02 of the lead sections
    with pytest.raises(ValueError, match=r"unknown study split 'train'; valid splits are \['finetune', 'validation', 'test'\]"):
        data.study_articles("train")


def test_pack_blocks_records_document_boundaries():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    packed = data.pack_blocks(docs, block_size=4, eos_id=0)
    flat = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0]
    assert packed["input_ids"].tolist() == [flat[0:4], flat[4:8], flat[8:12]]
    # each token (and the EOS that closes its document) carries its document's index
    assert packed["document_ids"].tolist() == [[0, 0, 0, 0], [1, 1, 1, 2], [2, 2, 2, 2]]
    same_doc = packed["document_ids"][:, 1:] == packed["document_ids"][:, :-1]
    assert not same_doc[1, 2]  # the EOS of doc 1 and the first token of doc 2 are not a pair


def test_pack_blocks_rejects_short_corpora_and_blocks():
    with pytest.raises(ValueError, match="shorter than one block"):
        data.pack_blocks([[1, 2]], block_size=8, eos_id=0)
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        data.pack_blocks([[1, 2]], block_size=1, eos_id=0)


def test_entry_task_prompts_with_the_title_and_targets_the_article():
    task = data.entry_task("test")
    first = task[0]
    assert "Robert Boulter" in first["prompt"] and first["target"].startswith("Robert Boulter is an English")
    assert len(task) == 60 and np.all([t in p for t, p in zip(task["title"], task["prompt"])])
