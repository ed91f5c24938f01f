"""Writes the Colab notebooks of this folder (NN_name.ipynb) from their jupytext percent scripts
(NN_name.py), outputs stripped.

    python notebooks/build_notebooks.py                    # (re)write notebooks/*.ipynb
    python notebooks/build_notebooks.py --repo-url URL     # the same, PACKAGE_SOURCE = URL
    python notebooks/build_notebooks.py --check            # exit status 1 if a file differs

The scripts are the source, edited as code: `# %%` starts a code cell, `# %% [markdown]` a
markdown cell written as comments, `# %% tags=["parameters"]` the parameters cell. Never edit
the .ipynb files by hand (tests/test_notebooks.py regenerates them and compares). Besides
jupytext's conversion this script sets what the scripts leave out: the Colab metadata (TPU
runtime), fixed cell ids (the same script always gives the same bytes), the default of the
install cell's PACKAGE_SOURCE form field (`--repo-url`; empty without it, so that no made-up
address is shipped), and the cells every notebook shares: they are written once, in
shared_cells.py (`# %% name="NAME"`), and a script holds a one-line cell `# shared cell: NAME`
where each goes.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import jupytext
import nbformat

NOTEBOOKS_DIR = Path(__file__).resolve().parent
SCRIPT_GLOB = "[0-9][0-9]_*.py"  # 01_quickstart.py -> 01_quickstart.ipynb
FORMAT = "py:percent"
PARAMETERS_TAG = "parameters"  # papermill's convention: the cell a runner may override
# The install cell's form field; its default is the only text the generator changes.
SOURCE_FIELD = re.compile(r'^(PACKAGE_SOURCE = )(".*")(  # @param \{type:"string"\})$', re.M)
SHARED_SCRIPT = NOTEBOOKS_DIR / "shared_cells.py"
SHARED_PLACEHOLDER = re.compile(r"^# shared cell: (\S+)$")
CELL_METADATA = ("tags", "cellView")  # kept; jupytext's layout hints are dropped

_METADATA = {
    "accelerator": "TPU",  # Colab opens them on a TPU runtime
    "colab": {"provenance": []},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def package_source(repo_url: str | None) -> str:
    """PACKAGE_SOURCE's default for `--repo-url`: "" without one, else a pip source (a
    repository's https:// address gets git+). ValueError when it is no usable address."""
    if repo_url is None:
        return ""
    url = repo_url.strip()
    expected = ("expected the repository's address (https://github.com/<owner>/<repo> or "
                "git+https://...) or a wheel's URL (https://.../*.whl)")
    if re.search(r'[<>"\\\s]', url) or "://" not in url:
        raise ValueError(f"--repo-url {repo_url!r}: {expected}")
    if url.startswith(("https://", "http://", "ssh://")) and not url.endswith(".whl"):
        url = f"git+{url}"
    if not url.startswith(("git+", "https://", "http://")):
        raise ValueError(f"--repo-url {repo_url!r}: {expected}")
    return url


def field_default(notebook: nbformat.NotebookNode) -> str:
    """The PACKAGE_SOURCE default of `notebook`'s install cell (ValueError if it has none)."""
    found = [SOURCE_FIELD.search(cell.source) for cell in notebook.cells
             if cell.cell_type == "code"]
    found = [match for match in found if match]
    if len(found) != 1:
        raise ValueError(f"PACKAGE_SOURCE: expected one form field line "
                         f'`PACKAGE_SOURCE = ""  # @param {{type:"string"}}`, found {len(found)}')
    return json.loads(found[0].group(2))


def build(script: Path, source: str = "",
          shared: dict[str, nbformat.NotebookNode] | None = None) -> nbformat.NotebookNode:
    """The notebook (nbformat 4, no outputs) of a percent script, PACKAGE_SOURCE set to
    `source`, its placeholders replaced by the `shared` cells (default: read SHARED_SCRIPT).
    The script's own default must be empty: the address comes from --repo-url."""
    shared = shared_cells() if shared is None else shared
    notebook = jupytext.read(script, fmt=FORMAT)
    notebook.cells = [_shared_or_own(cell, script, shared) for cell in notebook.cells]
    try:
        default = field_default(notebook)
    except ValueError as error:
        raise ValueError(f"{script.name}: {error}") from None
    if default:
        raise ValueError(f"{script.name}: PACKAGE_SOURCE = {default!r}: expected an empty "
                         "default in the script (set it with --repo-url)")
    notebook.metadata = json.loads(json.dumps(_METADATA))
    notebook.nbformat, notebook.nbformat_minor = 4, 5
    for number, cell in enumerate(notebook.cells):
        cell.metadata = {key: value for key, value in cell.metadata.items()
                         if key in CELL_METADATA}
        cell.id = f"cell-{number:02d}"  # fixed ids: the same sources give the same file
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.source = SOURCE_FIELD.sub(
                lambda match: match.group(1) + json.dumps(source) + match.group(3), cell.source)
    nbformat.validate(notebook)
    return notebook


def shared_cells() -> dict[str, nbformat.NotebookNode]:
    """NAME -> code cell of SHARED_SCRIPT (each named by `# %% name="NAME"`; its markdown
    cells are notes for the reader)."""
    cells = [cell for cell in jupytext.read(SHARED_SCRIPT, fmt=FORMAT).cells
             if cell.cell_type == "code"]
    named = {cell.metadata.get("name"): cell for cell in cells}
    if None in named or len(named) != len(cells):
        raise ValueError(f"{SHARED_SCRIPT.name}: expected every cell named once "
                         '(# %% name="NAME")')
    return named


def _shared_or_own(cell: nbformat.NotebookNode, script: Path,
                   shared: dict[str, nbformat.NotebookNode]) -> nbformat.NotebookNode:
    """The cell of `shared` a placeholder cell `# shared cell: NAME` names, else `cell`."""
    match = SHARED_PLACEHOLDER.match(cell.source.strip()) if cell.cell_type == "code" else None
    if not match:
        return cell
    if match.group(1) not in shared:
        raise ValueError(f"{script.name}: shared cell {match.group(1)!r}: expected one of "
                         f"{sorted(shared)} (the cells of {SHARED_SCRIPT.name})")
    return copy.deepcopy(shared[match.group(1)])


def scripts() -> list[Path]:
    """The percent scripts of this folder, one per notebook."""
    return sorted(NOTEBOOKS_DIR.glob(SCRIPT_GLOB))


def notebooks(repo_url: str | None = None) -> dict[str, nbformat.NotebookNode]:
    """File name -> generated notebook, for every script of this folder."""
    source, shared = package_source(repo_url), shared_cells()
    return {script.with_suffix(".ipynb").name: build(script, source, shared)
            for script in scripts()}


def render(notebook: nbformat.NotebookNode) -> str:
    """The file text of `notebook` (nbformat's JSON, one trailing newline)."""
    return nbformat.writes(notebook).rstrip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare with the files on disk; exit 1 if one differs")
    parser.add_argument("--repo-url", metavar="URL",
                        help="default of the install cell's PACKAGE_SOURCE field: the "
                             "repository's address (https://github.com/<owner>/<repo>, pip "
                             "gets git+ in front) or a wheel's URL; empty without it")
    parser.add_argument("--out-dir", type=Path, default=NOTEBOOKS_DIR,
                        help="where the .ipynb files are written or compared (default: here)")
    args = parser.parse_args(argv)
    try:
        generated = notebooks(args.repo_url)
    except ValueError as error:
        parser.error(str(error))
    stale = []
    for name, notebook in generated.items():
        path = args.out_dir / name
        text = render(notebook)
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    extra = sorted({path.name for path in args.out_dir.glob("*.ipynb")} - set(generated))
    if extra:
        print(f"no script for {', '.join(extra)}: expected NN_name.py beside each notebook",
              file=sys.stderr)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/build_notebooks.py",
              file=sys.stderr)
    return 1 if stale or extra else 0


if __name__ == "__main__":
    sys.exit(main())
