"""The repository's one name on GitHub, and the links built from it (Colab badges, pip URL).

Change :data:`REPO` (and re-run ``python3 -m slmkd.links --fix-notebooks``) when the project moves.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

#: GitHub ``owner/name`` of this project: the single source of every link.
REPO = "slmkd/slmkd"
BRANCH = "main"
NOTEBOOK_DIR = "notebooks"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"


def colab_url(notebook: str, repo: str = REPO, branch: str = BRANCH) -> str:
    """``https://colab.research.google.com/github/{repo}/blob/{branch}/notebooks/{notebook}``."""
    name = Path(notebook).name
    if not name.endswith(".ipynb"):
        name += ".ipynb"
    return f"https://colab.research.google.com/github/{repo}/blob/{branch}/{NOTEBOOK_DIR}/{name}"


def colab_badge(notebook: str, repo: str = REPO) -> str:
    """Markdown of the open-in-Colab badge for ``notebook`` (a file name: ``02_kd_logits``)."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook, repo)})"


def pip_url(repo: str = REPO, branch: str = BRANCH) -> str:
    """``git+https://github.com/{repo}@{branch}`` for ``pip install``."""
    return f"git+https://github.com/{repo}@{branch}"


_BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")


def fix_notebook_badges(folder: str | Path = NOTEBOOK_DIR) -> list[Path]:
    """Rewrite the badge (and the pip URL) in every notebook's cells to use :data:`REPO`."""
    changed = []
    for path in sorted(Path(folder).glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        dirty = False
        for cell in nb["cells"]:
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            new = _BADGE_RE.sub(colab_badge(path.name), src)
            new = re.sub(r"git\+https://github\.com/[\w.-]+/[\w.-]+@[\w.-]+", pip_url(), new)
            if new != src:
                cell["source"] = new.splitlines(keepends=True)
                dirty = True
        if dirty:
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(path)
    return changed


if __name__ == "__main__":  # pragma: no cover
    if "--fix-notebooks" in sys.argv:
        for p in fix_notebook_badges():
            print(f"updated {p}")
    else:
        print(REPO)
