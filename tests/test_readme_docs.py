"""The README and docs/ hold together: links resolve, every doc is reachable, config is complete.

Relative links (and images) in README.md and docs/*.md must name files that exist, and a
``#fragment`` must name a heading of its target, slugged as GitHub does. docs/configuration.md
must list every key of ``RunConfig``'s defaults with the default the code uses, and no key the
code lacks, so the reference cannot drift from ``pipeline/config.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import RunConfig, to_dict

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCED = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \|", re.M)


def slugs(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1 for repeats."""
    counts: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCED.sub("", markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        repeat = counts.get(slug, 0)
        anchors.add(f"{slug}-{repeat}" if repeat else slug)
        counts[slug] = repeat + 1
    return anchors


def broken_links(page: Path) -> list[str]:
    """Each relative link of ``page`` whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(FENCED.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif fragment and file.suffix == ".md" and fragment not in slugs(file.read_text()):
            broken.append(f"{target}: no heading #{fragment} in {file.name}")
    return broken


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_a_broken_link_is_reported(tmp_path):
    """By construction: a missing file and a missing heading are caught, a good link is not."""
    (tmp_path / "other.md").write_text("# Title\n\n## A `code` heading: yes\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-code-heading-yes) ![img](other.md) [web](https://x.org/a.md)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [self](#title-here)\n\n# Title here\n"
        "```bash\n[not a link](nowhere.md)\n```\n"
    )
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "other.md#nope"]


def test_the_readme_links_every_doc():
    text = README.read_text()
    for doc in DOCS:
        assert f"](docs/{doc.name}" in text, f"README.md does not link docs/{doc.name}"


def test_the_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 260


def test_no_heading_names_an_issue_number():
    for page in [README, *DOCS]:
        headings = re.findall(r"^#+ .*$", FENCED.sub("", page.read_text()), re.M)
        assert not [h for h in headings if re.search(r"\bissue\b", h, re.I)], page.name


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def _yaml_text(value: object) -> str:
    """A default as the reference writes it: YAML's spelling of null, booleans and lists."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    return str(value)


def test_configuration_reference_lists_every_key_with_its_default():
    documented = dict(ROW.findall((ROOT / "docs" / "configuration.md").read_text()))
    defaults = {key: _yaml_text(value) for key, value in _flat(to_dict(RunConfig())).items()}
    assert sorted(defaults.keys() - documented.keys()) == [], "keys missing from the reference"
    assert sorted(documented.keys() - defaults.keys()) == [], "documented keys the code lacks"
    wrong = {k: (documented[k], v) for k, v in defaults.items() if documented[k] != v}
    assert wrong == {}, "documented default != code default"
