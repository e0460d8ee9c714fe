"""Ablations: a study of the paper's (a spec, risda/runner/specs/*.toml) as one Ray Tune grid
experiment, a trial per cell, collated into tables and a figure.

- `spec`: what a study runs (the spec, its grid, the cells with their full Config).
- `experiment`: a plan as a Ray Tune experiment, and its results back as trial dicts.
- `tables`: runs -> summary over seeds -> the paper-layout tables (rich, Markdown, LaTeX).
- `figures`: the study's figure.
- `cli`: the command line, `python ablations/run.py`.
"""
