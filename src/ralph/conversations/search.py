"""Message search by words: what a model (or a person) asks for is rarely a passage as it was
written ("cat Miso" for "I have a cat named Miso"). Each word of the query may match; messages
matching more of them come first, then the newest."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ralph.conversations.models import Message

_WORD = re.compile(r"\w+", re.UNICODE)
# words that match nearly every message: they neither find nor rank anything
_STOP_WORDS = (
    "a an and are as at be but by did do does for from had has have he her him his i if in "
    "is it its me my no not of on or our she so that the their them they this to was we "
    "were what when where which who why will with you your user users message messages"
)
_STOP = frozenset(_STOP_WORDS.split())


def query_words(query: str) -> list[str]:
    """The query's words that can find something, lowercased, each once, in order."""
    found: list[str] = []
    for word in _WORD.findall(query.lower()):
        if word not in _STOP and word not in found:
            found.append(word)
    return found


_SUFFIXES = ("ies", "es", "ed", "ing", "s")


def stem(word: str) -> str:
    """`word` without a common English ending ("cats" -> "cat", "named" -> "nam"), for
    counting the words a message holds as a stemming full-text index would."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def with_stems(words: Sequence[str]) -> list[tuple[str, str]]:
    """Each word with its stem, computed once for the texts it is looked for in."""
    return [(word, stem(word)) for word in words]


def found_in(text: str, forms: Sequence[tuple[str, str]]) -> int:
    """How many of the words (`with_stems`) lowercase `text` holds, each as written or as
    its stem, as part of a word."""
    return sum(1 for word, stemmed in forms if word in text or stemmed in text)


def ranked(
    messages: Sequence[Message], words: Sequence[str], limit: int, *, matched: bool = False
) -> list[Message]:
    """`messages` that contain at least one of `words` or its stem (case-insensitive), those
    containing more of them first, then the newest; at most `limit`. `matched`: the messages
    are known matches (a full-text index found them), kept even when no word is seen here."""
    forms = with_stems(words)
    scored: list[tuple[int, int, Message]] = []
    for message in messages:
        hits = found_in(message.content.lower(), forms)
        if matched:
            hits = max(hits, 1)
        if hits:
            scored.append((hits, message.id, message))
    scored.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [message for _, _, message in scored[:limit]]
