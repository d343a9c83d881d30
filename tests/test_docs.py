"""The README and docs/ stay true: the generated reference pages match the code, every link leads somewhere, and the
README stays a page a newcomer reads (its recipes run in test_readme_recipes.py)."""

import re
from pathlib import Path

import pytest

from raytrain.reference import PAGES

ROOT = Path(__file__).parent.parent
PAGES_READ = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("name", sorted(PAGES))
def test_generated_reference_pages_match_the_code(name):
    assert (ROOT / "docs" / name).read_text() == PAGES[name](), \
        f"docs/{name} is stale: run `python -m raytrain.reference docs/`"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES_READ, ids=lambda p: p.name)
def test_every_link_leads_somewhere(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists() and ROOT in linked.parents, f"{page.name}: link to {target}: no such file here"
        if anchor:
            assert anchor in _anchors(linked), f"{page.name}: link to {target}: no such heading"


def test_the_readme_is_a_page_not_the_manual():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in text, f"README does not link docs/{page.name}"


def test_the_readme_presets_are_what_raytrain_plan_says(capsys):
    from raytrain.cli import main

    rows = re.findall(r"^\| `[\w-]+` \| [\d.]+ B \| `(--config [^`]+)` \| [^|]+ \| ([\d.]+) GiB \| ([\d,]+) \|$",
                      (ROOT / "README.md").read_text(), flags=re.M)
    assert len(rows) == 5
    for arguments, memory, tokens in rows:
        assert main(["plan", *arguments.split()]) in (0, None)
        out = capsys.readouterr().out
        assert f"largest rank: {memory} GiB" in out and f"; {tokens} tokens/s" in out, (arguments, out)
