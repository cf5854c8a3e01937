"""The report's stylesheet: inline, system fonts only, readable on screen and on paper."""

STYLE = """
:root {
  --ink: #1d2430; --muted: #5b6575; --rule: #d9dee6; --zebra: #f4f6f9; --accent: #1f5fae;
  --warn-ink: #7a4100; --warn-bg: #fff4e0; --warn-rule: #e69a28; --ok-ink: #1e6b37; --ok-bg: #e9f6ed;
}
* { box-sizing: border-box; }
html { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
body {
  margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 1.75rem; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 1.3rem; margin: 36px 0 12px; padding-bottom: 4px; border-bottom: 2px solid var(--ink); }
h3 { font-size: 1.05rem; margin: 0 0 8px; }
h4 { font-size: 0.95rem; margin: 16px 0 6px; color: var(--muted); text-transform: uppercase;
     letter-spacing: 0.04em; }
p.meta, .muted { color: var(--muted); }
p.meta { margin: 0 0 16px; font-size: 0.9rem; }
nav.toc { font-size: 0.9rem; margin: 8px 0 0; }
nav.toc a { color: var(--accent); text-decoration: none; margin-right: 14px; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
                   font-size: 0.86em; }
pre.command { background: #f6f8fa; border: 1px solid var(--rule); border-radius: 6px; padding: 8px 12px;
              white-space: pre-wrap; word-break: break-all; margin: 4px 0 0; }
table { border-collapse: collapse; margin: 4px 0 8px; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0 0 6px; }
caption .layout { font-weight: 400; color: var(--muted); font-size: 0.85em; margin-left: 8px; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--rule); text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid var(--ink); font-weight: 600; white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--zebra); }
tbody th { font-weight: 500; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; }
td.best { font-weight: 700; }
td.run a { font-weight: 600; white-space: nowrap; }
td.run .sub { color: var(--muted); font-size: 0.82rem; }
td.mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
          font-size: 0.82rem; overflow-wrap: break-word; }
.metric { white-space: nowrap; }
.scroll { overflow-x: auto; }
figure { margin: 0 0 24px; }
figure.table-figure { overflow-x: auto; }
figcaption { color: var(--muted); font-size: 0.85rem; }
svg.plot { width: 100%; max-width: 760px; height: auto; display: block; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.78rem; font-weight: 600;
         margin-left: 6px; vertical-align: middle; border: 1px solid transparent; white-space: nowrap; }
.badge.ok { color: var(--ok-ink); background: var(--ok-bg); border-color: #9fd3b0; }
.badge.warn { color: var(--warn-ink); background: var(--warn-bg); border-color: var(--warn-rule); }
.badge.kind { color: var(--muted); background: var(--zebra); border-color: var(--rule); }
.warnings { background: var(--warn-bg); border-left: 5px solid var(--warn-rule); color: var(--warn-ink);
            padding: 8px 14px; margin: 10px 0 14px; border-radius: 0 6px 6px 0; }
.warnings strong { display: block; margin-bottom: 2px; }
.warnings ul { margin: 2px 0 0; padding-left: 20px; }
.okline { color: var(--ok-ink); margin: 4px 0; }
.card { border: 1px solid var(--rule); border-radius: 8px; padding: 16px 20px; margin: 0 0 20px; }
.card h3 .label { font-size: 1.1rem; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 8px 0; }
dl.facts dt { color: var(--muted); font-weight: 500; }
dl.facts dd { margin: 0; word-break: break-word; }
.grids details.grid { margin: 0 0 8px; }
.grids summary { cursor: pointer; font-size: 0.9rem; }
.grids img { display: block; width: 100%; max-width: 640px; height: auto; margin: 6px 0 0;
             border: 1px solid var(--rule); }
details { margin: 0 0 20px; }
details summary { cursor: pointer; color: var(--accent); font-size: 0.9rem; margin-bottom: 8px; }
footer { margin-top: 40px; color: var(--muted); font-size: 0.8rem; border-top: 1px solid var(--rule);
         padding-top: 8px; }
@media print {
  body { font-size: 10.5pt; }
  main { max-width: none; padding: 0; }
  nav.toc { display: none; }
  h2 { break-after: avoid; }
  .card, figure, tr { break-inside: avoid; }
  /* Paper has no scroll bar: wide tables wrap their headers and shrink instead of being cut. */
  .scroll, figure.table-figure { overflow: visible; }
  table { font-size: 8.5pt; }
  th, td { padding: 3px 6px; }
  thead th, tbody th, td.num, td.run a, .metric { white-space: normal; }
  a { color: inherit; text-decoration: none; }
}
@page { margin: 1.6cm 1.4cm; }
"""
