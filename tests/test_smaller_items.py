"""Issue 25, item 5, the smaller items: an --arms typo is blamed on the flag; a diverged trial
points at no scratch folder; --retry-errored is suggested only for what a retry can fix; a best
trial at chance level is marked in best.json. Nothing here trains or starts Ray."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from risda.runner import search


def one_error(capsys) -> str:
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out.out + out.err, out
    return lines[0]


def test_an_arms_typo_is_blamed_on_the_flag(capsys):
    from risda.runner.ablation import cli
    assert cli.main(["--arms", "risda,cee", "--seeds", "0", "--dry-run"]) == 2
    line = one_error(capsys)
    assert line.startswith("error: --arms: unknown arm 'cee': choose from risda,") and "spec" not in line, line


def test_a_diverged_trial_does_not_point_at_its_scratch_folder(monkeypatch):
    from risda.runner import retry
    from risda.trainer.loop import DivergedError
    reported = []
    monkeypatch.setattr(retry.tune, "report", reported.append)
    scratch = "/tmp/risda-trial-abc-x/checkpoint.pt"
    with pytest.raises(DivergedError) as e:
        with retry.reporting_divergence({"seed": 0}):
            raise DivergedError("diverged: the mean training loss became nan at epoch 3", "", scratch)
    assert scratch not in str(e.value) and scratch not in reported[0][retry.DIVERGED_KEY]
    assert str(e.value) == "diverged: the mean training loss became nan at epoch 3"


def test_a_run_names_its_last_good_checkpoint_only_when_there_is_one(tiny_config, tmp_path):
    import torch

    import risda.trainer.loop
    from risda.trainer.loop import DivergedError, check_diverged
    cfg = tiny_config().resolved()
    with pytest.raises(DivergedError) as e:
        check_diverged(torch.tensor(float("nan")), 1, cfg, 2, 0.1, tmp_path)
    assert "checkpoint" not in str(e.value)  # none was written: nothing to point at
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(DivergedError, match=f"lower --lr, --alpha or --beta. The last good checkpoint is {tmp_path}/"):
        risda.trainer.loop.check_diverged(torch.tensor(float("nan")), 1, cfg, 2, 0.1, tmp_path)


class Console:
    def __init__(self):
        self.lines = []

    def print(self, text, **k):
        self.lines.append(text)


@pytest.mark.parametrize("errors, hint", [
    (["risda.trainer.DivergedError: diverged: nan"] * 3, "all diverged: a retry would diverge again"),
    (["risda.trainer.DivergedError: diverged: nan", "RayActorError: the actor died"],
     "1 diverged, which a retry would repeat; rerun with --retry-errored to continue the other 1"),
])
def test_the_retry_hint_only_for_what_a_retry_can_fix(errors, hint):
    from risda.runner.collate import Outcome
    trials = pd.DataFrame({"status": ["ERROR"] * len(errors), "error": errors})
    console = Console()
    assert Outcome.of(trials, len(errors)).report(console, retry_hint=True) == 1
    assert hint in console.lines[0] and ("--retry-errored" in console.lines[0]) == ("other" in hint), console.lines


def test_best_json_of_a_best_trial_at_chance_says_so(tmp_path, monkeypatch):
    row = dict(trial_id="t1", status="TERMINATED", completed=True, final_val_error=90.0, best_val_error=90.0,
               started_at=0.0, config=json.dumps({"alpha": 0.5}), summary="{}", alpha=0.5, stage1_key="k",
               **{f"final_{k}": 90.0 for k in ("test_error", "test_many_error", "test_medium_error", "test_few_error")})
    monkeypatch.setattr(search, "collate", lambda grid, **k: (pd.DataFrame([row]), pd.DataFrame({"epoch": []})))
    trials, best, _ = search.write_results(None, tmp_path, ["alpha"], dict(search_seed=0, experiment="e", name="n",
                                                                        num_samples=1), num_classes=10)
    saved = json.loads((tmp_path / "best.json").read_text())
    assert saved["at_chance"] is True and saved["chance_error"] == 90.0
    assert search.at_chance(89.5, 10) and not search.at_chance(88.5, 10) and search.at_chance(98.5, 100)
