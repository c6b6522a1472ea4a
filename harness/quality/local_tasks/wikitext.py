"""`wikitext`: WikiText-2's raw test file (data folder `wikitext2/`), split into articles as lm-eval's
`EleutherAI/wikitext_document_level` has them."""

from __future__ import annotations

import re
from pathlib import Path

from harness.quality.local_tasks import register_task
from harness.quality.local_tasks.base import LocalTask, text

_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_pages(raw: str) -> list[str]:
    """Split wiki.test.raw into articles at top-level ` = Title = ` lines (heading kept, "\\n"-joined).

    This follows the document-level builder lm-eval's dataset uses: a page runs from its title
    line up to the next title line, lines joined with newlines.
    """
    pages, cur = [], []
    for line in raw.split("\n"):
        if _WIKI_TITLE.match(line) and cur:
            if "".join(cur).strip():
                pages.append("\n".join(cur))
            cur = []
        cur.append(line)
    if "".join(cur).strip():
        pages.append("\n".join(cur))
    return pages


@register_task
class WikiText(LocalTask):
    name = "wikitext"
    files = ("wikitext2/wiki.test.raw",)
    splits = ("test",)
    upstream = "wikitext/wikitext.yaml"
    table_metric = "word_perplexity"

    @classmethod
    def load(cls, data_dir: Path, subtask: str | None = None) -> dict[str, list[dict]]:
        return {"test": [{"page": p} for p in wikitext_pages(text(cls.path(data_dir)))]}
