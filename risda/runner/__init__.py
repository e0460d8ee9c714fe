"""The experiment runner: the trainer, unchanged, as Ray Tune trials, from one laptop to a
multi-node Ray cluster. The only part of the package that imports ray, pandas or matplotlib.

- `trainables`: the trainer as Ray Tune function trainables (one run; one shared stage I).
- `cluster`: Ray start-up, the resource check, storage paths, restore-or-new Tuners, the flags.
- `stage1`: the shared stage Is trained before the stage-II trials (risda.trainer.stage1: key and cache).
- `collate`: a ResultGrid as tables (trials, epochs), the best trial, how the trials ended.
- `progress`: the driver's progress bar and its table of the best trials.
- `search`: the Optuna search of α, β and the head count (`python tune/search.py`).
- `ablation`: studies as grid experiments: specs, cells, tables, figures (`python ablations/run.py`).
- `report`: a Markdown reproduction report of a study (`python ablations/report.py`).
- `specs/`: the bundled ablation specs (TOML).
"""
