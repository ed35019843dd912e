"""Cleaning catalogue text: entities, tags, edition notes and invisible characters out; titles keyed for dedupe.

Pure functions over strings, with no I/O: clean_text, clean_title, title_key (the dedupe and split key) and truncate.
"""

from __future__ import annotations

import html
import re
import unicodedata

# Every pattern here must run in linear time on any input: rows of 200,000 characters are real, and one hostile row
# must not stall data prep. So no two adjacent quantifiers may match the same characters ("<\s*/?\s*" tried every
# split of a run of spaces: 99 s on "<" and 20,000 spaces), and no pattern may rescan a run from each of its
# positions; tests/test_reliability_data.py times each function on such rows.
_BLOCK_TAG = re.compile(r"<\s*(?:br|/?p|/?div|/?tr|/?h[1-6]|/?ul|/?ol|/?table)\b[^<>]*>", re.IGNORECASE)
_LIST_ITEM = re.compile(r"<\s*li\b[^<>]*>", re.IGNORECASE)
# Inline tags vanish so that "<b>S</b>mith" stays one word; any other tag becomes a space.
_INLINE_TAG = re.compile(r"<\s*(?:/\s*)?(?:a|b|i|u|em|strong|span|font|small|sup|sub)\b[^<>]*>", re.IGNORECASE)
_OTHER_TAG = re.compile(r"<\s*(?:/\s*)?[a-zA-Z][^<>]*>")  # a letter after '<': "size < 5" and "<3" are not tags
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z][a-zA-Z0-9]{1,31});")
# A decimal character reference too long for int() (over 4,300 digits raises ValueError inside html.unescape).
_BIG_CHARREF = re.compile(r"&#[0-9]{8,}")
# Amazon glues an edition note to many book descriptions, with the spaces lost in scraping:
# "--This text refers to theHardcoveredition." / "--This text refers to an out of print ... of this title."
# The pattern starts with a literal so the regex engine can skip ahead; a leading \s* would try every position.
# (?<!--) after the first dash starts a match only at the first dash of a run: from every dash of a run of 200,000,
# -{2,} would rescan the rest of it (quadratic: 53 s on 20,000 dashes).
_EDITION_NOTE = re.compile(r"-(?<!--)-+\s*This text refers to\b[^.]*\.?", re.IGNORECASE)
# Control characters and invisible format characters; \t \n \r and the other whitespace are left to split().
_INVISIBLE = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u00ad\u200b\u200e\u200f\u2060\ufeff]")
_DOUBLE_SPACE = re.compile(r"  +")
_NON_ALNUM = re.compile(r"[\W_]+")
_SENTENCE_END = re.compile(r"[.!?][\"')\]\u201d\u2019]*(?=\s)")


def clean_text(text: str) -> str:
    """Catalogue text -> plain text: entities decoded, tags and edition notes removed, NFKC, whitespace collapsed.

    Paragraph breaks (<br>, <p>, <li>, newlines) survive as single newlines; every other run of whitespace becomes
    one space.
    """
    if not text:
        return ""
    # Fast path, most real rows: plain ASCII with nothing to decode. isprintable() rules out tabs, newlines and
    # control characters, so only runs of spaces are left to collapse. str methods here, not regexes: this runs
    # 1.5 million times on the real file.
    if text.isascii() and "&" not in text and "<" not in text and "--" not in text and text.isprintable():
        if "  " in text:
            text = _DOUBLE_SPACE.sub(" ", text)
        return text.strip(" ")
    if "&" in text:
        text = _unescape(text)
        if "&" in text and _ENTITY.search(text):  # double-escaped, e.g. "&amp;#8217;" -> "&#8217;" -> "’"
            text = _unescape(text)
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, from a JSON "\\ud800" escape, cannot be written as UTF-8
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if "<" in text:
        text = _strip_comments(text)
        text = _BLOCK_TAG.sub("\n", text)
        text = _LIST_ITEM.sub("\n- ", text)
        text = _INLINE_TAG.sub("", text)
        text = _OTHER_TAG.sub(" ", text)
    if "--" in text:
        text = _EDITION_NOTE.sub(" ", text)
    if text.isprintable():  # no line breaks, tabs or control characters: only runs of spaces can be left
        return (_DOUBLE_SPACE.sub(" ", text) if "  " in text else text).strip()
    # split() rather than a whitespace regex: a [^\S\n] class costs ~40 us on a 600-char description, split ~10.
    lines = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line.isprintable():
            line = " ".join(_INVISIBLE.sub("", line).split())
        if line:
            lines.append(line)
    return "\n".join(lines)


def _unescape(text: str) -> str:
    """html.unescape, safe on any input: a decimal reference of 8 or more digits names no character (past U+10FFFF,
    so U+FFFD), and is shortened to one that says so before int() sees it."""
    if "&#" in text and _BIG_CHARREF.search(text):
        text = _BIG_CHARREF.sub(_shorten_charref, text)
    return html.unescape(text)


def _shorten_charref(match: re.Match) -> str:
    digits = match.group()[2:].lstrip("0") or "0"
    return "&#" + (digits if len(digits) < 8 else "1114112")  # 0x10FFFF + 1: U+FFFD, as for any larger number


def _strip_comments(text: str) -> str:
    """HTML comments, each replaced by a space; an unclosed "<!--" stays. str.find, not a lazy "<!--.*?-->", which
    scans to the end of the text from every unclosed "<!--" (quadratic on a row of them)."""
    parts, start = [], 0
    while (opened := text.find("<!--", start)) != -1:
        closed = text.find("-->", opened + 4)
        if closed == -1:  # no comment after this one can close either
            break
        parts.append(text[start:opened])
        start = closed + 3
    if not parts:
        return text
    parts.append(text[start:])
    return " ".join(parts)


def clean_title(text: str) -> str:
    """A title is one line: clean_text, then newlines become spaces."""
    cleaned = clean_text(text)
    return " ".join(cleaned.split()) if "\n" in cleaned else cleaned


def title_key(title: str) -> str:
    """The title as compared for dedupe and split hashing: NFKC, casefolded, letters and digits only, single spaces.

    Pass a cleaned title (clean_text): entities and tags are not decoded here.
    """
    if not title.isascii():
        title = unicodedata.normalize("NFKC", title)
    return _NON_ALNUM.sub(" ", title.casefold()).strip()


def truncate(text: str, limit: int) -> str:
    """Cut text to at most `limit` chars, at the last sentence end when one falls in the second half of the limit."""
    if len(text) <= limit:
        return text
    head = text[: limit + 1]  # one more char so a sentence ending exactly at the limit is seen by the lookahead
    ends = [m.end() for m in _SENTENCE_END.finditer(head) if m.end() <= limit]
    if ends and ends[-1] >= limit // 2:
        return text[: ends[-1]]
    space = text.rfind(" ", 0, limit)
    if space >= limit // 2:
        return text[:space].rstrip() + "\u2026"
    return text[: limit - 1] + "\u2026"
