"""A trial reproduced by hand: `python -m risda.train --config results/<name>/best.json` retrains the
best trial of a search with the thread counts its stage I and its stage II ran on (and their
compile decision), so that fp32 on a CPU gives the trial's numbers exactly. Typed flags override
the file."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from risda.trainer.config import Config
from risda.runner import search
from risda.trainer.cli import build_parser, main, replay_fields, run_config
from risda.trainer.loop import record_stage1, train
from test_search import read_outputs, tiny_argv


def best_json(tmp_path, **recorded) -> str:
    """A best.json as tune/search.py writes it (its config as the trial's param space had it)."""
    config = Config(dataset="cifar10lt", data_root="/data/c10", imbalance=100, n_max=100, val_per_class=10, epochs=4,
                    alpha=0.7, beta=0.4, head_count=2, precision="fp32").to_dict()
    doc = {"config": config, "params": {"alpha": 0.7}, "metric": "val_error", "value": 60.0, "trial_id": "abc",
           "test_error": 70.0, **recorded}
    path = tmp_path / "results" / "s" / "best.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return str(path)


RAN = dict(torch_threads=1, compile=False, stage1_torch_threads=2, stage1_compile=False)


# --- no training -------------------------------------------------------------------------------
def test_best_json_gives_its_config_and_the_threads_of_each_stage(tmp_path, capsys):
    path = best_json(tmp_path, **RAN)
    fields, note = replay_fields(path)
    assert note is None
    cfg = run_config(build_parser().parse_args(["--config", path]))
    assert (cfg.threads, cfg.stage1_threads, cfg.compile) == (1, 2, "off")  # compile as it was decided, not auto
    assert (cfg.alpha, cfg.beta, cfg.head_count, cfg.n_max, cfg.precision) == (0.7, 0.4, 2, 100, "fp32")
    assert cfg.out == str(tmp_path / "results" / "s" / "replay")  # beside the file, never the trial's scratch
    assert capsys.readouterr().err == ""


def test_typed_flags_override_the_file(tmp_path):
    path = best_json(tmp_path, **RAN)
    args = build_parser().parse_args(["--config", path, "--alpha", "0.9", "--threads", "3", "--compile", "on",
                                      "--out", str(tmp_path / "mine"), "--epochs", "6"])
    cfg = run_config(args)
    assert (cfg.alpha, cfg.threads, cfg.compile, cfg.out, cfg.epochs) == (0.9, 3, "on", str(tmp_path / "mine"), 6)
    assert (cfg.stage1_threads, cfg.beta, cfg.head_count) == (2, 0.4, 2)  # what was not typed comes from the file
    assert cfg.resolved().stage1_epochs == 4  # the file's schedule is unresolved: --epochs rescales stage I


def test_a_summary_json_replays_too_and_its_out_and_resume_are_not_taken(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    config = Config(epochs=4, out=str(run), resume=True, progress=False, threads=2).resolved().to_dict()
    (run / "summary.json").write_text(json.dumps({"config": config, "test_error": 50.0, "torch_threads": 2,
                                                  "compile": False, "stage1_torch_threads": 2, "stage1_compile": False}))
    cfg = run_config(build_parser().parse_args(["--config", str(run / "summary.json")]))
    assert (cfg.out, cfg.resume, cfg.progress) == (str(run / "replay"), False, True)
    assert (cfg.threads, cfg.stage1_threads, cfg.stage1_epochs, cfg.lr_milestones) == (2, 2, 3, (3, 3))


def test_an_older_file_replays_with_one_line_saying_it_may_differ(tmp_path, capsys):
    cfg = run_config(build_parser().parse_args(["--config", best_json(tmp_path)]))  # no recorded threads
    assert (cfg.threads, cfg.stage1_threads, cfg.compile) == (None, None, "auto")
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "may differ" in err and "stage1_torch_threads" in err
    # stage II's count known, stage I's not (a stage I cached before it was recorded)
    _, note = replay_fields(best_json(tmp_path, torch_threads=1, compile=False))
    assert "does not record stage1_torch_threads, stage1_compile (" in note
    # stage I compiled and stage II not: one run cannot do both
    fields, note = replay_fields(best_json(tmp_path, **{**RAN, "stage1_compile": True}))
    assert "compile decision" in note and fields["compile"] == "auto"


def test_no_stage1_needs_no_stage1_record(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"config": Config(arm="isda", epochs=4, stage1_epochs=0).to_dict(),
                                "torch_threads": 1, "compile": False}))
    fields, note = replay_fields(path)
    assert note is None and fields["threads"] == 1 and fields["stage1_threads"] is None


@pytest.mark.parametrize("content,message", [
    (None, "no such file"), ("not json {", "is not JSON"), ('{"test_error": 1}', 'no "config" object'),
    ('[1, 2]', 'no "config" object'), ('{"config": {"alpha": 0.5, "nope": 1}}', "unknown config field"),
    ('{"config": {"alpha": -1}}', "--alpha must be"),
])
def test_a_bad_file_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "best.json"
    if content is not None:
        path.write_text(content)
    assert main(["--config", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err


def test_the_stage1_record_is_unknown_once_a_resumed_stage1_ran_otherwise():
    info = {}
    record_stage1(info, 0, torch_threads=2, compile=False)
    record_stage1(info, 1, torch_threads=2, compile=False)
    assert info == {"stage1_torch_threads": 2, "stage1_compile": False}
    record_stage1(info, 2, torch_threads=1, compile=False)  # resumed on another machine
    assert info == {"stage1_torch_threads": None, "stage1_compile": False}
    fresh = {}
    record_stage1(fresh, 3, torch_threads=1, compile=False)  # resumed from a checkpoint that did not record it
    assert fresh == {"stage1_torch_threads": None, "stage1_compile": None}


# --- the trainer -------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_trainer_runs_each_stage_on_its_threads_and_records_them(tiny_config, tmp_path):
    before = torch.get_num_threads()
    seen = []
    run = dict(arm="ce_drw", epochs=2, stage1_epochs=1, lr=0.02, threads=1, stage1_threads=2)
    summary = train(tiny_config(**run), on_epoch=lambda record, _: seen.append(torch.get_num_threads()))
    assert seen == [2, 1]
    assert (summary["torch_threads"], summary["stage1_torch_threads"], summary["stage1_compile"]) == (1, 2, False)
    assert torch.get_num_threads() == before  # put back for whatever runs next in the process

    # A stage I trained on 2 threads, forked on 1: the fork's summary says both, and its weights are
    # those of the run above, bit for bit.
    done = train(tiny_config(**run, out=str(tmp_path / "s1")), stage1_only=True)
    assert done["stage1_torch_threads"] == 2
    forked = train(tiny_config(**{**run, "stage1_threads": None}, out=str(tmp_path / "fork")),
                   stage1_from=done["checkpoint"])
    assert (forked["torch_threads"], forked["stage1_torch_threads"]) == (1, 2)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("run", "fork"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- a search, then its best trial by hand -------------------------------------------------------
@pytest.mark.slow
def test_the_best_trial_replayed_by_hand_gives_its_numbers_exactly(cifar10_root, tmp_path, local_ray, capsys):
    # local_ray has two CPUs: the shared stage I alone takes both (2 threads), the stage-II trials one each
    name = "replay"
    argv = tiny_argv(cifar10_root, tmp_path, name, "--num-samples", "1", "--max-concurrent", "1", "--scheduler", "none",
                     "--precision", "fp32", "--device", "cpu")
    assert search.main(argv) == 0
    _, epochs, best = read_outputs(tmp_path, name)
    stage1 = pd.read_parquet(tmp_path / "results" / name / "stage1.parquet")
    # how each phase ran is recorded: the stage I had the node's 2 CPUs, the trial 1
    assert (best["stage1_torch_threads"], best["torch_threads"]) == (2, 1)
    assert best["stage1_compile"] is False and best["compile"] is False
    assert stage1["torch_threads"].tolist() == [2] and best["stage1_key"] == stage1["stage1_key"].iloc[0]
    capsys.readouterr()

    out = tmp_path / "by-hand"
    assert main(["--config", str(tmp_path / "results" / name / "best.json"), "--out", str(out), "--no-progress"]) == 0
    assert "may differ" not in capsys.readouterr().err
    replay = json.loads((out / "summary.json").read_text())
    assert (replay["stage1_torch_threads"], replay["torch_threads"]) == (2, 1)  # the threads were honoured
    assert replay["epochs_run"] == replay["config"]["epochs"]  # from scratch: stage I too
    assert replay["config"]["alpha"] == best["params"]["alpha"] and replay["config"]["beta"] == best["params"]["beta"]
    for mine, theirs in (("test_error", "test_error"), ("many_error", "test_many_error"),
                         ("medium_error", "test_medium_error"), ("few_error", "test_few_error")):
        assert replay[mine] == best[theirs], mine  # exactly: fp32, CPU, the same threads in each stage
    mine, trial = pd.read_parquet(out / "epochs.parquet").iloc[-1], epochs[epochs.trial_id == best["trial_id"]].iloc[-1]
    assert mine["val_error"] == best["value"]  # the search's metric too
    # The errors of so tiny a run barely move; its training loss is exact to the last bit only on the
    # recorded threads (measured: stage I on 1 thread, or stage II on 2, changes its last digits).
    assert mine["train_loss"] == trial["train_loss"]
