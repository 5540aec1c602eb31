"""Training and evaluation loop (Detectron2 conventions on accelerate).

``OUTPUT_DIR`` gets ``config.yaml`` (merged config), ``log.txt``, ``metrics.json`` (one JSON line per
logging step and per evaluation), ``model_XXXXXXX.pth`` every ``SOLVER.CHECKPOINT_PERIOD`` iterations
(the newest ``SOLVER.CHECKPOINT_KEEP`` of them when > 0), ``model_final.pth``, ``last_checkpoint`` and
``inference/`` (predictions and AP). After the first timed iterations one line says how long the whole
run will take (a WARNING on CPU when it is over an hour). accelerate handles
the device, DDP (one process per GPU under ``accelerate launch`` / ``torchrun``) and fp16 autocast.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from instsynth.config import dump_config
from instsynth.data.build import build_test_loader, build_train_loader
from instsynth.data.catalog import get_metadata
from instsynth.engine.checkpoint import (CheckpointKeeper, checkpoint_name, last_checkpoint, load_model_weights,
                                         maybe_load_weights, read_checkpoint, save_checkpoint, set_rng_state)
from instsynth.evaluation.coco_eval import evaluate_coco, format_table, instances_to_coco
from instsynth.engine.visualize import save_training_visual
from instsynth.core.io import InstSynthError, get_logger, write_json
from instsynth.modeling import build_model

log = get_logger("instsynth.engine")
ESTIMATE_AFTER = 3  # iterations timed (after the first, which warms up) before the run's duration is estimated
LONG_CPU_RUN_S = 3600  # a CPU estimate above this is logged as a WARNING
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


# --------------------------------------------------------------------------- setup
def make_accelerator(cfg):
    """An Accelerator for MODEL.DEVICE (CPU when CUDA is absent) with fp16 autocast if SOLVER.AMP. DDP looks
    for unused parameters until :func:`set_find_unused_parameters` says the model needs no search."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = cfg.MODEL.DEVICE == "cpu" or not torch.cuda.is_available()
    amp = "fp16" if cfg.SOLVER.AMP.ENABLED and not cpu else "no"
    return Accelerator(cpu=cpu, mixed_precision=amp,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def set_find_unused_parameters(accelerator, model: nn.Module) -> bool:
    """DDP's ``find_unused_parameters``: False when the model declares ``every_parameter_gets_gradient`` (as
    Detectron2 does for these models), saving a graph traversal per step. Call before ``prepare``."""
    find = not getattr(model, "every_parameter_gets_gradient", False)
    accelerator.ddp_handler.find_unused_parameters = find
    if accelerator.num_processes > 1:
        log.info("DDP find_unused_parameters=%s", find)
    return find


def setup_output(cfg, accelerator) -> Path:
    """Create OUTPUT_DIR, log to ``log.txt`` (main process) and write ``config.yaml``."""
    out = Path(cfg.OUTPUT_DIR)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        get_logger()  # configures the project logger
        root = logging.getLogger("instsynth")
        log_file = str((out / "log.txt").resolve())
        if not any(getattr(h, "baseFilename", None) == log_file for h in root.handlers):
            handler = logging.FileHandler(log_file)
            handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(levelname)s %(message)s",
                                                   "%m/%d %H:%M:%S"))
            root.addHandler(handler)
        dump_config(cfg, out / "config.yaml")
        log.info("full config saved to %s", out / "config.yaml")
    accelerator.wait_for_everyone()
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- optimisation
def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD); backbone lr x BACKBONE_MULTIPLIER, own weight decay for norms and embeddings.
    The backbone is the submodule named by the model's ``backbone_prefix`` attribute (default "backbone")."""
    s = cfg.SOLVER
    prefix = getattr(model, "backbone_prefix", "backbone")
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lr, wd = s.BASE_LR, s.WEIGHT_DECAY
            if module_name == prefix or module_name.startswith(prefix + "."):
                lr *= s.BACKBONE_MULTIPLIER
            if isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower():
                wd = s.WEIGHT_DECAY_NORM
            elif isinstance(module, nn.Embedding) or name in ("meta_pos", "pos_embed", "query_embed"):
                wd = s.WEIGHT_DECAY_EMBED
            groups.append({"params": [p], "lr": lr, "weight_decay": wd})
    if s.OPTIMIZER == "ADAMW":
        return torch.optim.AdamW(groups, s.BASE_LR)
    if s.OPTIMIZER == "SGD":
        return torch.optim.SGD(groups, s.BASE_LR, momentum=0.9)
    raise InstSynthError("SOLVER.OPTIMIZER", f"must be ADAMW or SGD, got {s.OPTIMIZER!r}")


def lr_factor(cfg, iteration: int) -> float:
    """Multiplier of BASE_LR at ``iteration``: linear warmup times poly decay (Detectron2 WarmupPolyLR)."""
    s = cfg.SOLVER
    warm = 1.0
    if iteration < s.WARMUP_ITERS:
        alpha = iteration / s.WARMUP_ITERS
        warm = s.WARMUP_FACTOR * (1 - alpha) + alpha
    if s.LR_SCHEDULER_NAME == "WarmupPolyLR":
        return warm * (1 - min(iteration, s.MAX_ITER) / s.MAX_ITER) ** s.POLY_LR_POWER
    if s.LR_SCHEDULER_NAME == "WarmupConstantLR":
        return warm
    raise InstSynthError("SOLVER.LR_SCHEDULER_NAME", f"must be WarmupPolyLR or WarmupConstantLR, got "
                                                     f"{s.LR_SCHEDULER_NAME!r}")


def build_lr_scheduler(cfg, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(cfg, 0)  # validate the name early
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.json`` (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- training
def do_train(cfg, model: nn.Module, accelerator, resume: bool = False) -> nn.Module:
    """Train from scratch / MODEL.WEIGHTS, or continue from ``last_checkpoint`` with ``resume``.
    Returns the prepared (device-placed, maybe DDP-wrapped) model."""
    out = Path(cfg.OUTPUT_DIR)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    set_find_unused_parameters(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    start_iter = 0
    ckpt_path = last_checkpoint(out) if resume else None
    if ckpt_path is not None:
        ckpt = read_checkpoint(ckpt_path)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if accelerator.scaler is not None and "scaler" in ckpt:
            accelerator.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_iter = ckpt["iteration"] + 1
        log.info("resuming from %s: continuing at iteration %d", ckpt_path, start_iter)
    else:
        maybe_load_weights(raw_model, cfg.MODEL.WEIGHTS)

    max_iter = cfg.SOLVER.MAX_ITER
    if start_iter >= max_iter:
        log.info("training already finished (iteration %d of %d)", start_iter, max_iter)
        return model
    loader = build_train_loader(cfg, accelerator.process_index, accelerator.num_processes, start_iter)
    writer = MetricsWriter(out / "metrics.json", accelerator.is_main_process)
    log.info("starting training: iterations %d..%d, %d images per batch on %d process(es)",
             start_iter, max_iter - 1, cfg.SOLVER.IMS_PER_BATCH, accelerator.num_processes)
    model.train()
    data_iter = iter(loader)
    keeper = CheckpointKeeper(out, cfg.SOLVER.CHECKPOINT_KEEP)
    timer = run_start = time.perf_counter()
    timed_from = None
    for it in range(start_iter, max_iter):
        t0 = time.perf_counter()
        batch = next(data_iter)
        data_time = time.perf_counter() - t0
        with accelerator.autocast():
            losses = model(batch)
        total = sum(losses.values())
        if not torch.isfinite(total):
            values = {k: v.item() for k, v in losses.items()}
            raise FloatingPointError(f"loss became {total.item()} at iteration {it}: {values}")
        accelerator.backward(total)
        if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
            accelerator.clip_grad_norm_(model.parameters(), cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE,
                                        cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE)
        lr = _head_lr(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = it + 1
        if it == start_iter:
            timed_from = time.perf_counter()
        elif done - start_iter == ESTIMATE_AFTER + 1 and accelerator.is_main_process:
            log_estimate(cfg, accelerator, (time.perf_counter() - timed_from) / ESTIMATE_AFTER, done, max_iter)
        if done % cfg.LOG_PERIOD == 0 or it == start_iter or done == max_iter:
            now = time.perf_counter()
            eta = (now - run_start) / (done - start_iter) * (max_iter - done)
            _log_step(accelerator, writer, it, losses, total, lr, data_time, now - timer, max_iter, eta)
        timer = time.perf_counter()
        if cfg.VIS_PERIOD > 0 and done % cfg.VIS_PERIOD == 0 and accelerator.is_main_process:
            save_training_visual(raw_model, batch[0], out / "vis" / f"iter_{it:07d}.png")
        if done % cfg.SOLVER.CHECKPOINT_PERIOD == 0 and done != max_iter:
            _save(accelerator, out, checkpoint_name(it), raw_model, optimizer, scheduler, it)
            if accelerator.is_main_process:
                keeper.saved(checkpoint_name(it))
        if cfg.TEST.EVAL_PERIOD > 0 and done % cfg.TEST.EVAL_PERIOD == 0 and done != max_iter:
            do_test(cfg, model, accelerator, iteration=it, writer=writer)
            model.train()
    _save(accelerator, out, "model_final.pth", raw_model, optimizer, scheduler, max_iter - 1)
    return model


def log_estimate(cfg, accelerator, seconds_per_iter: float, done: int, max_iter: int) -> float:
    """One line: how long the remaining iterations take at ``seconds_per_iter`` (evaluations not counted);
    a WARNING on CPU when that is over :data:`LONG_CPU_RUN_S`. Returns the estimate in seconds."""
    total = seconds_per_iter * (max_iter - done)
    cpu = accelerator.device.type == "cpu"
    line = (f"estimated training time{' on CPU' if cpu else ''}: {format_duration(total)} for the remaining "
            f"{max_iter - done} of {max_iter} iterations at {seconds_per_iter:.2f} s each (timed over "
            f"{ESTIMATE_AFTER} iterations; evaluation every {cfg.TEST.EVAL_PERIOD or max_iter} iterations not counted)")
    if cpu and total > LONG_CPU_RUN_S:
        log.warning("%s. A full-size config is meant for GPUs (MODEL.DEVICE cuda); on CPU try "
                    "configs/quick_schedules/fastinst_R50_quick.yaml", line)
    else:
        log.info("%s", line)
    return total


def format_duration(seconds: float) -> str:
    """``1 day, 2:03:04`` style (days only when there are any)."""
    days, rest = divmod(int(round(seconds)), 86400)
    clock = _duration(rest)
    return f"{days} day{'s' if days != 1 else ''}, {clock}" if days else clock


def _head_lr(optimizer) -> float:
    """The largest learning rate (the non-backbone one)."""
    return max(g["lr"] for g in optimizer.param_groups)


def _save(accelerator, out, name, raw_model, optimizer, scheduler, it) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(out, name, raw_model, optimizer, scheduler, accelerator.scaler, it)
    accelerator.wait_for_everyone()


def _log_step(accelerator, writer, it, losses, total, lr, data_time, iter_time, max_iter, eta: float) -> None:
    values = torch.stack([total.detach().float()] + [v.detach().float() for v in losses.values()])
    values = accelerator.reduce(values, reduction="mean") if accelerator.num_processes > 1 else values
    record = {"iteration": it, "total_loss": values[0].item()}
    record.update({k: v.item() for k, v in zip(losses, values[1:])})
    record.update({"lr": lr, "data_time": data_time, "time": iter_time})
    if torch.cuda.is_available() and accelerator.device.type == "cuda":
        record["max_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    writer.write(record)
    main = {k: round(v, 4) for k, v in record.items()  # total and final-layer losses
            if k == "total_loss" or (k.startswith("loss_") and not k[-1].isdigit())}
    log.info("iter %d/%d  %s  lr %.3g  time %.3fs  data %.3fs  eta %s", it + 1, max_iter, main, lr, iter_time,
             data_time, _duration(eta))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# --------------------------------------------------------------------------- evaluation
def _cityscapes_evaluator():
    """``evaluate_cityscapes`` from instsynth.engine.cityscapes_eval when that module is available."""
    try:
        from instsynth.evaluation.cityscapes_eval import evaluate_cityscapes
    except ModuleNotFoundError as exc:
        if exc.name != "instsynth.evaluation.cityscapes_eval":
            raise
        return None
    return evaluate_cityscapes


def eval_forward(model: nn.Module, batch: list[dict], amp: bool = False) -> list[dict]:
    """``model(batch)`` in fp32, or under fp16 autocast (bf16 on CPU) with ``amp`` (``TEST.AMP.ENABLED``).
    The mixed-precision wrapper that accelerate puts around ``forward`` is bypassed, so fp32 means fp32."""
    forward = getattr(model, "_original_forward", model)  # accelerate keeps the unwrapped forward there
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16, enabled=amp):
        return forward(batch)


@torch.no_grad()
def inference(cfg, model: nn.Module, accelerator, dataset_name: str) -> tuple[list[dict], list[dict]]:
    """COCO result entries for every image of a test dataset (gathered on all processes) and its dicts."""
    meta = get_metadata(dataset_name)
    loader, dicts = build_test_loader(cfg, dataset_name, accelerator.process_index, accelerator.num_processes)
    model = accelerator.unwrap_model(model)  # no DDP: processes may see different numbers of images
    model.eval()
    results = []
    start = time.perf_counter()
    for batch in loader:
        outputs = eval_forward(model, batch, cfg.TEST.AMP.ENABLED)
        for inp, output in zip(batch, outputs):
            results.extend(instances_to_coco(output["instances"], inp["image_id"], meta.contiguous_to_label_id))
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        results = gather_object(results)
    log.info("inference on %s: %d images in %.1fs", dataset_name, len(dicts), time.perf_counter() - start)
    return results, dicts


def do_test(cfg, model: nn.Module, accelerator, iteration: int | None = None, writer=None) -> dict[str, dict]:
    """Evaluate on every DATASETS.TEST name; results in ``OUTPUT_DIR/inference`` (``inference/<name>`` when
    there are several) and, with a ``writer``, one metrics.json line at ``iteration`` (see
    :func:`flatten_metrics`). Returns ``{dataset: metrics}`` on the main process."""
    all_metrics = {}
    several = len(cfg.DATASETS.TEST) > 1
    for name in cfg.DATASETS.TEST:
        results, dicts = inference(cfg, model, accelerator, name)
        if not accelerator.is_main_process:
            continue
        meta = get_metadata(name)
        out_dir = Path(cfg.OUTPUT_DIR) / "inference" / (name if several else "")
        metrics = {"segm": evaluate_coco(results, meta.json_file, dict(zip(meta.category_ids, meta.thing_classes)),
                                         out_dir)}
        log.info("\n%s", format_table(metrics["segm"], f"COCO mask AP on {name}:"))
        evaluate_cityscapes = _cityscapes_evaluator()
        if cfg.TEST.CITYSCAPES_EVAL and evaluate_cityscapes is not None and meta.dataset_root is not None:
            cs = evaluate_cityscapes(results, dicts, out_dir, meta.contiguous_to_label_id)
            metrics["cityscapes"] = cs
            log.info("\n%s", format_table(cs, f"Cityscapes instance AP on {name}:"))
        write_json(out_dir / "metrics.json", metrics)
        all_metrics[name] = metrics
    if writer is not None and accelerator.is_main_process:
        writer.write({"iteration": iteration, **flatten_metrics(all_metrics)})
    accelerator.wait_for_everyone()
    return all_metrics


def flatten_metrics(all_metrics: dict[str, dict]) -> dict[str, float]:
    """The scalars of ``{dataset: {task: {metric: value}}}`` as Detectron2's EvalHook writes them to
    metrics.json: ``segm/AP``, ``cityscapes/AP50``, ... (with several test sets ``<dataset>/segm/AP``).
    ``<dataset>/segm/AP`` keys are always written as well (this project's earlier format)."""
    flat = {}
    for name, metrics in all_metrics.items():
        for task, values in metrics.items():
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    flat[f"{name}/{task}/{key}"] = value
                    if len(all_metrics) == 1:
                        flat[f"{task}/{key}"] = value
    return flat


# --------------------------------------------------------------------------- entry point
def check_num_classes(model: nn.Module, dataset_names) -> None:
    """A model with ``num_classes`` must predict exactly the categories of every dataset it meets."""
    expected = getattr(model, "num_classes", None)
    if expected is None:
        return
    for name in dataset_names:
        meta = get_metadata(name)
        if len(meta.category_ids) != expected:
            raise InstSynthError(meta.json_file, f"dataset {name!r} has {len(meta.category_ids)} categories "
                                                 f"({', '.join(meta.thing_classes)}) but the model predicts {expected} "
                                                 "classes: set MODEL.<ARCH>.NUM_CLASSES to match")


def run(cfg, eval_only: bool = False, resume: bool = False) -> dict:
    """What ``train_net.py`` does: set up, build the model, train (unless ``eval_only``) and evaluate."""
    accelerator = make_accelerator(cfg)
    if not accelerator.is_main_process:  # one process reports progress
        logging.getLogger("instsynth").setLevel(logging.WARNING)
    setup_output(cfg, accelerator)
    seed_everything(cfg.SEED + accelerator.process_index)
    log.info("running on %s (%d process(es)), mixed precision: %s", accelerator.device, accelerator.num_processes,
             accelerator.mixed_precision)
    model = build_model(cfg)
    if cfg.MODEL.RESNETS.NORM == "SyncBN" and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.info("model %s: %.1fM parameters", cfg.MODEL.META_ARCHITECTURE,
             sum(p.numel() for p in model.parameters()) / 1e6)
    check_num_classes(model, cfg.DATASETS.TEST if eval_only else (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST))
    if eval_only:
        ckpt = last_checkpoint(cfg.OUTPUT_DIR) if resume else None
        if ckpt is not None:
            load_model_weights(model, ckpt)
        elif not maybe_load_weights(model, cfg.MODEL.WEIGHTS) and not getattr(model, "loads_own_weights", False):
            log.warning("--eval-only without MODEL.WEIGHTS: evaluating a randomly initialised model")
        model = accelerator.prepare(model)
        return do_test(cfg, model, accelerator)
    model = do_train(cfg, model, accelerator, resume)
    writer = MetricsWriter(Path(cfg.OUTPUT_DIR) / "metrics.json", accelerator.is_main_process)
    return do_test(cfg, model, accelerator, iteration=cfg.SOLVER.MAX_ITER - 1, writer=writer)
