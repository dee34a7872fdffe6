"""``fedtl bench``: a grid of runs declared in one TOML spec, run, resumed and reported.

- ``spec``: the spec format, its validation and the grid of cells it expands to;
- ``runner``: runs the cells (each a fedtl run directory) on Flower's Simulation Engine,
  reusing finished cells and resuming unfinished ones;
- ``report``: results.csv, report.md and report.html with the figures of ``figures``.
"""
