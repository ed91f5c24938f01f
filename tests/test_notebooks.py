"""Tests of the Colab notebooks (notebooks/): the committed .ipynb files are stripped and
identical to what notebooks/build_notebooks.py generates from their jupytext percent scripts,
the install cell takes the package source from a Colab form field and ships no placeholder
address, and both notebooks run top to bottom on CPU with the small-size switch
(SMINE_NOTEBOOK_SMALL=1) on a tiny Omniglot-layout folder: no error output, every figure
written as a PNG and shown."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from test_train import make_omniglot_folder

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_FIGURES = {
    "01_quickstart.ipynb": ("01_recall_at_1.png", "01_kappa_training_error.png",
                            "01_mined_triplets.png", "01_tsne.png"),
    "02_sample_triplets.ipynb": ("02_training.png", "02_picked_triplets.png",
                                 "02_kappa_sweep.png"),
}
KERNEL_NAME = "smine-notebook-test"
CELL_TIMEOUT_S = 300
# A GitHub or Colab address whose owner and repository are capitalised stand-ins (the old
# badges' kind), or a Markdown link target with a <placeholder>; the generic pattern written as
# text (github.com/<owner>/<repo>) is documentation, not a link.
PLACEHOLDER_LINK = re.compile(
    r"(?:github\.com|colab\.research\.google\.com/github)/[A-Z_]+/[A-Z_]+\b|\]\(https?://[^)\s]*<")


def _load_generator():
    spec = importlib.util.spec_from_file_location("build_notebooks",
                                                  NOTEBOOKS / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return _load_generator()


def _committed_source(generator) -> str | None:
    """The --repo-url the committed notebooks were built with (None: the field is empty)."""
    defaults = {generator.field_default(nbformat.read(NOTEBOOKS / name, as_version=4))
                for name in EXPECTED_FIGURES}
    assert len(defaults) == 1, f"PACKAGE_SOURCE defaults differ between notebooks: {defaults}"
    return defaults.pop() or None


def _repo_url_args(generator) -> list[str]:
    source = _committed_source(generator)
    return ["--repo-url", source] if source else []


def _cells(notebook: nbformat.NotebookNode) -> list[tuple]:
    return [(cell.cell_type, cell.source, cell.metadata.get("tags", [])) for cell in
            notebook.cells]


def _install_cell(notebook: nbformat.NotebookNode) -> str:
    return next(cell.source for cell in notebook.cells if cell.cell_type == "code")


# ----------------------------------------------------------------------------------------------
# The committed files.


def test_committed_notebooks_match_their_percent_scripts(generator, tmp_path):
    scripts = {path.with_suffix(".ipynb").name for path in generator.scripts()}
    assert scripts == set(EXPECTED_FIGURES)
    committed = {path.name for path in NOTEBOOKS.glob("*.ipynb")}
    assert committed == scripts, "every notebook comes from a percent script NN_name.py"
    repo_url = _repo_url_args(generator)
    assert generator.main(["--out-dir", str(tmp_path), *repo_url]) == 0
    for name in sorted(scripts):
        regenerated = nbformat.read(tmp_path / name, as_version=4)
        on_disk = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert _cells(on_disk) == _cells(regenerated), (
            f"{name} differs from {name[:-6]}.py: run python notebooks/build_notebooks.py")
        assert (NOTEBOOKS / name).read_text(encoding="utf-8") == (
            tmp_path / name).read_text(encoding="utf-8"), f"{name}: metadata or ids differ"
    assert generator.main(["--check", *repo_url]) == 0


def test_generator_check_reports_a_stale_file(generator, tmp_path, capsys):
    out = str(tmp_path)
    assert generator.main(["--check", "--out-dir", out]) == 1  # nothing written yet
    assert "out of date" in capsys.readouterr().err
    assert generator.main(["--out-dir", out]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(EXPECTED_FIGURES)
    assert generator.main(["--check", "--out-dir", out]) == 0
    first = tmp_path / "01_quickstart.ipynb"
    first.write_text(first.read_text().replace("Recall@1", "Recall@2"))
    assert generator.main(["--check", "--out-dir", out]) == 1


def test_an_edited_script_makes_the_committed_notebook_stale(generator, tmp_path, monkeypatch,
                                                            capsys):
    for script in generator.scripts():
        shutil.copy(script, tmp_path / script.name)
    monkeypatch.setattr(generator, "NOTEBOOKS_DIR", tmp_path)
    committed = ["--out-dir", str(NOTEBOOKS), *_repo_url_args(generator)]
    assert generator.main(["--check", *committed]) == 0
    script = tmp_path / "02_sample_triplets.py"
    script.write_text(script.read_text(encoding="utf-8").replace(
        "KAPPA = 2.0", "KAPPA = 3.0"), encoding="utf-8")
    assert generator.main(["--check", *committed]) == 1
    assert "out of date: 02_sample_triplets.ipynb" in capsys.readouterr().err


def test_shared_cells_are_written_once_and_placed_by_name(generator, tmp_path, monkeypatch):
    built = generator.notebooks()
    for header in ("# @title Install smine_jax", "# Backend:", "# Figure helpers:"):
        sources = [cell.source for notebook in built.values() for cell in notebook.cells
                   if cell.source.startswith(header)]
        assert len(sources) == len(built), header  # once in every notebook
    for name in generator.scripts():  # the scripts hold placeholders, not copies
        assert "# @title Install smine_jax" not in name.read_text(encoding="utf-8")
    for script in generator.scripts():
        shutil.copy(script, tmp_path / script.name)
    monkeypatch.setattr(generator, "NOTEBOOKS_DIR", tmp_path)
    script = tmp_path / "01_quickstart.py"
    script.write_text(script.read_text(encoding="utf-8").replace(
        "# shared cell: backend", "# shared cell: bakend"), encoding="utf-8")
    with pytest.raises(ValueError, match="01_quickstart.py: shared cell 'bakend'"):
        generator.notebooks()


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_committed_notebook_is_stripped_and_parameterised(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["accelerator"] == "TPU"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert "widgets" not in notebook.metadata and "jupytext" not in notebook.metadata
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    for variable in ("SMINE_NOTEBOOK_SMALL", "SMINE_NOTEBOOK_DATA", "SMINE_NOTEBOOK_FIGURES"):
        assert variable in tagged[0].source
    # The install cell comes first (Colab form field, pip), then the backend is printed.
    install, backend = code[0].source, code[1].source
    assert "google.colab" in install and "pip" in install
    assert "jax.devices()" in backend
    for figure in EXPECTED_FIGURES[name]:
        assert f'"{figure}"' in "".join(cell.source for cell in code)


# ----------------------------------------------------------------------------------------------
# The package source: a Colab form field, no placeholder address.


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_install_cell_takes_the_package_source_from_a_form_field(name, generator):
    install = _install_cell(nbformat.read(NOTEBOOKS / name, as_version=4))
    assert install.startswith("# @title "), "Colab shows the cell as a form"
    assert re.search(r'^PACKAGE_SOURCE = ".*"  # @param \{type:"string"\}$', install, re.M)
    assert re.search(r"^EXTRA = \"tpu\"  # @param \[", install, re.M)
    source = _committed_source(generator)
    assert source is None or generator.package_source(source) == source
    assert "REPO_URL" not in install


def test_no_placeholder_address_is_shipped():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: " + listed.stderr.strip())
    this_file = Path(__file__).resolve().relative_to(REPO).as_posix()  # holds the samples below
    found = []
    for relative in listed.stdout.splitlines():
        path = REPO / relative
        if relative == this_file or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        content = path.read_bytes()
        if b"\0" in content:  # binary (images, archives)
            continue
        text = content.decode("utf-8", errors="ignore")
        found += [f"{relative}: {match.group(0)}" for match in PLACEHOLDER_LINK.finditer(text)]
    assert not found, "placeholder addresses:\n" + "\n".join(found)
    assert PLACEHOLDER_LINK.search("https://github.com/USER/PROJECT/blob/main/x.ipynb")
    assert PLACEHOLDER_LINK.search("[badge](https://colab.research.google.com/github/<owner>/x)")
    assert not PLACEHOLDER_LINK.search("git+https://github.com/<owner>/<repo>")
    assert not PLACEHOLDER_LINK.search("https://github.com/google/jax")


def _run_install_cell(name: str, runs: list[list[str]], returncode: int = 0) -> dict:
    """The install cell executed here (smine_jax importable: it installs nothing), with pip
    replaced by a recorder of the command lines it would run."""
    namespace: dict = {}
    exec(_install_cell(nbformat.read(NOTEBOOKS / name, as_version=4)), namespace)

    class FakeSubprocess:
        @staticmethod
        def run(argv):
            runs.append(argv)
            return subprocess.CompletedProcess(argv, returncode)

    namespace["subprocess"] = FakeSubprocess
    return namespace


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_empty_package_source_gives_a_message_not_a_pip_error(name):
    runs = []
    cell = _run_install_cell(name, runs)
    for value in ("", "   "):
        with pytest.raises(SystemExit) as exit_info:
            cell["install"](value, "tpu")
        message = str(exit_info.value)
        assert "PACKAGE_SOURCE is empty" in message
        assert "git+https://" in message and ".whl" in message and "form field" in message
    for value in ("smine_jax", "github.com/x/y", "git+https://github.com/<owner>/<repo>",
                  "missing/smine_jax-0.1-py3-none-any.whl"):
        with pytest.raises(SystemExit, match="PACKAGE_SOURCE"):
            cell["install"](value, "tpu")
    assert runs == [], "pip never ran"


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_install_cell_hands_pip_a_git_url_or_a_wheel(name, tmp_path):
    runs = []
    cell = _run_install_cell(name, runs)
    requirement = cell["pip_requirement"]
    git = "git+https://example.org/someone/smine_jax.git@main"
    assert requirement(git, "tpu") == f"smine_jax[tpu] @ {git}"
    assert requirement(f" {git} ", "") == git
    assert requirement("https://example.org/someone/smine_jax", "gpu") == (
        "smine_jax[gpu] @ git+https://example.org/someone/smine_jax")
    wheel_url = "https://example.org/dist/smine_jax-0.1-py3-none-any.whl"
    assert requirement(wheel_url, "tpu") == f"smine_jax[tpu] @ {wheel_url}"
    wheel = tmp_path / "smine_jax-0.1-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert requirement(str(wheel), "tpu") == f"smine_jax[tpu] @ {wheel.as_uri()}"
    cell["install"](git, "tpu")
    assert runs == [[sys.executable, "-m", "pip", "install", "--quiet",
                     f"smine_jax[tpu] @ {git}"]]
    failing = _run_install_cell(name, runs, returncode=1)
    with pytest.raises(SystemExit, match="PACKAGE_SOURCE: pip could not install"):
        failing["install"](git, "tpu")


def test_generator_fills_the_field_from_repo_url(generator, tmp_path, capsys):
    url = "https://github.com/someone/smine_jax"
    assert generator.main(["--out-dir", str(tmp_path), "--repo-url", url]) == 0
    for name in EXPECTED_FIGURES:
        notebook = nbformat.read(tmp_path / name, as_version=4)
        assert generator.field_default(notebook) == f"git+{url}"
    assert generator.package_source(None) == ""
    assert generator.package_source(f"git+{url}") == f"git+{url}"
    for bad in ("someone/smine_jax", "https://github.com/<owner>/<repo>", 'https://x/"y'):
        with pytest.raises(SystemExit):
            generator.main(["--check", "--out-dir", str(tmp_path), "--repo-url", bad])
        assert "--repo-url" in capsys.readouterr().err


def test_script_with_a_filled_in_field_is_refused(generator, tmp_path, monkeypatch):
    shared = tmp_path / generator.SHARED_SCRIPT.name
    shared.write_text(generator.SHARED_SCRIPT.read_text(encoding="utf-8").replace(
        'PACKAGE_SOURCE = ""', 'PACKAGE_SOURCE = "git+https://example.org/x"'), encoding="utf-8")
    monkeypatch.setattr(generator, "SHARED_SCRIPT", shared)
    with pytest.raises(ValueError, match="01_quickstart.py: PACKAGE_SOURCE.*--repo-url"):
        generator.notebooks()


# ----------------------------------------------------------------------------------------------
# Execution on CPU.


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A kernel spec that runs this interpreter (sys.executable): the venv's own `python3`
    spec says "python", which resolves through PATH to whatever interpreter is found first."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL_NAME, overrides={"display_name": KERNEL_NAME})
    spec = json.loads((kernels / KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return KernelSpecManager(kernel_dirs=[str(kernels)])


@pytest.fixture(scope="module")
def omniglot_folder(tmp_path_factory):
    return make_omniglot_folder(tmp_path_factory.mktemp("data") / "omniglot")


def _execute(path: Path, kernel_spec_manager, workdir: Path) -> nbformat.NotebookNode:
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    manager = AsyncKernelManager(kernel_name=KERNEL_NAME,
                                 kernel_spec_manager=kernel_spec_manager)
    client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT_S, allow_errors=True,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return notebook


def _errors(notebook: nbformat.NotebookNode) -> list[str]:
    return [f"cell {index}: {output.ename}: {output.evalue}\n{cell.source[:300]}"
            for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
            for output in cell.outputs if output.output_type == "error"]


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_notebook_runs_on_cpu_and_writes_its_figures(name, kernel_spec_manager, omniglot_folder,
                                                     tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    monkeypatch.setenv("SMINE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("SMINE_NOTEBOOK_DATA", str(omniglot_folder))
    monkeypatch.setenv("SMINE_NOTEBOOK_FIGURES", str(figures))
    monkeypatch.setenv("SMINE_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("SMINE_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = _execute(NOTEBOOKS / name, kernel_spec_manager, tmp_path)

    assert not _errors(notebook), "\n\n".join(_errors(notebook))
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), "every cell ran"
    assert code[0].outputs == [], "off Colab, with smine_jax importable, nothing is installed"
    assert "CPU backend" in "".join(output.get("text", "") for output in code[1].outputs)
    for figure in EXPECTED_FIGURES[name]:
        path = figures / figure
        assert path.is_file(), f"{name} did not write {figure}"
        content = path.read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 1000, figure
    shown = [output for cell in code for output in cell.outputs
             if "image/png" in output.get("data", {})]
    assert len(shown) == len(EXPECTED_FIGURES[name]), "each figure is also shown inline"
    if name == "01_quickstart.ipynb":  # the trainer's records the figures were drawn from
        records = [json.loads(line) for line in
                   (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["mining"] for r in records] == [False, True, True]
        assert all("test" in r for r in records)
