"""Read the dashboard's tables back out of its HTML (served page or Chromium's DOM dump)."""

from __future__ import annotations

from html.parser import HTMLParser


class _Rows(HTMLParser):
    """Collect, per <section id>, each <tr data-name> as {td class token: text}."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, dict[str, dict[str, str]]] = {}
        self.classes: dict[str, dict[str, list[str]]] = {}
        self.titles: list[str] = []
        self._section: str | None = None
        self._row: str | None = None
        self._cell: list[str] | None = None
        self._cell_classes: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._section = a.get("id")
            self.sections.setdefault(self._section, {})
            self.classes.setdefault(self._section, {})
        elif tag == "tr" and "data-name" in a and self._section:
            self._row = a["data-name"]
            self.sections[self._section][self._row] = {}
            self.classes[self._section][self._row] = []
        elif tag == "td" and self._row is not None:
            self._cell = []
            self._cell_classes = (a.get("class") or "").split()
        elif tag == "time" and self._row is not None and "title" in a:
            self.titles.append(a["title"])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._row is not None:
            text = "".join(self._cell).strip()
            row = self.sections[self._section][self._row]
            for cls in self._cell_classes:
                row[cls] = text
            self.classes[self._section][self._row] += self._cell_classes
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def table_rows(page: str) -> _Rows:
    """Parse a dashboard page; .sections["users"]["alice"]["cpu-consumed"] == "1,200"."""
    parser = _Rows()
    parser.feed(page)
    return parser
