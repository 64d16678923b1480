"""Title nouns for the type reward's title score.

The original tags both titles with spaCy ``en_core_web_sm`` and keeps the lower-cased tokens tagged
NOUN / PROPN (a list: repeated nouns count in the denominator of the title score). No trustworthy
copy of that model is available offline, so the default here is a documented rule-based fallback;
``title_nouns="spacy"`` uses the real model where it is installed.

Fallback ("rules"):
1. tokenize roughly as spaCy does: runs of letters/digits, split at hyphens, slashes and other
   punctuation; a clitic after an apostrophe ("women's", "don't") is dropped;
2. keep tokens with a letter and at least 2 characters (spaCy tags numbers NUM, stray letters X/SYM);
3. drop closed-class words (determiners, pronouns, prepositions, conjunctions, auxiliaries, number
   words, a few adverbs) - spaCy never tags those NOUN/PROPN in titles;
4. drop *lower-case* words with non-noun morphology (adverbs in -ly, participles in -ed, adjective
   suffixes -ous/-ful/-less/-ive/-able/-ible), bar a short list of nouns with those endings.
   Capitalised words are kept: on Title-Case product titles taggers (spaCy's small model included)
   tag most capitalised words PROPN, so a capitalised "Padded" or "Natural" counts as a noun there.

Effect on the reward (method in ``measure.py``; 500 test goals x (goal product + top-10 search hits
of the instruction) = 5,046 likely purchases): the title score only matters when the bought product
is not the goal's, and then only through r_type's thresholds (0, 0.1, 0.2).
* vs all content words (no morphology filter): title score differs on 2.7% of purchases, r_type and
  score on 0.02%, won never;
* vs a real POS tagger (TextBlob's Brill-style PatternTagger on the same tokens): title score differs
  on 54%, r_type on 5.1%, score on 4.3% (mean |diff| 0.014), won on 0.06% (3 of 5,046).
So success rates do not depend on the matcher in practice; scores of wrong-product purchases move a
little. spaCy itself could not be run here; ``title_nouns="spacy"`` removes the question where it can.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable

NounMatcher = Callable[[str], list[str]]

# spaCy-like tokens: words (digits joined across . and , as in "2.4ghz", "1,000"; a clitic after an
# apostrophe kept with its word, dropped later) and single punctuation marks (hyphens, slashes and
# commas between letters split words, as spaCy's infix rules do)
_TOKEN_RE = re.compile(r"[^\W_]+(?:(?<=\d)[.,](?=\d)[^\W_]+)*(?:['\u2019][^\W_]+)?|[^\w\s]")
_CLITIC_RE = re.compile(r"['\u2019].*$")

CLOSED_CLASS_WORDS = frozenset(
    """
    a an the this that these those each every either neither some any no all both half another such what which whose
    i me my mine we us our ours you your yours he him his she her hers it its they them their theirs one ones
    myself yourself itself themselves ourselves who whom whoever whatever whichever
    about above across after against along amid among around as at before behind below beneath beside besides
    between beyond but by despite down during except for from in inside into like near of off on onto out outside
    over past per since than through throughout till to toward towards under underneath unlike until up upon via
    with within without
    and or nor so yet plus vs versus if because while whereas although though unless whether
    be am is are was were been being have has had having do does did done doing will would shall should can could
    may might must ought
    not very too also just only even still already again ever never always often more most less least much many
    few several other else how when where why there here then now
    two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred thousand
    don doesn didn isn aren wasn weren won wouldn shouldn couldn cannot
    """.split()
)

# lower-case nouns whose endings look like adverbs / participles / adjectives
_NOUN_EXCEPTIONS = frozenset(
    """
    family supply assembly jelly belly butterfly lily holly dolly rally ally fly poly italy reply anomaly
    bed shed sled seed need feed speed weed reed steed bred
    """.split()
)
_NON_NOUN_SUFFIX_RE = re.compile(r"(?:ly|ed|ous|ful|less|ive|able|ible)$")


def tokens(title: str) -> list[str]:
    """Words (clitics removed, case kept) and punctuation marks, in order."""
    return [_CLITIC_RE.sub("", t) for t in _TOKEN_RE.findall(title)]


def _is_content_word(word: str) -> bool:
    lower = word.lower()
    return len(lower) >= 2 and any(c.isalpha() for c in lower) and lower not in CLOSED_CLASS_WORDS


def rule_nouns(title: str) -> list[str]:
    """Lower-cased likely nouns of a title, in order, with repeats (the rule-based fallback)."""
    nouns = []
    for word in tokens(title):
        if not _is_content_word(word):
            continue
        lower = word.lower()
        if word.islower() and lower not in _NOUN_EXCEPTIONS and len(lower) > 4 and _NON_NOUN_SUFFIX_RE.search(lower):
            continue
        nouns.append(lower)
    return nouns


def content_words(title: str) -> list[str]:
    """Alternative used in the measurement: every token kept by steps 1-3 (no morphology filter)."""
    return [w.lower() for w in tokens(title) if _is_content_word(w)]


@lru_cache(maxsize=1)
def _spacy_pipeline():  # pragma: no cover - needs the model, absent offline
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except (ImportError, OSError) as e:
        raise RuntimeError(
            "webshop.title_nouns='spacy' needs spaCy and its en_core_web_sm model installed; "
            "use title_nouns='rules' otherwise"
        ) from e


def spacy_nouns(title: str) -> list[str]:
    """The original: lower-cased tokens tagged NOUN / PROPN by en_core_web_sm."""
    return [t.text.lower() for t in _spacy_pipeline()(title) if t.pos_ in ("PNOUN", "NOUN", "PROPN")]


NOUN_MATCHERS: dict[str, NounMatcher] = {"rules": rule_nouns, "spacy": spacy_nouns}


def cached(matcher: NounMatcher) -> Callable[[str], tuple[str, ...]]:
    """Titles repeat (1,000 products): tag each once per process (immutable result)."""

    @lru_cache(maxsize=None)
    def nouns(title: str) -> tuple[str, ...]:
        return tuple(matcher(title))

    return nouns
