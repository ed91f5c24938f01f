"""The public functions document themselves: ``help(f)`` is enough to call them right.

Each docstring opens with a one-line summary, then Google-style sections: ``Args:`` with one
entry per parameter of the signature (shapes, dtypes, ranges written out, not "as in X"),
``Returns:`` and ``Raises:``. A new or renamed argument without its own Args entry fails here.
"""

import doctest
import importlib
import inspect
import io
import re

import pytest
from test_public_interface import CONTRACT

# The public interface, listed explicitly (test_public_interface.py pins the same names'
# signatures; test_covers_the_contract keeps the two lists in step).
PUBLIC = (
    "smine_jax.losses.triplet_ratio_loss",
    "smine_jax.losses.triplet_margin_loss",
    "smine_jax.losses.global_loss",
    "smine_jax.metrics.recall_at_k",
    "smine_jax.metrics.nmi_from_assignments",
    "smine_jax.metrics.kmeans",
    "smine_jax.metrics.nmi",
    "smine_jax.metrics.map_at_r",
    "smine_jax.metrics.r_precision",
    "smine_jax.metrics.evaluate",
    "smine_jax.index.write_shard",
    "smine_jax.index.read_shards",
    "smine_jax.index.neighbours",
    "smine_jax.mining.sample_triplets",
    "smine_jax.mining.random_triplets",
    "smine_jax.mining.index_batches",
    "smine_jax.controller.init",
    "smine_jax.controller.update",
    "smine_jax.controller.calibrate_kappa",
    "smine_jax.train.train_and_evaluate",
)

# Functions next to the interface that the trainer, the benchmarks and the notebooks call
# directly: held to the same standard.
COMPANIONS = (
    "smine_jax.mining.mine_triplets",
    "smine_jax.mining.epoch_triplets",
    "smine_jax.mining.boundary_ratios",
    "smine_jax.losses.triplet_objective",
    "smine_jax.losses.indexed_triplet_objective",
    "smine_jax.losses.lifted_structure_loss",
    "smine_jax.losses.npairs_loss",
    "smine_jax.index.build_index",
    "smine_jax.batch_miners.semihard_triplets",
    "smine_jax.batch_miners.batch_hard_triplets",
    "smine_jax.batch_miners.distance_weighted_triplets",
    "smine_jax.batch_miners.all_triplets",
    "smine_jax.data.load",
    "smine_jax.data.build_dataset",
    "smine_jax.data.preprocessors",
    "smine_jax.data.augment",
    "smine_jax.data.center_crop",
    "smine_jax.data.inference_batches",
    "smine_jax.data.m_per_class_batches",
    "smine_jax.models.build_model",
    "smine_jax.models.init_variables",
    "smine_jax.models.param_labels",
)

# Known gaps, each with its reason. strict: once the docstring is complete the test passes,
# the xfail turns into a failure, and the entry must be removed from here.
PENDING: dict[str, str] = {}  # dotted name -> why its docstring is not complete yet (xfail)

SECTION = re.compile(r"^(?P<name>[A-Z][A-Za-z ]*):\s*$")
# An Args entry: two spaces, the name (``*args`` / ``**kwargs`` with their stars), an optional
# "(type)", a colon.
ENTRY = re.compile(r"^  (?P<name>\*{0,2}[A-Za-z_]\w*)(?: \([^)]*\))?:(?P<text>.*)$")
# Descriptions that send the reader elsewhere instead of saying what the argument is.
POINTER = re.compile(r"^\s*(as in\b|as\b|see\b|same as\b)", re.IGNORECASE)


def _resolve(dotted):
    module_name, attribute = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), attribute)


def _sections(doc):
    """{section name: its lines} of a cleaned docstring; "" holds the text before the first."""
    sections, current = {"": []}, ""
    for line in doc.splitlines():
        match = SECTION.match(line)
        if match:
            current = match["name"]
            sections[current] = []
        else:
            sections[current].append(line)
    return sections


def _args_entries(lines):
    """{parameter name without stars: first line of its description} of an Args section."""
    entries = {}
    for line in lines:
        match = ENTRY.match(line)
        if match:
            entries[match["name"].lstrip("*")] = match["text"]
    return entries


def _parameters(function):
    return [name for name in inspect.signature(function).parameters if name != "self"]


def _check(function, dotted):
    """AssertionError naming ``dotted`` unless ``function``'s docstring stands alone."""
    doc = inspect.getdoc(function)
    assert doc, f"{dotted}: no docstring"
    lines = doc.splitlines()
    assert lines[0].strip() and not SECTION.match(lines[0]), (
        f"{dotted}: the docstring must open with a one-line summary, got {lines[0]!r}")
    assert len(lines) == 1 or not lines[1].strip(), (
        f"{dotted}: the summary must be one line followed by a blank line")

    sections = _sections(doc)
    parameters = _parameters(function)
    if parameters:
        assert "Args" in sections, f"{dotted}: no 'Args:' section for {parameters}"
        entries = _args_entries(sections["Args"])
        missing = [name for name in parameters if name not in entries]
        assert not missing, f"{dotted}: Args has no entry for {missing}"
        unknown = sorted(set(entries) - set(parameters))
        assert not unknown, f"{dotted}: Args documents {unknown}, not in the signature"
        pointers = {name: text.strip() for name, text in entries.items()
                    if POINTER.match(text)}
        assert not pointers, (
            f"{dotted}: Args entries refer elsewhere instead of saying what they are: {pointers}")
    for section in ("Returns", "Raises"):
        assert section in sections, f"{dotted}: no '{section}:' section"
        assert any(line.strip() for line in sections[section]), (
            f"{dotted}: the '{section}:' section is empty")


def _marks(dotted):
    if dotted in PENDING:
        return [pytest.mark.xfail(reason=PENDING[dotted], strict=True)]
    return []


@pytest.mark.parametrize(
    "dotted", [pytest.param(name, marks=_marks(name)) for name in PUBLIC + COMPANIONS])
def test_docstring_stands_alone(dotted):
    _check(_resolve(dotted), dotted)


@pytest.mark.parametrize("dotted", [
    name for name in PUBLIC + COMPANIONS
    if name not in PENDING and ">>>" in (inspect.getdoc(_resolve(name)) or "")])
def test_examples_run(dotted):
    """The Example sections are doctests: they must run and print what they show."""
    tests = doctest.DocTestFinder(recurse=False).find(_resolve(dotted), dotted, globs={})
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()


def test_covers_the_contract():
    missing = sorted(set(CONTRACT) - set(PUBLIC))
    assert not missing, f"public functions without a docstring check: {missing}"


def test_checker_catches_an_undocumented_argument():
    def documented(key, labels):
        """Summary line.

        Args:
          key: PRNG key.
          labels: int[N] class labels.

        Returns:
          Nothing.

        Raises:
          ValueError: never.
        """

    def extended(key, labels, extra=None):
        pass

    extended.__doc__ = documented.__doc__
    _check(documented, "documented")
    with pytest.raises(AssertionError, match=r"no entry for \['extra'\]"):
        _check(extended, "extended")
