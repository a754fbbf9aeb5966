"""mkdocs hook: a Sphinx role left in a docstring or page (``:class:`X```) fails the strict build.

mkdocstrings renders Markdown, so a role would reach the reader as literal text. Docstrings use
mkdocstrings cross-references instead (``[`X`][fd_trt.module.X]``); scripts/convert_doc_roles.py
rewrites roles.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("mkdocs.hooks.roles")
ROLE = re.compile(r":(?:py:)?(?:class|func|mod|meth|attr|data|exc|obj|const):(?:`|<code>)")


def on_page_content(html, page, config, files):
    for m in ROLE.finditer(html):
        snippet = re.sub(r"<[^>]+>", "", html[m.start() : m.end() + 80]).split("\n")[0]
        log.warning("unrendered Sphinx role in %s: %s", page.file.src_path, snippet)
    return html
