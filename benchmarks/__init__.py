"""Benchmarks and the studies behind the generated reports (RESULTS.md, SMART_STUDY.md,
TUNING.md). A package so that the scripts share their pieces (runs, stats, report, plots)
without sys.path edits: run each from the repository root as a module, e.g.
`python -m benchmarks.compare_methods --report-only`."""
