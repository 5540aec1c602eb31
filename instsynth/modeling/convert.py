"""Official FastInst / Detectron2 checkpoints for this project's FastInst, and the converter CLI.

``KEY_MAP`` is the one table between this project's parameter names and those of the official
FastInst (junjiehe96/FastInst, a Detectron2 project) and of Detectron2's ResNet. Each row is a pair
of name templates, ``(ours, official)``; ``{name}`` stands for a number, and a template ending in
``.`` is a prefix (the parameter name after it is kept):

- backbone: ``backbone.body.conv1.`` / ``bn1.`` -> ``backbone.stem.conv1.`` / ``backbone.stem.conv1.norm.``;
  ``backbone.body.layer<s>.{b}.conv{c}.`` / ``bn{c}.`` -> ``backbone.res<s+1>.{b}.conv{c}.`` / ``...conv{c}.norm.``;
  ``...downsample.0.`` / ``downsample.1.`` -> ``...shortcut.`` / ``...shortcut.norm.``
- pixel decoder (official prefix ``sem_seg_head.pixel_decoder.``): ``lateral.<i>.0.`` / ``lateral.<i>.1.`` ->
  ``adapter_<i+1>.`` / ``adapter_<i+1>.norm.``; ``output.<i>.0.`` / ``1.`` -> ``layer_<i+1>.`` / ``layer_<i+1>.norm.``;
  ``ppm.stages.{k}.1.`` -> ``ppm.stages.{k}.1.``; ``ppm.fuse.0.`` -> ``ppm.bottleneck.``
- decoder (``decoder.`` -> ``sem_seg_head.predictor.``): ``meta_pos`` -> ``meta_pos_embed``; ``aux_feat.`` /
  ``aux_pos.`` -> ``empty_query_features.`` / ``empty_query_pos_embed.``; ``proposal.cls_head.`` ->
  ``query_proposal.conv_proposal_cls_logits.``; ``layers.{i}.pixel_cross`` / ``pixel_ffn`` / ``query_cross`` /
  ``query_self`` / ``query_ffn`` -> ``transformer_mask_cross_attention_layers.{i}`` / ``transformer_mask_ffn_layers``
  / ``transformer_query_cross_attention_layers`` / ``transformer_query_self_attention_layers`` /
  ``transformer_query_ffn_layers``, inside them ``attn.`` -> ``multihead_attn.`` (``self_attn.`` for self-attention),
  ``fc1.`` / ``fc2.`` -> ``linear1.`` / ``linear2.``; ``query_norm.`` / ``class_embed.`` / ``mask_embed.`` /
  ``pixel_embed.`` -> ``decoder_query_norm_layers.`` / ``class_embed_layers.`` / ``mask_embed_layers.`` /
  ``mask_features_layers.``

The official checkpoint's ``criterion.empty_weight`` (the no-object class weight, a constant of the
config here) is not a parameter of this model and is dropped.

``MODEL.WEIGHTS`` (see :func:`instsynth.engine.checkpoint.load_model_weights`) accepts, and
``python -m instsynth.modeling.convert IN OUT`` converts to this project's checkpoint:

- an official FastInst checkpoint (``.pth``, ``{"model": {"backbone.res2.0.conv1.weight", ...}}``);
- Detectron2's torchvision-converted ImageNet ResNet (``R-50.pkl``: a pickle of numpy arrays named
  ``stem.conv1.weight``, ``res2.0.shortcut.norm.running_mean``, ...; the classifier ``stem.fc`` is dropped),
  and FastInst's own variant of it (torchvision names under ``backbone.``);
- torchvision's ImageNet ResNet state dicts (``resnet50-0676ba61.pth``).

Detectron2's MSRA / Caffe2 pickles (``res2_0_branch2a_w``) are refused: see :data:`CAFFE2_REASON`.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from instsynth.core.io import InstSynthError, get_logger

log = get_logger("instsynth.modeling")

_P = "sem_seg_head.predictor."
_D = "sem_seg_head.pixel_decoder."
_ATTN, _SELF = (("attn.", "multihead_attn."), ("norm.", "norm.")), (("attn.", "self_attn."), ("norm.", "norm."))
_FFN = (("fc1.", "linear1."), ("fc2.", "linear2."), ("norm.", "norm."))
_LAYER_PARTS = (("pixel_cross", "transformer_mask_cross_attention_layers", _ATTN),
                ("pixel_ffn", "transformer_mask_ffn_layers", _FFN),
                ("query_cross", "transformer_query_cross_attention_layers", _ATTN),
                ("query_self", "transformer_query_self_attention_layers", _SELF),
                ("query_ffn", "transformer_query_ffn_layers", _FFN))

KEY_MAP: tuple[tuple[str, str], ...] = (
    ("backbone.body.conv1.", "backbone.stem.conv1."),
    ("backbone.body.bn1.", "backbone.stem.conv1.norm."),
    *[row for s in range(1, 5) for row in (
        (f"backbone.body.layer{s}.{{b}}.conv{{c}}.", f"backbone.res{s + 1}.{{b}}.conv{{c}}."),
        (f"backbone.body.layer{s}.{{b}}.bn{{c}}.", f"backbone.res{s + 1}.{{b}}.conv{{c}}.norm."),
        (f"backbone.body.layer{s}.{{b}}.downsample.0.", f"backbone.res{s + 1}.{{b}}.shortcut."),
        (f"backbone.body.layer{s}.{{b}}.downsample.1.", f"backbone.res{s + 1}.{{b}}.shortcut.norm."))],
    *[row for i in range(4) for row in (
        (f"pixel_decoder.lateral.{i}.0.", f"{_D}adapter_{i + 1}."),
        (f"pixel_decoder.lateral.{i}.1.", f"{_D}adapter_{i + 1}.norm."),
        (f"pixel_decoder.output.{i}.0.", f"{_D}layer_{i + 1}."),
        (f"pixel_decoder.output.{i}.1.", f"{_D}layer_{i + 1}.norm."))],
    ("pixel_decoder.ppm.stages.{k}.1.", f"{_D}ppm.stages.{{k}}.1."),
    ("pixel_decoder.ppm.fuse.0.", f"{_D}ppm.bottleneck."),
    ("decoder.meta_pos", f"{_P}meta_pos_embed"),
    ("decoder.aux_feat.", f"{_P}empty_query_features."),
    ("decoder.aux_pos.", f"{_P}empty_query_pos_embed."),
    ("decoder.proposal.cls_head.", f"{_P}query_proposal.conv_proposal_cls_logits."),
    *[(f"decoder.layers.{{i}}.{part}.{a}", f"{_P}{official}.{{i}}.{b}")
      for part, official, subs in _LAYER_PARTS for a, b in subs],
    ("decoder.query_norm.", f"{_P}decoder_query_norm_layers."),
    ("decoder.class_embed.", f"{_P}class_embed_layers."),
    ("decoder.mask_embed.", f"{_P}mask_embed_layers."),
    ("decoder.pixel_embed.", f"{_P}mask_features_layers."),
)
"""``(this project's name template, official name template)`` rows; see the module docstring."""

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pkl")  # weight files MODEL.WEIGHTS may name
DROPPED_OFFICIAL_KEYS = ("criterion.empty_weight",)
TORCHVISION_RESNET_KEYS = ("conv1.weight", "layer1.0.conv1.weight")
D2_RESNET_KEYS = ("stem.conv1.weight", "res2.0.conv1.weight")
CAFFE2_REASON = ("Detectron2's MSRA/Caffe2 ResNet weights (names like res2_0_branch2a_w) are not supported: that "
                 "network puts the stride in the 1x1 convolutions and expects BGR input with unit std, while this "
                 "ResNet is torchvision's (stride in the 3x3 convolutions, RGB, ImageNet mean/std). Use Detectron2's "
                 "torchvision-converted R-50.pkl (https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/"
                 "torchvision/R-50.pkl) or torchvision's resnet50-0676ba61.pth instead")


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts))
    return re.compile(regex + (r"(?P<_rest>.+)" if template.endswith(".") else ""))


def _render(template: str, match: re.Match) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: match[m[1]], template) + (match["_rest"] if template.endswith(".") else "")


# longest template first, so that e.g. "...conv1.norm." wins over its prefix "...conv1."
_FORWARD = [(_compile(ours), official) for ours, official in sorted(KEY_MAP, key=lambda r: -len(r[0]))]
_BACKWARD = [(_compile(official), ours) for ours, official in sorted(KEY_MAP, key=lambda r: -len(r[1]))]


def _rename(key: str, rules) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            return _render(template, match)
    return None


def official_name(key: str) -> str | None:
    """The official FastInst / Detectron2 name of this project's parameter ``key`` (None: no row maps it)."""
    return _rename(key, _FORWARD)


def our_name(key: str) -> str | None:
    """This project's name of the official parameter ``key`` (None: no row maps it)."""
    return _rename(key, _BACKWARD)


def to_official(state: dict) -> dict:
    """This project's FastInst state dict under the official names (for the official code or tests)."""
    out = {}
    for key, value in state.items():
        name = official_name(key)
        if name is None:
            raise KeyError(f"no KEY_MAP row for {key!r}")
        out[name] = value
    return out


def from_official(state: dict) -> tuple[dict, list[str]]:
    """An official FastInst / Detectron2-ResNet state dict under this project's names, and the official
    keys that no row maps (left out)."""
    out, unmapped = {}, []
    for key, value in state.items():
        name = our_name(key)
        if name is not None:
            out[name] = value
        elif key not in DROPPED_OFFICIAL_KEYS:
            unmapped.append(key)
    return out, unmapped


# --------------------------------------------------------------------------- reading files
class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays (Detectron2's .pkl weights) and refuses every other global, so a
    weights file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
               ("_codecs", "encode")}  # protocol-2 pickles written by Python 3 encode bytes with it

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")


def read_pickle(path: Path) -> dict:
    """A Detectron2 ``.pkl`` weights file (numpy arrays, latin1 for Python 2 pickles)."""
    try:
        with open(path, "rb") as f:
            return _NumpyUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise InstSynthError(path, f"cannot read weights ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad file for the user
        raise InstSynthError(path, f"not a Detectron2 .pkl weights file ({exc})") from None


def read_weights(path: str | Path) -> dict:
    """The raw content of a weights file: ``torch.load(weights_only=True)``, or a numpy pickle (``.pkl``)."""
    path = Path(path)
    if not path.is_file():
        raise InstSynthError(path, "checkpoint (MODEL.WEIGHTS) not found")
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"  # torch.save writes a zip archive; Detectron2's .pkl is a plain pickle
    if path.suffix == ".pkl" and not zipped:
        return read_pickle(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad file for the user
        raise InstSynthError(path, f"not a loadable PyTorch checkpoint ({exc})") from None


def _tensors(state: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in state.items()}


def detect_format(state: dict) -> str:
    """``ours`` | ``official`` (FastInst / Detectron2 names under ``backbone.`` or ``sem_seg_head.``) |
    ``d2_resnet`` (a Detectron2 backbone file) | ``torchvision`` | ``caffe2``."""
    keys = set(state)
    if any(re.fullmatch(r"(res\d_\d+_branch\w+|conv1_w|res_conv1_bn_\w+)", k) for k in keys):
        return "caffe2"
    if all(k in keys for k in D2_RESNET_KEYS):
        return "d2_resnet"
    if all(k in keys for k in TORCHVISION_RESNET_KEYS) or all("backbone." + k in keys for k in TORCHVISION_RESNET_KEYS):
        return "torchvision"
    if any(k.startswith("sem_seg_head.") or k.startswith(("backbone.stem.", "backbone.res")) for k in keys):
        return "official"
    return "ours"


def to_project_state(data, path: str | Path) -> tuple[dict, str]:
    """This project's state dict (tensors, this project's names) from the content of any supported
    weights file, and the detected format. Unmapped keys are logged and left out."""
    if isinstance(data, dict):  # Detectron2: {"model": ...}; Caffe2 pickles: {"blobs": ...} or plain
        state = data.get("model", data.get("blobs", data))
    else:
        state = data
    if not isinstance(state, dict) or not state:
        raise InstSynthError(path, "checkpoint holds no state dict")
    fmt = detect_format(state)
    if fmt == "caffe2":
        raise InstSynthError(path, CAFFE2_REASON)
    if fmt == "ours":
        return _tensors(state), fmt
    if fmt == "torchvision":
        state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
        return _tensors({f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}), fmt
    if fmt == "d2_resnet":
        state = {f"backbone.{k}": v for k, v in state.items() if not k.startswith("stem.fc.")}
    mapped, unmapped = from_official(state)
    if unmapped:
        log.warning("%s: %d tensors have no counterpart in this FastInst and are left out: %s", path, len(unmapped),
                    ", ".join(unmapped[:8]) + (", ..." if len(unmapped) > 8 else ""))
    return _tensors(mapped), fmt


def load_project_state(path: str | Path) -> tuple[dict, str]:
    """:func:`read_weights` + :func:`to_project_state`."""
    return to_project_state(read_weights(path), path)


# --------------------------------------------------------------------------- CLI
def convert(src: str | Path, dst: str | Path, to: str = "instsynth") -> tuple[Path, str, int]:
    """Write ``src`` (any supported format) to ``dst`` as this project's checkpoint (``{"model": ...}``), or
    with ``to="official"`` under the official FastInst names. Returns (dst, source format, tensors)."""
    state, fmt = load_project_state(src)
    if to == "official":
        state = to_official(state)
    elif to != "instsynth":
        raise InstSynthError("--to", f"must be instsynth or official, got {to!r}")
    from instsynth.core.io import save_torch

    dst = save_torch({"model": state, "__author__": f"instsynth (converted from {Path(src).name}, {fmt})"}, dst)
    return dst, fmt, len(state)


if __name__ == "__main__":  # python -m instsynth.modeling.convert: the command line is instsynth.cli.convert
    from instsynth.cli.convert import main

    raise SystemExit(main())
