"""MkDocs hooks (mkdocs.yml, ``hooks:``): the CLI reference page is generated from the command line itself."""

from __future__ import annotations

MARKER = "<!-- cli-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs passes them by name)
    if MARKER not in markdown:
        return markdown
    from robench.cli.reference import cli_markdown

    return markdown.replace(MARKER, cli_markdown())
