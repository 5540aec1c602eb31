"""Training configuration: Detectron2-style defaults (fvcore's ``CfgNode``, as Detectron2's) and YAML files
with ``_BASE_``.

``load_config(path, opts)`` reads a YAML file and its ``_BASE_`` chain with fvcore's
``CfgNode.load_yaml_with_base`` (paths relative to the file that names them; a list of bases is merged in
order), merges the result onto :func:`get_cfg` and then the ``KEY VALUE`` pairs of ``opts``. Every key must
exist in the defaults: an unknown key raises :class:`ConfigError` that lists the valid keys at that level and
suggests the closest one. Values are converted to the default's type (list <-> tuple, int -> float).
An empty ``OUTPUT_DIR`` (the default) becomes ``output/<config name>/<training datasets>``
(:func:`default_output_dir`), so two runs of one config on different data never share a folder.
"""
from __future__ import annotations

import difflib
import io
import os
import re
from ast import literal_eval
from pathlib import Path
from typing import Any, Iterable

from fvcore.common.config import BASE_KEY
from fvcore.common.config import CfgNode as _FvcoreCfgNode

from instsynth.core.io import InstSynthError, read_yaml

OUTPUT_ROOT = "output"
"""Parent of the automatic OUTPUT_DIR (relative to the working directory)."""


class ConfigError(InstSynthError):
    """A config file or ``opts`` entry that does not fit the defaults."""


class CN(_FvcoreCfgNode):
    """fvcore's CfgNode whose files are local only and checked one by one: a missing file, bad YAML or a
    file that is not a mapping raises :class:`ConfigError` naming that file of the ``_BASE_`` chain."""

    @classmethod
    def _open_cfg(cls, filename):
        if "://" in str(filename):
            raise ConfigError(filename, "a config file or _BASE_ must be a local path (URLs are not fetched)")
        data = read_yaml(filename, "config file not found", ConfigError)
        if not isinstance(data, dict):
            raise ConfigError(filename, "a config file must be a mapping of keys")
        if not isinstance(data.get(BASE_KEY, ""), (list, str)):
            raise ConfigError(filename, f"{BASE_KEY} must be a file name or a list of them, got {data[BASE_KEY]!r}")
        return io.StringIO(Path(filename).read_text() if data else "{}")


def _defaults() -> CN:
    _C = CN()
    _C.SEED = 42
    _C.OUTPUT_DIR = ""  # "": output/<config name>/<DATASETS.TRAIN> (see default_output_dir)
    _C.VIS_PERIOD = 0  # > 0: every N iterations write OUTPUT_DIR/vis/iter_*.png (ground truth | predictions)
    _C.LOG_PERIOD = 20
    _C.CUDNN_BENCHMARK = False
    _C.VERSION = 2

    # ------------------------------------------------------------------ model
    _C.MODEL = CN()
    _C.MODEL.META_ARCHITECTURE = "FastInst"
    _C.MODEL.WEIGHTS = ""  # .pth/.pkl (ours, official FastInst, Detectron2 R-50.pkl, torchvision) or hub id
    _C.MODEL.DEVICE = "cuda"  # falls back to cpu when CUDA is absent
    _C.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]  # RGB, 0-255
    _C.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    _C.MODEL.BACKBONE = CN()
    _C.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    _C.MODEL.BACKBONE.FREEZE_AT = 0  # 0: train all; 1: freeze stem; n: stem + first n-1 stages
    _C.MODEL.RESNETS = CN()
    _C.MODEL.RESNETS.DEPTH = 50
    _C.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    _C.MODEL.RESNETS.NORM = "FrozenBN"  # FrozenBN | BN | SyncBN | GN

    _C.MODEL.FASTINST = CN()
    _C.MODEL.FASTINST.NUM_CLASSES = 8
    _C.MODEL.FASTINST.NUM_OBJECT_QUERIES = 100
    _C.MODEL.FASTINST.NUM_AUX_QUERIES = 8
    _C.MODEL.FASTINST.DEC_LAYERS = 3
    _C.MODEL.FASTINST.HIDDEN_DIM = 256
    _C.MODEL.FASTINST.CONVS_DIM = 256  # pixel decoder channels
    _C.MODEL.FASTINST.MASK_DIM = 256
    _C.MODEL.FASTINST.NORM = "GN"  # pixel decoder norm: GN | BN | ""
    _C.MODEL.FASTINST.NHEADS = 8
    _C.MODEL.FASTINST.DIM_FEEDFORWARD = 1024
    _C.MODEL.FASTINST.PRE_NORM = False
    _C.MODEL.FASTINST.DEEP_SUPERVISION = True
    _C.MODEL.FASTINST.GT_MASK_GUIDED = True  # ground-truth mask guided learning (training only)
    _C.MODEL.FASTINST.NO_OBJECT_WEIGHT = 0.1
    _C.MODEL.FASTINST.CLASS_WEIGHT = 2.0
    _C.MODEL.FASTINST.MASK_WEIGHT = 5.0
    _C.MODEL.FASTINST.DICE_WEIGHT = 5.0
    _C.MODEL.FASTINST.LOCATION_WEIGHT = 1000.0
    _C.MODEL.FASTINST.PROPOSAL_WEIGHT = 20.0
    _C.MODEL.FASTINST.TRAIN_NUM_POINTS = 112 * 112
    _C.MODEL.FASTINST.OVERSAMPLE_RATIO = 3.0
    _C.MODEL.FASTINST.IMPORTANCE_SAMPLE_RATIO = 0.75
    _C.MODEL.FASTINST.SIZE_DIVISIBILITY = 32
    _C.MODEL.FASTINST.TEST = CN()
    _C.MODEL.FASTINST.TEST.MASK_THRESHOLD = 0.5
    _C.MODEL.FASTINST.TEST.SCORE_THRESHOLD = 0.0

    # OneFormer (transformers' OneFormerForUniversalSegmentation); see instsynth/modeling/oneformer.py.
    # MODEL.WEIGHTS may name a saved/hub OneFormer (its architecture and tokenizer are used), an ImageNet
    # backbone (folder or hub id, e.g. microsoft/resnet-50) or a .pth checkpoint of this project.
    _C.MODEL.ONE_FORMER = CN()
    _C.MODEL.ONE_FORMER.HF_CONFIG = ""  # local folder / hub id of a OneFormerConfig ("" = built from keys below)
    _C.MODEL.ONE_FORMER.TASK = "instance"  # task token "the task is instance" (only instance is trained here)
    _C.MODEL.ONE_FORMER.NUM_CLASSES = 8
    _C.MODEL.ONE_FORMER.CLASS_NAMES = []  # text-query names in contiguous order ([] = labels.EVAL_THING_CLASSES)
    _C.MODEL.ONE_FORMER.BACKBONE = "resnet"  # resnet | swin (transformers ResNetBackbone / SwinBackbone)
    _C.MODEL.ONE_FORMER.RESNET = CN()  # transformers ResNetConfig; defaults: ResNet-50
    _C.MODEL.ONE_FORMER.RESNET.LAYER_TYPE = "bottleneck"  # bottleneck | basic
    _C.MODEL.ONE_FORMER.RESNET.EMBEDDING_SIZE = 64
    _C.MODEL.ONE_FORMER.RESNET.HIDDEN_SIZES = [256, 512, 1024, 2048]
    _C.MODEL.ONE_FORMER.RESNET.DEPTHS = [3, 4, 6, 3]
    _C.MODEL.ONE_FORMER.SWIN = CN()  # transformers SwinConfig; defaults: Swin-L, window 12, 384 pretraining
    _C.MODEL.ONE_FORMER.SWIN.EMBED_DIM = 192
    _C.MODEL.ONE_FORMER.SWIN.DEPTHS = [2, 2, 18, 2]
    _C.MODEL.ONE_FORMER.SWIN.NUM_HEADS = [6, 12, 24, 48]
    _C.MODEL.ONE_FORMER.SWIN.WINDOW_SIZE = 12
    _C.MODEL.ONE_FORMER.SWIN.DROP_PATH_RATE = 0.3
    _C.MODEL.ONE_FORMER.SWIN.PRETRAIN_IMG_SIZE = 384
    _C.MODEL.ONE_FORMER.CONVS_DIM = 256  # pixel decoder
    _C.MODEL.ONE_FORMER.MASK_DIM = 256
    _C.MODEL.ONE_FORMER.ENC_LAYERS = 6  # deformable-attention pixel decoder layers
    _C.MODEL.ONE_FORMER.ENC_DIM_FEEDFORWARD = 1024
    _C.MODEL.ONE_FORMER.NUM_OBJECT_QUERIES = 150  # including the task query
    _C.MODEL.ONE_FORMER.HIDDEN_DIM = 256
    _C.MODEL.ONE_FORMER.DEC_LAYERS = 10
    _C.MODEL.ONE_FORMER.QUERY_DEC_LAYERS = 2  # task-conditioned query transformer (CLASS_DEC_LAYERS upstream)
    _C.MODEL.ONE_FORMER.NHEADS = 8
    _C.MODEL.ONE_FORMER.DIM_FEEDFORWARD = 2048
    _C.MODEL.ONE_FORMER.DROPOUT = 0.1
    _C.MODEL.ONE_FORMER.NO_OBJECT_WEIGHT = 0.1
    _C.MODEL.ONE_FORMER.CLASS_WEIGHT = 2.0
    _C.MODEL.ONE_FORMER.MASK_WEIGHT = 5.0
    _C.MODEL.ONE_FORMER.DICE_WEIGHT = 5.0
    _C.MODEL.ONE_FORMER.CONTRASTIVE_WEIGHT = 0.5
    _C.MODEL.ONE_FORMER.CONTRASTIVE_TEMPERATURE = 0.07
    _C.MODEL.ONE_FORMER.TRAIN_NUM_POINTS = 112 * 112
    _C.MODEL.ONE_FORMER.OVERSAMPLE_RATIO = 3.0
    _C.MODEL.ONE_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75
    _C.MODEL.ONE_FORMER.TEXT_ENCODER_WIDTH = 256  # must equal HIDDEN_DIM (context queries are concatenated)
    _C.MODEL.ONE_FORMER.TEXT_ENCODER_NUM_LAYERS = 6
    _C.MODEL.ONE_FORMER.TEXT_ENCODER_VOCAB_SIZE = 49408
    _C.MODEL.ONE_FORMER.TEXT_ENCODER_PROJ_LAYERS = 2
    _C.MODEL.ONE_FORMER.TEXT_ENCODER_N_CTX = 16  # learnable context queries; text queries = NUM_OBJECT_QUERIES - N_CTX
    _C.MODEL.ONE_FORMER.MAX_SEQ_LEN = 77  # tokens per text query (= text encoder context length)
    _C.MODEL.ONE_FORMER.TASK_SEQ_LEN = 77  # tokens of the task text
    _C.MODEL.ONE_FORMER.TOKENIZER = ""  # folder / hub id of a CLIP tokenizer ("" = MODEL.WEIGHTS' or built-in)
    _C.MODEL.ONE_FORMER.SIZE_DIVISIBILITY = 32
    _C.MODEL.ONE_FORMER.TEST = CN()
    _C.MODEL.ONE_FORMER.TEST.MASK_THRESHOLD = 0.5  # on mask probabilities
    _C.MODEL.ONE_FORMER.TEST.SCORE_THRESHOLD = 0.0  # drop predictions below (class x mask score)

    # ------------------------------------------------------------------ data
    _C.DATASETS = CN()
    _C.DATASETS.TRAIN = ("cityscapes_fine_instance_seg_train",)
    _C.DATASETS.TEST = ("cityscapes_fine_instance_seg_val",)
    _C.DATALOADER = CN()
    _C.DATALOADER.NUM_WORKERS = 4
    _C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True

    _C.INPUT = CN()
    _C.INPUT.FORMAT = "RGB"
    _C.INPUT.MIN_SIZE_TRAIN = (512, 576, 640, 704, 768, 832, 896, 960, 1024)
    _C.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"  # choice | range
    _C.INPUT.MAX_SIZE_TRAIN = 4096
    _C.INPUT.MIN_SIZE_TEST = 1024
    _C.INPUT.MAX_SIZE_TEST = 2048
    _C.INPUT.RANDOM_FLIP = "horizontal"  # horizontal | none
    _C.INPUT.COLOR_AUG_SSD = False  # SSD colour distortion in training (Mask2Former's Cityscapes recipe: True)
    _C.INPUT.SIZE_DIVISIBILITY = -1  # -1: the model's own (FASTINST.SIZE_DIVISIBILITY)
    _C.INPUT.CROP = CN()
    _C.INPUT.CROP.ENABLED = True
    _C.INPUT.CROP.TYPE = "absolute"  # absolute | relative | relative_range | absolute_range
    _C.INPUT.CROP.SIZE = (512, 1024)  # (height, width)

    # ------------------------------------------------------------------ solver
    _C.SOLVER = CN()
    _C.SOLVER.OPTIMIZER = "ADAMW"
    _C.SOLVER.BASE_LR = 0.0001
    _C.SOLVER.WEIGHT_DECAY = 0.05
    _C.SOLVER.WEIGHT_DECAY_NORM = 0.0
    _C.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    _C.SOLVER.BACKBONE_MULTIPLIER = 0.1
    _C.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"  # WarmupPolyLR | WarmupConstantLR
    _C.SOLVER.POLY_LR_POWER = 0.9
    _C.SOLVER.WARMUP_ITERS = 10
    _C.SOLVER.WARMUP_FACTOR = 1.0
    _C.SOLVER.IMS_PER_BATCH = 16  # total over all processes
    _C.SOLVER.MAX_ITER = 90000
    _C.SOLVER.CHECKPOINT_PERIOD = 5000
    _C.SOLVER.CHECKPOINT_KEEP = 0  # keep the newest N periodic checkpoints of a run (0: all); model_final stays
    _C.SOLVER.CLIP_GRADIENTS = CN()
    _C.SOLVER.CLIP_GRADIENTS.ENABLED = True
    _C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    _C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    _C.SOLVER.AMP = CN()
    _C.SOLVER.AMP.ENABLED = True  # fp16 autocast on CUDA; ignored on CPU

    _C.TEST = CN()
    _C.TEST.EVAL_PERIOD = 5000  # 0: only after training
    _C.TEST.DETECTIONS_PER_IMAGE = 100
    _C.TEST.CITYSCAPES_EVAL = True  # also run the official Cityscapes evaluation when available
    _C.TEST.AMP = CN()
    _C.TEST.AMP.ENABLED = False  # evaluate under fp16 autocast (CUDA; bf16 on CPU); default fp32 as Detectron2
    return _C


_DEFAULTS = _defaults()


def get_cfg() -> CN:
    """A fresh copy of the default configuration."""
    return _DEFAULTS.clone()


def _load_yaml_tree(path: Path) -> dict:
    """The mapping of ``path`` with its ``_BASE_`` files merged underneath (fvcore's loader)."""
    try:
        return CN.load_yaml_with_base(str(path), allow_unsafe=False)
    except RecursionError:
        raise ConfigError(path, f"circular {BASE_KEY} chain (a file is its own base)") from None
    except AssertionError as exc:  # fvcore: "Cannot inherit key 'X' from base!"
        raise ConfigError(path, f"{exc}: a group of keys in this file is a single value in a {BASE_KEY}") from None


def _unknown_key(source: str, prefix: str, key: str, node: CN) -> ConfigError:
    valid = sorted(node.keys())
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {prefix}{close[0]}?" if close else ""
    return ConfigError(source, f"unknown config key {prefix}{key}.{hint} Valid keys under "
                               f"{prefix.rstrip('.') or 'the top level'}: {', '.join(valid)}")


def _coerce(source: str, full_key: str, old: Any, new: Any) -> Any:
    """``new`` converted to the type of the default ``old`` (list<->tuple, int->float), or an error.
    Strings are parsed as Python literals unless the default is a string (``("a",)`` -> tuple)."""
    if isinstance(new, str) and not isinstance(old, str):
        new = _parse_value(new)
    if old is None or new is None or type(old) is type(new):
        return new
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return type(old)(new)
    if isinstance(old, (list, tuple)) and isinstance(new, (int, float, str)):
        return type(old)([new])
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    raise ConfigError(source, f"{full_key} must be of type {type(old).__name__}, got {new!r} "
                              f"({type(new).__name__})")


def merge_dict(cfg: CN, data: dict, source: str, prefix: str = "") -> None:
    """Merge a nested mapping into ``cfg``; every key must already exist (see :class:`ConfigError`)."""
    for key, value in data.items():
        if key not in cfg:
            raise _unknown_key(source, prefix, key, cfg)
        full_key = prefix + key
        if isinstance(cfg[key], CN):
            if not isinstance(value, dict):
                raise ConfigError(source, f"{full_key} is a group of keys ({', '.join(sorted(cfg[key]))}), "
                                          f"got {value!r}")
            merge_dict(cfg[key], value, source, full_key + ".")
        else:
            if isinstance(value, dict):
                raise ConfigError(source, f"{full_key} is a single value, got a mapping {value!r}")
            cfg[key] = _coerce(source, full_key, cfg[key], value)


def _parse_value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def merge_opts(cfg: CN, opts: Iterable[str]) -> None:
    """Merge ``KEY VALUE`` pairs (``SOLVER.MAX_ITER 20``) given on the command line."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError("opts", f"expected KEY VALUE pairs, got an odd number of items: {opts}")
    for full_key, text in zip(opts[0::2], opts[1::2]):
        *parents, leaf = full_key.split(".")
        node, prefix = cfg, ""
        for part in parents:
            if part not in node or not isinstance(node[part], CN):
                raise _unknown_key("opts", prefix, part, node)
            node, prefix = node[part], prefix + part + "."
        merge_dict(node, {leaf: text}, "opts", prefix)


def default_output_dir(config_path: str | os.PathLike | None, train_datasets: Iterable[str]) -> str:
    """``output/<config file stem>/<training dataset names joined by +>`` (``defaults`` without a file)."""
    config = Path(config_path).stem if config_path else "defaults"
    data = "+".join(train_datasets) or "no_train_data"
    return str(Path(OUTPUT_ROOT) / _folder_name(config) / _folder_name(data))


def _folder_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip(".") or "_"


def load_config(path: str | os.PathLike | None = None, opts: Iterable[str] = ()) -> CN:
    """Defaults <- YAML file (with its ``_BASE_`` chain) <- ``opts``; an empty OUTPUT_DIR gets
    :func:`default_output_dir`. Returns a frozen CfgNode."""
    cfg = get_cfg()
    if path:
        merge_dict(cfg, _load_yaml_tree(Path(path)), str(path))
    merge_opts(cfg, opts)
    if not cfg.OUTPUT_DIR:
        cfg.OUTPUT_DIR = default_output_dir(path, cfg.DATASETS.TRAIN)
    cfg.freeze()
    return cfg


def dump_config(cfg: CN, path: str | os.PathLike) -> Path:
    """Write the merged config as YAML (atomically) so that a run can be reproduced from it."""
    from instsynth.core.io import write_bytes

    return write_bytes(path, cfg.dump().encode())
