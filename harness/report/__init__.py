"""The study report from records and analyses: report.md and summary.json (build), tables,
figures and their style, the notes around them (notes), report.html (html), the CI summary page
(summary) and the headless-browser check of a page (browser_check)."""
