"""Product search: Lucene BM25 as WebShop's pyserini index scores it, in numpy.

The original indexes, per product, ``(Title + " " + Description + " " + BulletPoints[0] + " " +
option_text).lower()`` with pyserini's defaults and returns the top 50 hits. We reproduce that
index's scoring rather than call a generic BM25 library, because three Lucene details change the
ranking on this catalog:

* analysis: Anserini's default English analyzer = StandardTokenizer (Unicode word breaks: "3.5oz",
  "women's" stay one token, hyphens split), possessive "'s" removal, lower-case, Lucene's 33 English
  stop words, Porter stemmer (``PyStemmer``'s "porter", the original algorithm);
* BM25 (Lucene 8, k1 = 0.9, b = 0.4): idf = ln(1 + (N - df + .5) / (df + .5)), per-term score
  w - w / (1 + tf / (k1 (1 - b + b dl / avgdl))) in float32, where ``dl`` is the document length
  *after* Lucene's one-byte norm encoding (``SmallFloat.intToByte4``: exact below 24 tokens, then 4
  significant bits) - a generic BM25 uses the exact length, which reorders near-ties;
* query: repeated query terms count once per occurrence (Anserini boosts a term by its count); only
  documents matching a term are hits; equal scores rank by index order (Lucene's doc id).
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import Stemmer  # PyStemmer

from .data import Product

SEARCH_RETURN_N = 50  # engine.SEARCH_RETURN_N
K1, B = 0.9, 0.4  # pyserini LuceneSearcher defaults

# org.apache.lucene.analysis.en.EnglishAnalyzer.ENGLISH_STOP_WORDS_SET
LUCENE_STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then "
    "there these they this to was will with".split()
)

# UAX#29-like words: runs of word characters, joined across . : ' (U+2019) between letters and
# across . , ; ' between digits ("u.s.a", "women's", "3.5", "1,000"); anything else separates.
_LETTER = r"[^\W\d]"
_WORD_RE = re.compile(
    rf"\w+(?:(?:(?<={_LETTER})[.:'\u2019](?={_LETTER})|(?<=\d)[.,;'\u2019](?=\d))\w+)*"
)
_POSSESSIVE_RE = re.compile(r"['\u2019\uff07][sS]$")  # EnglishPossessiveFilter runs before lower-casing


class LuceneAnalyzer:
    """Text -> index terms, as Anserini's DefaultEnglishAnalyzer."""

    def __init__(self) -> None:
        self._stemmer = Stemmer.Stemmer("porter")

    def __call__(self, text: str) -> list[str]:
        words = [_POSSESSIVE_RE.sub("", w).lower() for w in _WORD_RE.findall(text)]
        return self._stemmer.stemWords([w for w in words if w and w not in LUCENE_STOP_WORDS])


def _int_to_byte4(i: int) -> int:
    """org.apache.lucene.util.SmallFloat.intToByte4 (norm encoding of a length)."""
    free_values = 24  # 255 - longToInt4(Integer.MAX_VALUE)
    if i < free_values:
        return i
    i -= free_values
    num_bits = i.bit_length()
    if num_bits < 4:
        encoded = i
    else:
        shift = num_bits - 4
        encoded = ((i >> shift) & 0x07) | ((shift + 1) << 3)
    return free_values + encoded


def _byte4_to_int(b: int) -> int:
    """SmallFloat.byte4ToInt: the length a norm byte stands for."""
    free_values = 24
    if b < free_values:
        return b
    i = b - free_values
    bits, shift = i & 0x07, (i >> 3) - 1
    return free_values + (bits if shift == -1 else (bits | 0x08) << shift)


def product_document(p: Product) -> str:
    """The indexed text of a product (search_engine/convert_product_file_format.py)."""
    option_text = ", and ".join(f"{name}: {', '.join(values)}" for name, values in p.options.items())
    first_bullet = p.bullet_points[0] if p.bullet_points else ""
    return " ".join([p.title, p.description, first_bullet, option_text]).lower()


class SearchEngine:
    """BM25 over a fixed document list; ``search`` returns document indices, best first."""

    def __init__(self, documents: list[str], k1: float = K1, b: float = B) -> None:
        self.analyze = LuceneAnalyzer()
        self.n_docs = len(documents)
        postings: dict[str, tuple[list[int], list[int]]] = {}
        lengths = np.zeros(self.n_docs, dtype=np.int64)
        for doc_id, text in enumerate(documents):
            terms = self.analyze(text)
            lengths[doc_id] = len(terms)
            for term, tf in Counter(terms).items():
                ids, tfs = postings.setdefault(term, ([], []))
                ids.append(doc_id)
                tfs.append(tf)
        self._postings = {t: (np.array(ids), np.array(tfs, dtype=np.float32)) for t, (ids, tfs) in postings.items()}
        # BM25Similarity: avgdl from exact totals; each doc's length through its norm byte
        f32 = np.float32
        avgdl = f32(lengths.sum() / max(self.n_docs, 1))
        decoded = np.array([_byte4_to_int(_int_to_byte4(int(n))) for n in lengths], dtype=np.float32)
        self._norm_inverse = f32(1.0) / (f32(k1) * ((f32(1.0) - f32(b)) + f32(b) * decoded / avgdl))

    @property
    def n_terms(self) -> int:
        return len(self._postings)

    def idf(self, term: str) -> np.float32:
        df = len(self._postings[term][0])
        return np.float32(np.log(1.0 + (self.n_docs - df + 0.5) / (df + 0.5)))

    def scores(self, query: str) -> np.ndarray:
        """Lucene score of every document (0 where no query term matches)."""
        total = np.zeros(self.n_docs, dtype=np.float64)  # Lucene sums clause scores in double
        for term, count in Counter(self.analyze(query)).items():
            if term not in self._postings:
                continue
            ids, tfs = self._postings[term]
            weight = np.float32(count) * self.idf(term)
            total[ids] += weight - weight / (np.float32(1.0) + tfs * self._norm_inverse[ids])
        return total.astype(np.float32)

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> list[int]:
        scores = self.scores(query)
        hits = np.flatnonzero(scores > 0)
        # best score first, ties by doc id (stable sort over ascending ids)
        order = hits[np.argsort(-scores[hits], kind="stable")]
        return order[:k].tolist()
