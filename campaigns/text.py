"""HTML to plain text: the text part of an email derived from its rendered HTML.

Paragraphs and ``<br>`` become line breaks, links ``text (url)``, scripts and styles are
dropped. Python's HTMLParser is quadratic on some broken HTML, so a parse reads its thread's
CPU clock as it goes and gives up (``ValueError``) past ``time_limit`` seconds.
"""

from __future__ import annotations

import functools
import re
import time
from html.parser import HTMLParser

MAX_PARSE_SECONDS = 2.0  # seconds of the parsing thread's CPU time, unless the caller says otherwise

_BLOCK = {
    "address", "article", "aside", "blockquote", "center", "dd", "div", "dl", "dt", "fieldset", "figcaption",
    "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "main", "nav", "ol", "p",
    "pre", "section", "table", "tbody", "tfoot", "thead", "ul",
}
_PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol", "table", "pre", "dl", "hr"}
_LINE = {"tr", "li", "dt", "dd", "div"}
_SKIP = {"script", "style", "head", "title", "template", "noscript"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_BREAK = "\x00"  # a hard line break, kept through whitespace collapsing
_PARA = "\x01"  # a paragraph break
_PRE_SPACE = "\x02"  # a space inside <pre>, kept through whitespace collapsing
_PRE_TAB = "\x03"
_WHITESPACE = re.compile(r"\s+")
_MARKERS = dict.fromkeys(map(ord, _BREAK + _PARA + _PRE_SPACE + _PRE_TAB))  # removed from the input


class _TextExtractor(HTMLParser):
    def __init__(self, time_limit: float):
        super().__init__(convert_charrefs=True)
        self.time_limit = time_limit
        self.out: list[str] = []
        self.skip = 0
        self.pre = 0
        self.links: list[tuple[str | None, int]] = []
        # HTMLParser is quadratic on some broken HTML ("<a" * 100000): each piece it reports is
        # found in at most one scan of what is left, so looking at the clock here bounds it.
        # The clock is read at every 16th piece, from the first.
        self.deadline: float | None = None
        self.pieces = 0

    def in_time(self, *_):
        self.pieces += 1
        if self.pieces & 15 != 1:
            return
        now = time.thread_time()
        if self.deadline is None:
            self.deadline = now + self.time_limit
        if now > self.deadline:
            raise ValueError(f"the HTML takes too long to parse (more than {self.time_limit:g} seconds of CPU time)")

    handle_comment = handle_decl = handle_pi = unknown_decl = in_time

    def handle_starttag(self, tag, attrs):
        self.in_time()
        if tag in _SKIP:
            if tag not in _VOID:
                self.skip += 1
            return
        if self.skip:
            return
        if tag == "br":
            self.out.append(_BREAK)
        elif tag == "hr":
            self.out.append(_PARA + "----" + _PARA)
        elif tag in _PARAGRAPH:
            self.out.append(_PARA)
        elif tag in _LINE or tag in _BLOCK:
            self.out.append(_BREAK)
        if tag == "li":
            self.out.append("- ")
        elif tag in ("td", "th"):
            self.out.append(" ")
        elif tag == "pre":
            self.pre += 1
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.out.append(alt)
        elif tag == "a":
            self.links.append((dict(attrs).get("href"), len(self.out)))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        self.in_time()
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if tag == "a" and self.links:
            href, start = self.links.pop()
            label = " ".join("".join(self.out[start:]).replace(_BREAK, " ").replace(_PARA, " ").split())
            href = (href or "").strip()
            shown = href[7:] if href.lower().startswith("mailto:") else href
            if href and not href.startswith("#") and shown != label:
                self.out.append(f" ({href})" if label else href)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self.out.append(_PARA)
        elif tag in _PARAGRAPH:
            self.out.append(_PARA)
        elif tag in _LINE or tag in _BLOCK:
            self.out.append(_BREAK)

    def handle_data(self, data):
        self.in_time()
        if self.skip:
            return
        data = data.translate(_MARKERS)
        if self.pre:
            self.out.append(data.replace("\n", _BREAK).replace(" ", _PRE_SPACE).replace("\t", _PRE_TAB))
        else:
            self.out.append(_WHITESPACE.sub(" ", data))


@functools.lru_cache(maxsize=64)
def html_to_text(html: str, time_limit: float | None = None) -> str:
    """A plain-text version of an HTML email: paragraphs and ``<br>`` become line breaks, links
    become ``text (url)``, scripts and styles are dropped, entities decoded, whitespace collapsed.
    Cached: a step whose HTML is the same for many contacts is converted once. Raises
    ``ValueError`` past ``time_limit`` seconds of CPU time (default ``MAX_PARSE_SECONDS``)."""
    if not html:
        return ""
    parser = _TextExtractor(MAX_PARSE_SECONDS if time_limit is None else time_limit)
    parser.feed(html)
    parser.close()
    raw = "".join(parser.out)
    lines: list[str] = []
    for para in raw.split(_PARA):
        para_lines = [" ".join(line.split()) for line in para.split(_BREAK)]
        para_lines = [line for line in para_lines if line]
        if para_lines:
            lines.append("\n".join(para_lines))
    return "\n\n".join(lines).replace(_PRE_SPACE, " ").replace(_PRE_TAB, "\t")
