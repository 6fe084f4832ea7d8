"""The language of a document, as an ISO 639-1 code ('en', 'id', 'de'), by `lingua` (documents extra),
which ships its models inside its package: nothing is downloaded, and short texts are handled well.

The detector is built once per process; its models load lazily, language by language, as texts need them.
"""

from __future__ import annotations

from functools import lru_cache

UNKNOWN = "unknown"
SAMPLE_CHARS = 4000  # enough to tell a language apart; a whole book would only cost time


@lru_cache(maxsize=1)
def _detector():
    from lingua import LanguageDetectorBuilder

    # Low-accuracy mode reads trigrams only: all 75 languages load in seconds instead of more than a minute,
    # and for texts longer than a sentence or two its accuracy is that of the full models.
    return LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()


def detect_language(text: str) -> str:
    """ISO 639-1 code of the text's language, or 'unknown' when lingua cannot tell."""
    language = _detector().detect_language_of(text[:SAMPLE_CHARS])
    return language.iso_code_639_1.name.lower() if language is not None else UNKNOWN


def bytes_per_token_by_language(tokenizer, texts) -> dict[str, dict]:
    """{language: {documents, bytes, tokens, bytes_per_token}} of `texts` under `tokenizer` (anything with
    `encode`): how well the tokenizer serves each language; more bytes per token is a cheaper language."""
    totals: dict[str, dict] = {}
    for text in texts:
        entry = totals.setdefault(detect_language(text), {"documents": 0, "bytes": 0, "tokens": 0})
        entry["documents"] += 1
        entry["bytes"] += len(text.encode("utf-8", "surrogatepass"))
        entry["tokens"] += len(tokenizer.encode(text))
    for entry in totals.values():
        entry["bytes_per_token"] = round(entry["bytes"] / max(1, entry["tokens"]), 3)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]["bytes"]))
