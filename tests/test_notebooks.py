"""Tests of the Colab notebooks (notebooks/): committed stripped and identical to what
notebooks/build_notebooks.py generates, and executed top to bottom on CPU with the small-size
switch (SMINE_NOTEBOOK_SMALL=1) on a tiny Omniglot-layout folder: no error output, every figure
written as a PNG and shown."""

from __future__ import annotations

import importlib.util
import json
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


def _load_generator():
    spec = importlib.util.spec_from_file_location("build_notebooks",
                                                  NOTEBOOKS / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return _load_generator()


# ----------------------------------------------------------------------------------------------
# The committed files.


def test_committed_notebooks_are_exactly_what_the_generator_writes(generator):
    generated = generator.notebooks()
    assert set(generated) == set(EXPECTED_FIGURES)
    committed = {path.name for path in NOTEBOOKS.glob("*.ipynb")}
    assert committed == set(generated), "every notebook comes from build_notebooks.py"
    for name, notebook in generated.items():
        text = (NOTEBOOKS / name).read_text(encoding="utf-8")
        assert text == generator.render(notebook), (
            f"{name} differs from build_notebooks.py: run python notebooks/build_notebooks.py")
    assert generator.main(["--check"]) == 0


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_committed_notebook_is_stripped_and_parameterised(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert "widgets" not in notebook.metadata
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    for variable in ("SMINE_NOTEBOOK_SMALL", "SMINE_NOTEBOOK_DATA", "SMINE_NOTEBOOK_FIGURES"):
        assert variable in tagged[0].source
    # The set-up cell comes first: Colab install from REPO_URL, then the backend is printed.
    setup = code[0].source
    assert "REPO_URL" in setup and "google.colab" in setup and "jax.devices()" in setup
    for figure in EXPECTED_FIGURES[name]:
        assert f'"{figure}"' in "".join(cell.source for cell in code)


def test_generator_check_reports_a_stale_file(generator, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generator, "NOTEBOOKS_DIR", tmp_path)
    assert generator.main(["--check"]) == 1  # nothing written yet
    assert "out of date" in capsys.readouterr().err
    assert generator.main([]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(EXPECTED_FIGURES)
    assert generator.main(["--check"]) == 0
    first = tmp_path / "01_quickstart.ipynb"
    first.write_text(first.read_text().replace("Recall@1", "Recall@2"))
    assert generator.main(["--check"]) == 1


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
    assert "CPU backend" in "".join(output.get("text", "") for output in code[0].outputs)
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
