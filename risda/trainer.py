"""The two-stage trainer. Reads top to bottom: data, model, objective, optimiser, the loop.

Stage I (epochs < stage1_epochs) and stage II differ only inside the objective (the "arm");
the loop below is the same for every arm.
"""
from __future__ import annotations

import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .data import LongTailData, load_long_tail
from .evaluate import evaluate, shot_groups
from .models import build_model
from .objectives import make_objective
from .progress import TrainProgress

# on_epoch(record, checkpoint_path_or_None) is called after every evaluated or checkpointed epoch.
EpochCallback = Callable[[dict, "Path | None"], None]


class DivergedError(RuntimeError):
    """The training loss stopped being finite."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def lr_at(cfg: Config, epoch: int) -> float:
    """Linear warm-up, then ×lr_decay at each milestone (paper: ×0.01 at 160 and 180)."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    return cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.lr_milestones)


def epoch_generator(cfg: Config, epoch: int, device: torch.device) -> torch.Generator:
    # One generator per epoch, seeded from (seed, epoch): a resumed run draws the same
    # batches and crops as an uninterrupted one without saving RNG state.
    return torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch)


def extract_features(model, split, batch_size, autocast):
    """(features, logits, labels) over a split, eval mode, no augmentation, fp32."""
    was_training = model.training
    model.eval()
    feats, logits, labels = [], [], []
    with torch.no_grad(), autocast():
        for x, y in split.batches(batch_size, train=False):
            f, z = model(x)
            feats.append(f.float()), logits.append(z.float()), labels.append(y)
    model.train(was_training)
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def train(cfg: Config, on_epoch: EpochCallback | None = None, resume_from: Path | None = None,
          data: LongTailData | None = None) -> dict:
    """Train one run; writes <out>/summary.json, <out>/epochs.parquet, <out>/checkpoint.pt."""
    cfg = cfg.validate().resolved()
    out = Path(cfg.out).expanduser().resolve()
    if resume_from is None and cfg.resume:
        resume_from = out / "checkpoint.pt"
        if not resume_from.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {resume_from}; drop --resume to start a new run")
    device = pick_device(cfg.device)
    data = data or load_long_tail(cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    groups = shot_groups(data.class_counts)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    objective = make_objective(cfg, data.class_counts, model.feature_dim, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)

    def autocast():
        if cfg.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    history, start_epoch, elapsed = [], 0, 0.0
    if resume_from is not None:
        state = load_checkpoint(resume_from, cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        objective.load_state_dict(state["objective"])
        history, start_epoch, elapsed = state["history"], state["epoch"] + 1, state["elapsed"]

    def extract():
        return extract_features(model, data.train, 2 * cfg.batch_size, autocast)

    progress = TrainProgress(cfg, len(data.train), enabled=cfg.progress)
    started = time.time() - elapsed
    with progress:
        for epoch in range(start_epoch, cfg.epochs):
            lr = lr_at(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            objective.begin_epoch(epoch, model, extract)
            model.train()
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in data.train.batches(cfg.batch_size, train=True, generator=epoch_generator(cfg, epoch, device)):
                x = x.contiguous(memory_format=memory_format)
                with autocast():
                    features, logits = model(x)
                    loss = objective.loss(features, logits, y, model, epoch)
                if not torch.isfinite(loss):
                    raise DivergedError(
                        f"loss became {loss.item()} at epoch {epoch} (lr {lr:g}, arm {cfg.arm}, alpha {cfg.alpha}, beta {cfg.beta}); "
                        f"lower --lr, --alpha or --beta. The last good checkpoint, if any, is {out / 'checkpoint.pt'}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                progress.batch(len(y), loss.item())
            objective.end_epoch(epoch)

            record = dict(epoch=epoch, stage=1 if epoch < cfg.stage1_epochs else 2, lr=lr,
                          train_loss=loss_sum / seen, train_error=100 * (1 - correct / seen))
            evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            if evaluated:
                record.update(evaluate(model, data.test, groups, autocast, prefix="test_"))
                if data.val is not None:
                    record.update(evaluate(model, data.val, groups, autocast, prefix="val_"))
            record["wall_time_s"] = time.time() - started
            history.append(record)
            checkpoint = None
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                checkpoint = out / "checkpoint.pt"
                save_checkpoint(checkpoint, cfg, epoch=epoch, elapsed=record["wall_time_s"], history=history,
                                model=model.state_dict(), optimizer=optimizer.state_dict(),
                                objective=objective.state_dict())
            progress.epoch_done(record)
            if on_epoch is not None and (evaluated or checkpoint is not None):
                on_epoch(record, checkpoint)

    summary = summarize(cfg, data, history, device, time.time() - started)
    write_outputs(out, summary, history)
    return summary


def summarize(cfg: Config, data: LongTailData, history: list[dict], device, wall_time: float) -> dict:
    evaluated = [r for r in history if "test_error" in r]
    last = evaluated[-1]
    with_val = [r for r in evaluated if "val_error" in r]
    best_val = min(with_val, key=lambda r: r["val_error"]) if with_val else None
    best_test = min(evaluated, key=lambda r: r["test_error"])
    pick = lambda r, k: None if r is None else r.get(k)
    return dict(
        config=cfg.to_dict(),
        class_counts=data.class_counts, class_names=data.class_names, **data.info,
        test_error=last["test_error"], many_error=last["test_many_error"],
        medium_error=last["test_medium_error"], few_error=last["test_few_error"],
        last_epoch=last["epoch"],
        best_val_error=pick(best_val, "val_error"), best_val_epoch=pick(best_val, "epoch"),
        test_error_at_best_val=pick(best_val, "test_error"),
        many_error_at_best_val=pick(best_val, "test_many_error"),
        medium_error_at_best_val=pick(best_val, "test_medium_error"),
        few_error_at_best_val=pick(best_val, "test_few_error"),
        # Model selection on the test set, as the authors' script reports; never for tuning.
        best_test_error=best_test["test_error"], best_test_epoch=best_test["epoch"],
        epochs_run=len(history), wall_time_s=wall_time,
        images_per_s=data.info["train_size"] * len(history) / max(wall_time, 1e-9),
        seed=cfg.seed,
        torch=torch.__version__, device=device_name(device), host=platform.node(),
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def write_outputs(out: Path, summary: dict, history: list[dict]) -> None:
    import pandas as pd
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    pd.DataFrame([r for r in history if "test_error" in r]).to_parquet(out / "epochs.parquet", index=False)
