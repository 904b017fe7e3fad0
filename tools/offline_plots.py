"""Write the HTML template that `dvc plots show` uses (.dvc/config's plots.html_template): a page that works
offline. `make setup` builds it into .dvc/plots/offline.html.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so with no internet it renders a blank page.
This template carries the same three libraries (the versions DVC's page asks for), taken from the npm registry
with `npm pack` and inlined, and declares UTF-8 so that legends with non-ASCII text read right. It has no
`{scripts}` placeholder, so DVC adds no CDN tags.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {  # npm package@version -> the browser build inside its tarball
    "vega@5.20.2": "package/build/vega.min.js",
    "vega-lite@5.2.0": "package/build/vega-lite.min.js",
    "vega-embed@6.18.2": "package/build/vega-embed.min.js",
}

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>softmax-mlops: DVC plots</title>
    {inline_scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def build(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        packed = subprocess.run(
            ["npm", "pack", "--silent", "--pack-destination", tmp, *PACKAGES], capture_output=True, text=True
        )
        if packed.returncode != 0:
            sys.exit(f"offline_plots: npm pack {' '.join(PACKAGES)} failed: {packed.stderr.strip()[-300:]}")
        scripts = []
        for package, member in PACKAGES.items():  # in load order: vega-lite and vega-embed need vega
            tarball = Path(tmp) / (package.replace("@", "-") + ".tgz")  # npm pack's file name
            with tarfile.open(tarball) as tar:
                try:
                    source = tar.extractfile(member)
                except KeyError:
                    source = None
                if source is None:
                    sys.exit(f"offline_plots: {tarball.name} has no {member}")
                scripts.append(f"<!-- {package} -->\n<script>{source.read().decode()}</script>")
    out.parent.mkdir(parents=True, exist_ok=True)
    # {refresh_tag} stays for DVC (`--open` refresh); the other braces are this page's own.
    page = PAGE.replace("{refresh_tag}", "{{refresh_tag}}").format(inline_scripts="\n".join(scripts))
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(page, encoding="utf-8")
    tmp_out.replace(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/offline_plots.py OUT.html")
    build(Path(sys.argv[1]))
