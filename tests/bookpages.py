"""Reading a built book's pages as a reader sees them: a page's title and first paragraph, its tables.

Used by tests/test_book.py on the book of a fake run and on the ci run's book (conftest's ``ci_run``).
"""

from __future__ import annotations

from pathlib import Path

from bs4 import BeautifulSoup


def _soup(page: str | Path) -> BeautifulSoup:
    html = Path(page).read_text() if isinstance(page, Path) else page
    soup = BeautifulSoup(html, "html.parser")
    for anchor in soup.select("a.headerlink"):  # the "#" permalink after every heading
        anchor.decompose()
    return soup


def _text(element) -> str:
    return " ".join(element.get_text(" ").split())


def title_and_opening(page: str | Path) -> tuple[str, str]:
    """The page's title (its first ``<h1>``) and the first paragraph after it. Only the part of the
    page from the title on is parsed: a notebook page can carry megabytes of embedded viewer data."""
    html = Path(page).read_text() if isinstance(page, Path) else page
    start = html.find("<h1")
    if start < 0:
        raise AssertionError("the page has no title (<h1>)")
    heading = _soup(html[start:start + 20000]).find("h1")
    if heading is None:
        raise AssertionError("the page has no title (<h1>)")
    paragraph = heading.find_next("p")
    return _text(heading), _text(paragraph) if paragraph is not None else ""


def tables(page: str | Path) -> list[tuple[str, list[dict[str, str]]]]:
    """Every ``<table>`` of the page as (caption, rows), each body row a dict from column heading
    to cell text. A row's headings (the pandas index, as pandas writes it: blank column headings)
    come under the key ``""``; where a row has fewer cells than there are columns (a row heading
    spanning rows above it), its cells fill the last columns."""
    found = []
    for table in _soup(page).find_all("table"):
        caption = _text(table.caption) if table.caption else ""
        head = table.find("thead")
        columns = [_text(cell) for cell in head.find("tr").find_all(["th", "td"])] if head else []
        rows = []
        for tr in (table.find("tbody") or table).find_all("tr"):
            texts = [_text(cell) for cell in tr.find_all(["th", "td"])]
            if texts:
                rows.append(dict(zip(columns[len(columns) - len(texts):] if len(texts) <= len(columns) else
                                     range(len(texts)), texts)))
        found.append((caption, rows))
    return found


def table_with_caption(page: str | Path, start: str) -> list[dict[str, str]]:
    """The rows of the one table whose caption starts with ``start``."""
    matching = [rows for caption, rows in tables(page) if caption.startswith(start)]
    if len(matching) != 1:
        raise AssertionError(f"{len(matching)} tables with a caption starting {start!r}")
    return matching[0]
