"""The report's offline HTML page: inline CSS, figures as data URIs, no script, no external link."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from psa.analysis.figures import Figure

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}th,td{border-bottom:1px solid #e4e4e4;padding:.2em .6em;
text-align:right}th:first-child,td:first-child{text-align:left}thead th{border-bottom:2px solid #999;background:#fafafa}
figure{margin:1.5em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.88em;color:#555}
.warn{background:#fff6e0;border-left:4px solid #f0a500;padding:.5em 1em}.notes,.files{font-size:.82em;color:#555}
details{margin:.6em 0}summary{cursor:pointer;font-weight:600}pre{background:#f6f6f6;padding:.8em;overflow-x:auto}
.counts td,.counts th{text-align:left}
"""


def page(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """A self-contained HTML page: a table of contents, then one <h2> per (heading, HTML) section."""
    toc = "".join(f'<li><a href="#s{i}">{html.escape(h)}</a></li>' for i, (h, _) in enumerate(sections))
    body = "".join(f'<h2 id="s{i}">{html.escape(h)}</h2>{content}' for i, (h, content) in enumerate(sections))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{intro}<ul>{toc}</ul>{body}</body></html>\n")


def figure(fig: Figure) -> str:
    """A figure with its caption, the PNG inlined as a data URI; empty when the PNG is missing."""
    if fig.png is None or not fig.png.is_file():
        return ""
    b64 = base64.b64encode(fig.png.read_bytes()).decode("ascii")
    return (f'<figure id="fig-{fig.name}"><img alt="{html.escape(fig.title)}" src="data:image/png;base64,{b64}">'
            f"<figcaption><b>{html.escape(fig.title)}.</b> {html.escape(fig.caption)} "
            f"(figures/{fig.name}.png, .pdf)</figcaption></figure>")


def paragraph(text: str) -> str:
    """One escaped <p>."""
    return f"<p>{html.escape(text)}</p>"


def bullets(items: Sequence[str], cls: str = "") -> str:
    """An escaped <ul>, with a CSS class when given."""
    c = f' class="{cls}"' if cls else ""
    return f"<ul{c}>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def preformatted(text: str) -> str:
    """Escaped text in a <pre> (the compare verdict)."""
    return f"<pre>{html.escape(text)}</pre>"
