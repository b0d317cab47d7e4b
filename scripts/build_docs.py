"""The documentation pages as HTML: README.md and docs/**/*.md rendered into a site folder.

    python scripts/build_docs.py --out site          # check the links, then render
    python scripts/build_docs.py --check             # only check the links (no `markdown` needed)

Every relative link of a page must name an existing file of the repository, and a link to a heading
(`page.md#anchor`, or `#anchor` in the same page) an existing heading, with GitHub's anchors; a broken
link stops the build with the page, the link and the reason. In the site the pages keep the
repository's layout (`README.html`, `docs/*.html`), links to pages end in `.html`, other Markdown
files they link to are rendered too, other linked files are copied, and `index.html` links the pages
and the API reference (`api/index.html`, written by pdoc in `make docs`).
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: a Markdown link or image: [text](target) / ![alt](target); the target has no spaces
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", flags=re.M)


def pages(root: Path = ROOT) -> list[Path]:
    """The documentation pages: the README and every Markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text's headings (code blocks skipped; repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    """The link targets of a Markdown text, outside code blocks and inline code."""
    return LINK.findall(INLINE_CODE.sub("", FENCE.sub("", text)))


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I))


def check_links(root: Path = ROOT) -> list[str]:
    """Every broken relative link of the pages, as 'page: target (why)'; empty when all resolve."""
    root = root.resolve()
    errors = []
    for page in pages(root):
        text = page.read_text(encoding="utf-8")
        for target in links(text):
            if is_external(target):
                continue
            path, _, anchor = target.partition("#")
            where = page.relative_to(root)
            dest = (page.parent / path).resolve() if path else page
            if root not in dest.parents and dest != root:
                errors.append(f"{where}: {target} (outside the repository)")
            elif not dest.exists():
                errors.append(f"{where}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                errors.append(f"{where}: {target} (no heading '{anchor}' in {dest.relative_to(root)})")
    return errors


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 15px/1.55 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
nav {{ margin-bottom: 1.5rem; font-size: 0.9rem; }}
pre {{ background: #f5f5f5; padding: 0.8rem; overflow-x: auto; }}
code {{ font-size: 0.9em; }}
table {{ border-collapse: collapse; font-size: 0.85rem; display: block; overflow-x: auto; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; }}
img {{ max-width: 100%; }}
</style></head>
<body><nav><a href="{home}">vpeft documentation</a> &middot; <a href="{api}">API reference</a></nav>
{body}
</body></html>
"""


def render(source: Path, root: Path, out: Path, queue: list[Path]) -> None:
    """One Markdown file as out/<its path>.html, its relative links rewritten for the site."""
    import markdown  # the `docs` extra

    rel = source.relative_to(root)
    text = source.read_text(encoding="utf-8")
    body = markdown.markdown(
        text,
        extensions=["tables", "fenced_code", "toc"],
        extension_configs={"toc": {"slugify": lambda value, _sep: slug(value)}},
    )

    def rewrite(match: re.Match) -> str:
        attr, target = match.group(1), html.unescape(match.group(2))
        if is_external(target) or target.startswith("#"):
            return match.group(0)
        path, _, anchor = target.partition("#")
        dest = (source.parent / path).resolve()
        if dest.suffix == ".md":
            queue.append(dest)
            path = path[: -len(".md")] + ".html"
        elif dest.is_file():
            (out / dest.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dest, out / dest.relative_to(root))
        return f'{attr}="{html.escape(path + ("#" + anchor if anchor else ""))}"'

    body = re.sub(r'\b(href|src)="([^"]*)"', rewrite, body)
    title = next(iter(HEADING.findall(FENCE.sub("", text))), rel.stem)
    up = "../" * (len(rel.parts) - 1)
    target = out / rel.with_suffix(".html")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        TEMPLATE.format(
            title=html.escape(INLINE_CODE.sub(lambda m: m.group(0)[1:-1], title)),
            body=body,
            home=f"{up}index.html",
            api=f"{up}api/index.html",
        ),
        encoding="utf-8",
    )


def build(out: Path, root: Path = ROOT) -> list[Path]:
    """Render the pages (and the Markdown files they link to) into out; returns the rendered sources."""
    root = root.resolve()
    out.mkdir(parents=True, exist_ok=True)
    queue, done = list(pages(root)), []
    while queue:
        source = queue.pop(0)
        if source in done or not source.is_file():
            continue
        render(source, root, out, queue)
        done.append(source)
    items = "\n".join(
        f'<li><a href="{s.relative_to(root).with_suffix(".html").as_posix()}">{s.relative_to(root).as_posix()}</a></li>'
        for s in pages(root)
    )
    body = (
        '<h1>vpeft documentation</h1>\n<p>Start with the <a href="README.html">README</a>; the pages:</p>\n'
        f'<ul>\n{items}\n</ul>\n<p>The <a href="api/index.html">API reference</a>, generated from the '
        "docstrings with pdoc.</p>"
    )
    (out / "index.html").write_text(
        TEMPLATE.format(title="vpeft documentation", body=body, home="index.html", api="api/index.html"),
        encoding="utf-8",
    )
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "site", help="the site folder (default: site/)")
    parser.add_argument("--check", action="store_true", help="only check the links")
    args = parser.parse_args(argv)
    errors = check_links()
    if errors:
        print("broken links in the documentation:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    if args.check:
        print(f"links: {len(pages())} pages, all relative links resolve")
        return 0
    try:
        import markdown  # noqa: F401
    except ImportError:
        print("make docs needs the `markdown` package: pip install '.[docs]'", file=sys.stderr)
        return 1
    done = build(args.out)
    print(f"docs pages: {len(done)} rendered into {args.out}/ (index: {args.out}/index.html)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
