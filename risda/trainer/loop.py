"""The two-stage trainer. Reads top to bottom: data, model, objective, optimiser, the loop.

Stage I (epochs < stage1_epochs) and stage II differ only inside the objective (the "arm");
the loop below is the same for every arm.
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from .arms import ARMS
from .checkpoint import load_checkpoint, load_stage1_checkpoint, save_checkpoint
from .compile import compile_forward, resolve_compile
from .config import Config, RunConfig
from .data import LongTailData, load_long_tail
from ..method.diagnostics import graph_summary
from .evaluate import logit_errors, selected_errors, shot_groups, split_logits
from .failures import RunFailure, divergence_hint, writing
from .risda_objective import SharedStage1
from .models import build_model
from .objectives import POSTHOC_TAUS, Objective
from .precision import resolve_precision
from .progress import TrainProgress
from .stage1 import stage1_key

# on_epoch(record, checkpoint_path_or_None) is called after every epoch.
EpochCallback = Callable[[dict, "Path | None"], None]
# A mean training loss above this is an explosion, not a result. Eq. 11's bound grows with the
# within-class logit variance: ~1e3 after 3 epochs at lr 0.1 on ~300 images (a loose bound, not a
# divergence; it stays put at stage II's lr), ~1e24 when something has really blown up.
DIVERGED_LOSS = 1e4
PROGRESS_EVERY = 20    # steps between the progress bar's loss readings (each one is a host sync)


class DivergedError(RunFailure):
    """The training loss stopped being finite, or exploded. `checkpoint`: the run's last good
    checkpoint, named in the message only where it outlives the run (`elsewhere()` drops it:
    a Ray trial's scratch folder is removed when the trial ends)."""

    def __init__(self, reason: str, hint: str = "", checkpoint: str | None = None):
        super().__init__(reason, hint, checkpoint)
        self.reason, self.hint, self.checkpoint = reason, hint, checkpoint

    def __str__(self) -> str:
        return self.reason + (f". The last good checkpoint is {self.checkpoint}" if self.checkpoint else "") + self.hint

    def elsewhere(self) -> "DivergedError":
        return DivergedError(self.reason, self.hint)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def lr_at(cfg: RunConfig, epoch: int) -> float:
    """Linear warm-up, then ×lr_decay at each milestone (paper: ×0.01 at 160 and 180)."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    return cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.lr_milestones)


def epoch_generator(cfg: RunConfig, epoch: int, device: torch.device) -> torch.Generator:
    # One generator per epoch, seeded from (seed, epoch): a resumed run draws the same
    # batches and crops as an uninterrupted one without saving RNG state.
    return torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch)


def observe_generator(cfg: RunConfig, epoch: int, device: torch.device) -> torch.Generator:
    # The extra augmented passes of the reference variant draw from their own stream, so they
    # leave the training batches (and a shared stage I) exactly as they would be without them.
    return torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch + 500_000_000)


def extract_features(model, split, batch_size, autocast, generator=None, batch_stats=False):
    """(features, logits, labels) over a split, fp32, no gradients, the model left as it was.

    Eval mode by default, with the training augmentation when a generator is given. With
    batch_stats: plain images in shuffled batches (generator) through train-mode batch norm,
    i.e. the features the training loss sees, without touching the running statistics."""
    was_training = model.training
    model.train(batch_stats)
    saved = batch_norm_buffers(model) if batch_stats else None
    feats, logits, labels = [], [], []
    with torch.no_grad(), autocast():
        for x, y in split.batches(batch_size, train=generator is not None and not batch_stats, generator=generator,
                                  shuffle=generator is not None):
            f, z = model(x)
            feats.append(f.float()), logits.append(z.float()), labels.append(y)
    if saved is not None:
        for buffer, value in saved:
            buffer.copy_(value)
    model.train(was_training)
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def batch_norm_buffers(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of every batch-norm running statistic, to put back after a train-mode pass."""
    return [(b, b.clone()) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in m.buffers()]


def make_objective(cfg: RunConfig, class_counts: list[int], feature_dim: int, device: torch.device,
                   stage1_only: bool = False, observe_reference: bool = False) -> Objective:
    """The arm's objective (risda.trainer.arms); with stage1_only, the stage I it shares: plain CE for the
    arms whose stage I is CE, the arm's own objective for those that train it from epoch 0."""
    if stage1_only and ARMS[cfg.arm].stage1 == "ce":
        return SharedStage1(cfg, class_counts, feature_dim, device, observe_reference)
    return ARMS[cfg.arm].objective(cfg, class_counts, feature_dim, device)


def derived_objectives(cfg: RunConfig, class_counts, feature_dim, device) -> dict[str, Objective]:
    """The arms that train exactly cfg's run and differ only in evaluation (risda.trainer.arms
    derived_from): their errors are recorded beside the run's own, under `<arm>__<error>`."""
    return {name: arm.objective(dataclasses.replace(cfg, arm=name), class_counts, feature_dim, device)
            for name, arm in ARMS.items() if arm.derived_from == cfg.arm}


def evaluate_split(model, split, groups, autocast, prefix: str, objective: Objective, derived: dict) -> dict:
    """The run's errors on a split (with its objective's evaluation adjustment, if any), and every
    derived arm's from the same logits: one forward pass for all of them."""
    logits = split_logits(model, split, autocast)
    own = objective.eval_adjustment
    record = logit_errors(logits if own is None else logits + own, split.labels, groups, prefix)
    for name, d in derived.items():
        record.update(logit_errors(logits + d.eval_adjustment, split.labels, groups, f"{name}__{prefix}"))
    return record


def tune_adjustment(model, data, groups, autocast, objective: Objective) -> dict:
    """Post-hoc LA's τ chosen on the validation split alone over POSTHOC_TAUS (ties: the smaller τ),
    and the test errors at that τ. Menon et al. tune τ; the choice never looks at the test set."""
    val_logits, test_logits = split_logits(model, data.val, autocast), split_logits(model, data.test, autocast)
    prior = -objective.eval_adjustment / objective.cfg.la_tau if objective.cfg.la_tau else None
    if prior is None:
        return {}
    val = {tau: logit_errors(val_logits - tau * prior, data.val.labels, groups, "")["error"] for tau in POSTHOC_TAUS}
    tau = min(POSTHOC_TAUS, key=lambda t: (val[t], t))
    test = logit_errors(test_logits - tau * prior, data.test.labels, groups, "test_")
    return dict(tuned_tau=tau, tuned_val_error=val[tau], tuned_val_errors={f"{t:g}": v for t, v in val.items()},
                **{f"tuned_{k}": v for k, v in test.items()})


def check_diverged(loss_sum: torch.Tensor, seen: int, cfg: RunConfig, epoch: int, lr: float, out: Path) -> None:
    """A mean loss that is not finite, or finite but exploded (a stage-II loss of 1e24 is not a
    result), stops the run. One host sync per epoch."""
    loss = (loss_sum / max(seen, 1)).item()
    if math.isfinite(loss) and loss < DIVERGED_LOSS:
        return
    what = "became " + str(loss) if not math.isfinite(loss) else f"exploded to {loss:.3g} (> {DIVERGED_LOSS:g})"
    checkpoint = out / "checkpoint.pt"
    raise DivergedError(
        f"diverged: the mean training loss {what} at epoch {epoch} (lr {lr:g}, arm {cfg.arm}, alpha {cfg.alpha}, "
        f"beta {cfg.beta}); lower --lr, --alpha or --beta",
        divergence_hint(cfg.variant, cfg.stage1_epochs, cfg.epochs, epoch),
        str(checkpoint) if checkpoint.is_file() else None)


def epoch_threads(cfg: RunConfig, epoch: int, threads: int) -> int:
    """torch's intra-op threads for an epoch: --stage1-threads in stage I (if given), else `threads`."""
    return cfg.stage1_threads if epoch < cfg.stage1_epochs and cfg.stage1_threads else threads


def record_stage1(info: dict, epoch: int, **ran) -> None:
    """How stage I ran (its thread count, whether compiled: fp32 rounding depends on both), as
    `stage1_<name>` in `info`, which the checkpoints carry into a fork's or a resumed run's summary:
    set at epoch 0, None (unknown) once a resumed stage I ran otherwise or its start is not known."""
    for name, value in ran.items():
        key = f"stage1_{name}"
        if epoch == 0:
            info[key] = value
        elif info.get(key) != value:
            info[key] = None


def train(cfg: Config, on_epoch: EpochCallback | None = None, resume_from: Path | None = None,
          data: LongTailData | None = None, stage1_from: Path | None = None,
          stage1_only: bool = False, observe_reference: bool = False, stage1_name: str | None = None) -> dict:
    """Train one run; writes <out>/summary.json, <out>/epochs.parquet, <out>/checkpoint.pt.

    stage1_only: train stage I alone and stop; the last checkpoint is then the stage-I
    checkpoint that risda.trainer.stage1 shares (CE, plus the reference variant's observations if
    observe_reference). stage1_from: fork stage II from such a checkpoint (same stage-I key);
    stage1_name: what it is called in messages and the summary (the cache entry it was copied from).

    Runs on cfg.threads torch threads (cfg.stage1_threads in stage I; None: the count torch has)
    and puts torch's count back at the end; the summary records them (torch_threads,
    stage1_torch_threads) with the compile decision (compile, stage1_compile)."""
    threads_before = torch.get_num_threads()
    try:
        return _train(cfg, on_epoch, resume_from, data, stage1_from, stage1_only, observe_reference, stage1_name)
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _train(cfg: Config, on_epoch: EpochCallback | None, resume_from: Path | None, data: LongTailData | None,
           stage1_from: Path | None, stage1_only: bool, observe_reference: bool, stage1_name: str | None = None) -> dict:
    cfg = cfg.validate().resolved()  # the trainer's entry: everything below takes this RunConfig
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()  # stage II's, and stage I's unless cfg.stage1_threads
    out = Path(cfg.out).expanduser().resolve()
    if resume_from is None and cfg.resume:
        resume_from = out / "checkpoint.pt"
        if not resume_from.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {resume_from}; drop --resume to start a new run")
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)  # what "auto" means on this device
    data = data or load_long_tail(cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    groups = shot_groups(data.class_counts)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, ARMS[cfg.arm].normed_classifier).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    objective = make_objective(cfg, data.class_counts, model.feature_dim, device, stage1_only, observe_reference)
    derived = {} if stage1_only else derived_objectives(cfg, data.class_counts, model.feature_dim, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)

    def autocast():
        if precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    history, start_epoch, elapsed, stage1_info = [], 0, 0.0, {}
    if resume_from is not None:
        state = load_checkpoint(resume_from, cfg)
        objective.load_state_dict(state["objective"])
    elif stage1_from is not None:
        state = load_stage1_checkpoint(stage1_from, cfg, name=stage1_name)
        objective.load_stage1(state["objective"])
    if resume_from is not None or stage1_from is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch, elapsed = state["history"], state["epoch"] + 1, state["elapsed"]
        stage1_info = state.get("stage1_info", {})
    if stage1_from is not None:  # stage-II time starts now; stage I's is reported beside it, with how it ran
        ran = {k: v for k, v in state.get("stage1_info", {}).items() if k in ("stage1_torch_threads", "stage1_compile")}
        stage1_info = dict(stage1_key=stage1_key(cfg), stage1_wall_time_s=elapsed, stage1_checkpoint=stage1_name or str(stage1_from),
                           **ran)
        elapsed = 0.0
    last_epoch = cfg.stage1_epochs if stage1_only else cfg.epochs
    steps = math.ceil(len(data.train) / cfg.batch_size) * (last_epoch - start_epoch)
    compiled, compile_reason = resolve_compile(cfg.compile, device, precision, steps)
    forward = compile_forward(model, device) if compiled else model  # the same parameters (risda.trainer.compile)
    speed = dict(compile=compiled, compile_reason=compile_reason, torch_threads=threads)

    def extract(augment: bool = False, batch_stats: bool = False):
        generator = observe_generator(cfg, epoch, device) if augment or batch_stats else None
        size = cfg.batch_size if batch_stats else 2 * cfg.batch_size  # batch statistics as in training
        return extract_features(model, data.train, size, autocast, generator, batch_stats)

    progress = TrainProgress(cfg, len(data.train), last_epoch, start_epoch, enabled=cfg.progress)
    started = time.time() - elapsed
    with progress:
        for epoch in range(start_epoch, last_epoch):
            epoch_started = time.time()
            n_threads = epoch_threads(cfg, epoch, threads)
            if torch.get_num_threads() != n_threads:
                torch.set_num_threads(n_threads)
            if epoch < cfg.stage1_epochs:
                record_stage1(stage1_info, epoch, torch_threads=n_threads, compile=compiled)
            lr = lr_at(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            objective.begin_epoch(epoch, model, extract)
            model.train()
            # Loss and accuracy stay on the device; the host reads them once per epoch (and
            # every PROGRESS_EVERY steps for the bar), never once per step.
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for step, (x, y) in enumerate(data.train.batches(cfg.batch_size, train=True, generator=epoch_generator(cfg, epoch, device))):
                x = x.contiguous(memory_format=memory_format)
                with autocast():
                    features, logits = (forward if len(y) == cfg.batch_size else model)(x)
                    loss = objective.loss(features, logits, y, model, epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                progress.batch(len(y), loss_sum / seen if step % PROGRESS_EVERY == 0 else None)
            check_diverged(loss_sum, seen, cfg, epoch, lr, out)
            objective.end_epoch(epoch, model, extract)

            record = dict(epoch=epoch, stage=1 if epoch < cfg.stage1_epochs else 2, lr=lr,
                          train_loss=loss_sum.item() / seen, train_error=100 * (1 - correct.item() / seen),
                          images_per_s=seen / max(time.time() - epoch_started, 1e-9))
            evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            if evaluated:
                record.update(evaluate_split(model, data.test, groups, autocast, "test_", objective, derived))
                if data.val is not None:
                    record.update(evaluate_split(model, data.val, groups, autocast, "val_", objective, derived))
            record["wall_time_s"] = time.time() - started
            history.append(record)
            checkpoint = None
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == last_epoch:
                checkpoint = out / "checkpoint.pt"
                save_checkpoint(checkpoint, cfg, epoch=epoch, elapsed=record["wall_time_s"], history=history,
                                model=model.state_dict(), optimizer=optimizer.state_dict(),
                                objective=objective.state_dict(), stage1_info=stage1_info)
            progress.epoch_done(record)
            if on_epoch is not None:
                on_epoch(record, checkpoint)

    if stage1_only:
        return dict(stage1_key=stage1_key(cfg), checkpoint=str(out / "checkpoint.pt"), history=history,
                    wall_time_s=time.time() - started, train_size=len(data.train), precision=precision, **speed,
                    **stage1_info)
    summary = summarize(cfg, data, history, device, time.time() - started, precision)
    summary.update(stage1_info, **speed)
    tuned = lambda o: tune_adjustment(model, data, groups, autocast, o) if data.val is not None else {}
    if objective.eval_adjustment is not None:
        summary.update(tuned(objective))
    if derived:  # each derived arm's summary, as if it were its own run (it trains nothing)
        summary["derived"] = {name: {**summarize(dataclasses.replace(cfg, arm=name), data,
                                                 [derived_record(r, name) for r in history], device, 0.0, precision),
                                     **stage1_info, **tuned(d), "epochs_run": 0, "derived_from": cfg.arm}
                              for name, d in derived.items()}
    graph = getattr(objective, "graph", None)
    if ARMS[cfg.arm].reasons and graph is not None:
        summary.update(graph_summary(graph, objective.tail, data.class_names, objective.diagnostics.get("graph_train_error")))
        summary.update({k: v for k, v in objective.diagnostics.items() if k != "graph_train_error"})
        summary.update(graph_source=cfg.graph_source, graph=write_graph(out, graph, data.class_names))
    write_outputs(out, summary, history)
    return summary


def derived_record(record: dict, name: str) -> dict:
    """An epoch record of the run as the derived arm `name` sees it: its `<name>__` errors in place
    of the run's own."""
    mine = {k[len(name) + 2:]: v for k, v in record.items() if k.startswith(f"{name}__")}
    return {**{k: v for k, v in record.items() if "__" not in k}, **mine}


def write_graph(out: Path, graph, class_names: list[str]) -> list | None:
    """<out>/graph.parquet: ε as a table (one row per class, a column per class, names as given),
    and <out>/graph.png (risda.trainer.graph_plot) beside it. Returns ε as lists for the summary where
    C <= HEATMAP_MAX_CLASSES (a Ray trial's folder is scratch: the runner redraws it from that)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..method.diagnostics import dense_graph
    from .graph_plot import HEATMAP_MAX_CLASSES, plot_graph
    eps = dense_graph(graph).float().cpu()
    table = pa.table({"class": class_names, **{name: eps[:, j].tolist() for j, name in enumerate(class_names)}})
    pq.write_table(table, out / "graph.parquet")
    plot_graph(eps, class_names, out / "graph.png")
    if len(class_names) > HEATMAP_MAX_CLASSES:
        return None
    return {"classes": list(class_names), "eps": [[round(float(v), 6) for v in row] for row in eps]}


def summarize(cfg: RunConfig, data: LongTailData, history: list[dict], device, wall_time: float, precision: str) -> dict:
    evaluated = [r for r in history if "test_error" in r]
    last = evaluated[-1]
    with_val = [r for r in evaluated if "val_error" in r]
    best_val = min(with_val, key=lambda r: r["val_error"]) if with_val else None
    best_test = min(evaluated, key=lambda r: r["test_error"])
    pick = lambda r, k: None if r is None else r.get(k)
    return dict(
        config=cfg.to_dict(),
        class_counts=data.class_counts, class_names=data.class_names, **data.info,
        **selected_errors(last, "last"), last_epoch=last["epoch"],
        best_val_error=pick(best_val, "val_error"), best_val_epoch=pick(best_val, "epoch"),
        **selected_errors(best_val, "best_val"),
        # Model selection on the test set, as the authors' script reports; never for tuning.
        **selected_errors(best_test, "best_test"), best_test_epoch=best_test["epoch"],
        epochs_run=len(history), wall_time_s=wall_time,
        images_per_s=data.info["train_size"] * len(history) / max(wall_time, 1e-9),
        seed=cfg.seed,
        torch=torch.__version__, device=device_name(device), precision=precision, host=platform.node(),
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def write_outputs(out: Path, summary: dict, history: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    intact = (f"the checkpoint of the last epoch ({out / 'checkpoint.pt'}) is intact: free space and rerun the same "
              f"command with --resume, which writes the summary without training again")
    tmp = out / "summary.json.tmp"
    with writing(out / "summary.json", intact, tmp):  # a full disk: one line, no .tmp left (risda.trainer.failures)
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out / "summary.json")
    rows = [r for r in history if "test_error" in r]
    columns = list(dict.fromkeys(k for r in rows for k in r))  # every field of any row, in first-seen order
    tmp = out / "epochs.tmp.parquet"
    with writing(out / "epochs.parquet", intact, tmp):
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]), tmp)
        tmp.replace(out / "epochs.parquet")
