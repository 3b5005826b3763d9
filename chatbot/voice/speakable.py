"""Text for the ear: a reply written for the screen (markdown, code, links, tables) as words to say.

A voice that reads "asterisk asterisk" or a URL letter by letter is what users of other chat
apps complain about; here code blocks become "here is the code", links their words, tables a
short summary. `SentenceStream` cuts a reply that is still being written into sentences, so
the first one can be spoken before the model has finished.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FENCE = re.compile(r"```[^\n]*\n.*?(?:```|\Z)", re.S)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\((?:[^()\s]|\([^()]*\))+\)")
_URL = re.compile(r"\b(?:https?://|www\.)([^\s/)>\]]+)[^\s)>\]]*")
_EMAIL = re.compile(r"\b[\w.+-]+@([\w-]+\.)+\w+\b")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s*(.*?)\s*#*\s*$", re.M)
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+", re.M)
_QUOTE = re.compile(r"^\s*>\s?", re.M)
_RULE = re.compile(r"^\s*(?:[-*_]\s*){3,}$", re.M)
_EMPHASIS = re.compile(r"(\*{1,3}|_{1,3}|~~)(?=\S)(.+?)(?<=\S)\1")
_TABLE = re.compile(r"(?:^\s*\|.*\|\s*$\n?){2,}", re.M)
_OPEN_TABLE = re.compile(r"(?:^\s*\|.*(?:\n|\Z))+\Z", re.M)
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}")
_LEFTOVER = re.compile(r"[*_#`|<>{}\[\]\\^~=]+")
_CLAUSE_END = re.compile(r"[,;:](?=\s+\w+\s)")  # a clause ends once the next has a whole word
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"”’)\]]*\s+(?=[\"“‘(\[]?[A-Z0-9À-Ý])|\n\s*\n|\n(?=\s*(?:[-*+•]|\d+[.)])\s)")
_ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "mr.", "mrs.", "ms.", "dr.", "st.", "no.", "approx."}
_SYMBOLS = {"&": " and ", "%": " percent", "+": " plus ", "→": " to ", "°C": " degrees Celsius",
            "°F": " degrees Fahrenheit", "°": " degrees", "€": " euros", "£": " pounds", "@": " at "}


def speakable(markdown: str) -> str:
    """What a voice should say for `markdown`; "" if nothing in it is worth saying."""
    text = _FENCE.sub(" Here is the code. ", markdown)
    text = _TABLE.sub(_table_summary, text)
    text = _MD_LINK.sub(lambda m: f" {m.group(1)} ", text)
    text = _URL.sub(lambda m: f" a link to {m.group(1).removeprefix('www.')} ", text)
    text = _EMAIL.sub(" an email address ", text)
    text = _INLINE_CODE.sub(lambda m: m.group(1) if len(m.group(1)) <= 24 else "this code", text)
    text = _RULE.sub("", text)
    text = _HEADING.sub(lambda m: _end_sentence(m.group(1)), text)
    text = _BULLET.sub("", text)
    text = _QUOTE.sub("", text)
    text = _EMPHASIS.sub(r"\2", text)
    text = re.sub(r"\$(\d)", r"\1 dollars ", text)  # "$5" -> "5 dollars" (a rough, common case)
    for symbol, words in _SYMBOLS.items():
        text = text.replace(symbol, words)
    text = _LEFTOVER.sub(" ", text)
    lines = [_end_sentence(line.strip()) for line in text.splitlines() if line.strip()]
    return re.sub(r"[ \t]+", " ", "\n".join(lines)).replace(" .", ".").replace(" ,", ",").strip()


def _end_sentence(line: str) -> str:
    """A heading or list item read on its own needs a stop, or the voice runs it into the next line."""
    return line if not line or line[-1] in ".!?:;,…" else line + "."


def _table_summary(match: re.Match) -> str:
    rows = [r for r in match.group(0).strip().splitlines() if not _TABLE_RULE.match(r)]
    header = [c.strip() for c in rows[0].strip().strip("|").split("|") if c.strip()] if rows else []
    body = len(rows) - 1
    columns = ", ".join(header[:4])
    return f"\nHere is a table with {body} row{'s' if body != 1 else ''}" + (f" of {columns}.\n" if columns else ".\n")


def split_sentences(text: str) -> list[str]:
    """Whole sentences of speakable text (a list item or paragraph counts as one)."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[start:m.start()].strip()
        if piece and not _ends_in_abbreviation(piece):
            out.append(piece)
            start = m.end()
    tail = text[start:].strip()
    return out + ([tail] if tail else [])


def _ends_in_abbreviation(piece: str) -> bool:
    return piece.rsplit(None, 1)[-1].lower() in _ABBREVIATIONS


@dataclass
class SentenceStream:
    """Feed the reply so far; get the sentences that are now complete, each once, ready to speak.

    A sentence counts as complete once the text after it has started (the next sentence, or a
    new paragraph); an open code block holds everything back until it closes.
    """

    min_chars: int = 12  # "Sure." alone is a poor first clip: join very short ones with the next
    first_clause_chars: int = 24  # the first clip may end at a comma, colon or semicolon this far in
    _said: int = field(default=0, init=False)  # speakable sentences already handed out
    _clause: str = field(default="", init=False)  # the start of sentence `_said`, already handed out

    def feed(self, reply: str) -> list[str]:
        if reply.count("```") % 2:  # inside an open code block: wait for it to close
            reply = reply[: reply.rfind("```")]
        reply = _OPEN_TABLE.sub("", reply)  # a table still growing: summarise it once it ends
        sentences = split_sentences(speakable(reply))
        out = self._take(sentences[:-1])  # the last may still grow
        if not out and self._said == 0 and not self._clause and sentences:
            out = self._first_clause(sentences)
        return out

    def finish(self, reply: str) -> list[str]:
        return self._take(split_sentences(speakable(reply)), final=True)

    def _first_clause(self, sentences: list[str]) -> list[str]:
        """Nothing said yet: the voice starts with the first clause once it is complete (the words after
        it have begun), not after the whole first sentence, which is what a listener waits through."""
        before = " ".join(sentences[:-1])
        for m in _CLAUSE_END.finditer(sentences[-1]):
            clause = sentences[-1][: m.start() + 1]
            if len(before) + len(clause) >= self.first_clause_chars:
                self._said, self._clause = len(sentences) - 1, clause
                return [f"{before} {clause}".strip()]
        return []

    def _take(self, sentences: list[str], final: bool = False) -> list[str]:
        out: list[str] = []
        group: list[str] = []
        for i, sentence in enumerate(sentences[self._said:]):
            if i == 0 and self._clause:  # its first clause was said already
                sentence = sentence.removeprefix(self._clause).strip()
                self._clause = ""
                if not sentence:
                    self._said += 1
                    continue
            group.append(sentence)
            if len(" ".join(group)) >= self.min_chars or final:
                out.append(" ".join(group))
                self._said += len(group)
                group = []
        return out
