"""A run's report as one self-contained HTML page: documents kept per step, drop reasons, and the
outputs by language and domain, as inline SVG bars (no JavaScript, no external assets, so the
page opens anywhere, including from a CI artifact)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from herd.io import atomic_write_text


def _bars(rows: list[tuple[str, float, str]], *, width: int = 520, color: str = "#4a78b5") -> str:
    if not rows:
        return "<p>(none)</p>"
    top = max(v for _, v, _ in rows) or 1.0
    h = 18
    parts = [f'<svg width="{width + 330}" height="{h * len(rows) + 4}" xmlns="http://www.w3.org/2000/svg" '
             'font-family="sans-serif" font-size="12">']
    for i, (label, value, note) in enumerate(rows):
        y = i * h + 2
        w = max(1.0, width * value / top)
        parts.append(f'<text x="0" y="{y + 13}">{html.escape(label[:28])}</text>'
                     f'<rect x="180" y="{y}" width="{w:.1f}" height="{h - 4}" fill="{color}"/>'
                     f'<text x="{185 + w:.1f}" y="{y + 13}">{html.escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_html_report(report: dict[str, Any], path: Path) -> Path:
    steps = report["steps"]
    kept = [(s["name"], float(s["docs_out"]), f'{s["docs_out"]:,} docs, {s["chars_out"] / 1e6:.2f} MB')
            for s in steps]
    reasons = sorted(((f'{s["name"]}: {r}', float(n), f"{n:,}") for s in steps for r, n in s["dropped"].items()),
                     key=lambda r: -r[1])
    body = [f"<h1>herd data pipeline run</h1><p>{report['seconds']:.1f} s</p>",
            "<h2>Documents after each step</h2>", _bars(kept),
            "<h2>Documents dropped, by step and reason</h2>", _bars(reasons, color="#c0504d")]
    for name, out in report["outputs"].items():
        langs = sorted(((k[5:], float(v), f"{v:,} docs") for k, v in out.items() if k.startswith("lang_")),
                       key=lambda r: -r[1])
        doms = sorted(((k[7:], float(v), f"{v / max(out.get('chars', 1), 1):.1%} of chars") for k, v in out.items()
                       if k.startswith("domain_")), key=lambda r: -r[1])
        body += [f"<h2>Output {html.escape(name)}: {out.get('docs', 0):,} documents"
                 + (f", {out['tokens']:,} tokens" if "tokens" in out else "") + "</h2>",
                 "<h3>By language</h3>", _bars(langs[:30], color="#9bbb59"),
                 "<h3>By domain (characters)</h3>", _bars(doms, color="#8064a2")]
    if report.get("plans"):
        body.append("<h2>Global steps</h2><pre>" + html.escape(
            "\n".join(f"{k}: {v}" for k, v in report["plans"].items())) + "</pre>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>herd data run</title></head>"
            "<body style='font-family:sans-serif;max-width:60em'>" + "".join(body) + "</body></html>")
    return atomic_write_text(path, page)
