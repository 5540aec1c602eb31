"""OneFormer (Jain et al., CVPR 2023) for instance segmentation, on transformers'
``OneFormerForUniversalSegmentation``, registered as ``MODEL.META_ARCHITECTURE: "OneFormer"``.

What OneFormer's own data pipeline does for the instance task is done here from the shared model
inputs (``instsynth.modeling``): the task text ``"the task is instance"``; one text query
``"a photo with a <class>"`` per ground-truth instance, grouped in class order, padded with
``"an instance photo"`` to ``NUM_OBJECT_QUERIES - TEXT_ENCODER_N_CTX`` texts; mask and class labels
from the ground truth. Texts are tokenized like ``OneFormerProcessor`` (padded to a fixed length, pad
id 0). The loss is the transformers model's: class cross-entropy, mask BCE and dice on sampled points
(with deep supervision) and the query-text contrastive loss. Inference keeps the top
``TEST.DETECTIONS_PER_IMAGE`` (query, class) pairs, as OneFormer / Mask2Former instance inference,
scored by class probability x mean mask probability inside the mask.

Weights (``MODEL.WEIGHTS``), as in Detectron2 either a trained model or ImageNet backbone weights:

- a OneFormer folder written by ``save_pretrained`` or hub id (``shi-labs/oneformer_cityscapes_swin_large``)
  is loaded here with its architecture and tokenizer; its class head is remapped by class name when it
  knows all classes (a 19-class Cityscapes OneFormer does), otherwise re-initialised;
- a backbone folder / hub id (``microsoft/resnet-50``, ``microsoft/swin-large-patch4-window12-384``;
  any transformers ``AutoBackbone``) initialises the backbone of a OneFormer built from the
  ``MODEL.ONE_FORMER`` keys, whose ``BACKBONE`` / ``RESNET`` / ``SWIN`` settings it then replaces;
- a ``.pth`` checkpoint of this project is loaded by the trainer into the model built from the keys;
- empty: everything randomly initialised.

Tokenizer: ``TOKENIZER`` if set, else the one saved with a OneFormer ``MODEL.WEIGHTS``, else a built-in
word-level tokenizer over the few words these texts use (Cityscapes label names and the templates),
so training from scratch needs no download. Its end-of-text token has the largest id, which the
OneFormer text encoder relies on (it pools at ``argmax`` of the ids), as in CLIP's vocabulary.

Sizes transformers' implementation needs (checked with clear errors): ``CONVS_DIM == MASK_DIM ==
HIDDEN_DIM`` (otherwise its input projections are unregistered layers: never trained, saved or moved
to the GPU) and ``TEXT_ENCODER_WIDTH == HIDDEN_DIM``, a multiple of 64 (one text attention head per
64 channels; the context queries are concatenated with the projected text queries).
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from instsynth.modeling.convert import CHECKPOINT_SUFFIXES
from instsynth.core.io import InstSynthError, get_logger
from instsynth.modeling import register_model

log = get_logger("instsynth.oneformer")

TASK_TEMPLATE = "the task is {}"
TEXT_TEMPLATE = "a photo with a {}"
PAD_TEXT = "an instance photo"
SOT, EOT, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"
BACKBONE_OUT_FEATURES = ["stage1", "stage2", "stage3", "stage4"]
CLASS_HEAD = "model.transformer_module.decoder.class_embed."


# --------------------------------------------------------------------------- texts
def class_names(cfg) -> tuple[str, ...]:
    """Class names of the contiguous classes (``CLASS_NAMES``, or the 8 evaluated Cityscapes things)."""
    from instsynth.core.labels import EVAL_THING_CLASSES

    names = tuple(cfg.MODEL.ONE_FORMER.CLASS_NAMES) or EVAL_THING_CLASSES
    if len(names) != cfg.MODEL.ONE_FORMER.NUM_CLASSES:
        raise InstSynthError("MODEL.ONE_FORMER.CLASS_NAMES", f"{len(names)} names {list(names)} for "
                                                             f"NUM_CLASSES {cfg.MODEL.ONE_FORMER.NUM_CLASSES}")
    return names


def task_text(task: str = "instance") -> str:
    return TASK_TEMPLATE.format(task)


def instance_texts(gt_classes: Sequence[int], names: Sequence[str], num_texts: int) -> list[str]:
    """OneFormer's text queries of one image for the instance task: ``"a photo with a <class>"`` once
    per instance, classes in contiguous order, then ``"an instance photo"`` up to ``num_texts``
    (instances beyond ``num_texts`` get no text)."""
    counts = [0] * len(names)
    for c in gt_classes:
        counts[int(c)] += 1
    texts = [TEXT_TEMPLATE.format(name) for name, n in zip(names, counts) for _ in range(n)][:num_texts]
    return texts + [PAD_TEXT] * (num_texts - len(texts))


# --------------------------------------------------------------------------- tokenizer
def builtin_vocabulary() -> list[str]:
    """Words of the task/text templates and of every Cityscapes label name, sorted (a stable vocabulary)."""
    from cityscapesscripts.helpers.labels import labels

    words = set(" ".join([TASK_TEMPLATE.format("instance semantic panoptic"), TEXT_TEMPLATE, PAD_TEXT]).split())
    words.discard("{}")
    for label in labels:
        words.update(label.name.lower().split())
    return sorted(words)


def builtin_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` (ids: pad 0, unk 1, words, start, end-of-text last)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, UNK, *builtin_vocabulary(), SOT, EOT])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{SOT} $A {EOT}",
                                                       special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=SOT, eos_token=EOT)


def load_tokenizer(source: str, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise missing_weights_error(source, f"{what} (or set MODEL.ONE_FORMER.TOKENIZER to a CLIP tokenizer)",
                                    exc) from None


def tokenize(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """Token ids [len(texts), length], padded/truncated to ``length``, padding as id 0 (OneFormerProcessor)."""
    enc = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return enc["input_ids"] * enc["attention_mask"]


# --------------------------------------------------------------------------- weights
def is_pretrained_source(weights: str) -> bool:
    """True when ``MODEL.WEIGHTS`` names a folder or hub id (a OneFormer or a backbone), not a checkpoint file."""
    return bool(weights) and Path(weights).suffix not in CHECKPOINT_SUFFIXES and not Path(weights).is_file()


def looks_like_hub_id(source: str) -> bool:
    """``org/name`` (one slash, no leading ``/``, ``.``, ``~``) and not an existing path."""
    return source.count("/") == 1 and not source.startswith(("/", ".", "~")) and not Path(source).exists()


def missing_weights_error(source: str, what: str, exc: Exception | None = None) -> InstSynthError:
    local = Path(source).expanduser()
    if local.is_dir():
        return InstSynthError(local, f"cannot load {what} from this folder ({exc}); it must hold the files "
                                     "written by save_pretrained (config.json, model.safetensors, tokenizer)")
    if not looks_like_hub_id(source):
        return InstSynthError(local, f"{what}: folder not found (give a folder written by save_pretrained or a "
                                     "hub id such as shi-labs/oneformer_cityscapes_swin_large)")
    folder = f"weights/{source.rstrip('/').split('/')[-1]}"
    key = re.search(r"MODEL\.[A-Z_.]*[A-Z]", what)
    key = key.group(0) if key else "the config value"
    reason = str(exc).strip().splitlines()[0][:200] if exc else "not found"
    return InstSynthError(source, f"{what} could not be loaded: no such local folder, not in the Hugging Face "
                                  f"cache, and the hub did not provide it ({reason}). Download it on a machine "
                                  f"with network access: `hf download {source} --local-dir {folder}`, copy "
                                  f"{folder} here and set {key} to {folder}")


def _resnet_config(cfg):
    from transformers import ResNetConfig

    r = cfg.MODEL.ONE_FORMER.RESNET
    return ResNetConfig(embedding_size=r.EMBEDDING_SIZE, hidden_sizes=list(r.HIDDEN_SIZES), depths=list(r.DEPTHS),
                        layer_type=r.LAYER_TYPE, out_features=BACKBONE_OUT_FEATURES)


def _swin_config(cfg):
    from transformers import SwinConfig

    s = cfg.MODEL.ONE_FORMER.SWIN
    return SwinConfig(image_size=s.PRETRAIN_IMG_SIZE, embed_dim=s.EMBED_DIM, depths=list(s.DEPTHS),
                      num_heads=list(s.NUM_HEADS), window_size=s.WINDOW_SIZE, drop_path_rate=s.DROP_PATH_RATE,
                      out_features=BACKBONE_OUT_FEATURES)


def pretrained_backbone(source: str, cfg, model_type: str):
    """An ImageNet backbone (the transformers ``*Backbone`` class of ``model_type``) from a folder or hub
    id; Swin gets the config's stochastic depth rate. (``AutoBackbone.from_pretrained`` asks the hub
    even for a local folder, so the class is looked up here.)"""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

    if model_type not in MODEL_FOR_BACKBONE_MAPPING_NAMES:
        raise InstSynthError(source, f"MODEL.WEIGHTS is a {model_type!r} model: neither a OneFormer nor a "
                                     f"backbone ({', '.join(sorted(MODEL_FOR_BACKBONE_MAPPING_NAMES))})")
    backbone_class = getattr(transformers, MODEL_FOR_BACKBONE_MAPPING_NAMES[model_type])
    extra = {"drop_path_rate": cfg.MODEL.ONE_FORMER.SWIN.DROP_PATH_RATE} if model_type == "swin" else {}
    try:
        return backbone_class.from_pretrained(source, out_features=BACKBONE_OUT_FEATURES, **extra)
    except (OSError, ValueError) as exc:
        raise missing_weights_error(source, "MODEL.WEIGHTS (ImageNet backbone)", exc) from None


def loss_settings(cfg) -> dict:
    """OneFormerConfig fields that are training settings (applied to loaded models too)."""
    o = cfg.MODEL.ONE_FORMER
    return dict(no_object_weight=o.NO_OBJECT_WEIGHT, class_weight=o.CLASS_WEIGHT, mask_weight=o.MASK_WEIGHT,
                dice_weight=o.DICE_WEIGHT, contrastive_weight=o.CONTRASTIVE_WEIGHT,
                contrastive_temperature=o.CONTRASTIVE_TEMPERATURE, train_num_points=o.TRAIN_NUM_POINTS,
                oversample_ratio=o.OVERSAMPLE_RATIO, importance_sample_ratio=o.IMPORTANCE_SAMPLE_RATIO,
                is_training=True)


def oneformer_config(cfg, names: Sequence[str], backbone_config=None):
    """A ``OneFormerConfig`` from the ``MODEL.ONE_FORMER`` keys (or from ``HF_CONFIG``)."""
    from transformers import OneFormerConfig

    o = cfg.MODEL.ONE_FORMER
    labels = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if o.HF_CONFIG:
        try:
            config = OneFormerConfig.from_pretrained(o.HF_CONFIG)
        except (OSError, ValueError) as exc:
            raise missing_weights_error(o.HF_CONFIG, "MODEL.ONE_FORMER.HF_CONFIG", exc) from None
        config.update({**labels, **loss_settings(cfg)})
        return config
    if o.TEXT_ENCODER_N_CTX > 0 and o.TEXT_ENCODER_WIDTH != o.HIDDEN_DIM:
        raise InstSynthError("MODEL.ONE_FORMER.TEXT_ENCODER_WIDTH", f"must equal HIDDEN_DIM ({o.HIDDEN_DIM}) when "
                                                                    "TEXT_ENCODER_N_CTX > 0, got "
                                                                    f"{o.TEXT_ENCODER_WIDTH}")
    if o.TEXT_ENCODER_WIDTH % 64:
        raise InstSynthError("MODEL.ONE_FORMER.TEXT_ENCODER_WIDTH",
                             f"must be a multiple of 64 (one text attention head per 64 channels), "
                             f"got {o.TEXT_ENCODER_WIDTH}")
    if backbone_config is None:
        builders = {"resnet": _resnet_config, "swin": _swin_config}
        if o.BACKBONE not in builders:
            raise InstSynthError("MODEL.ONE_FORMER.BACKBONE", f"must be one of {sorted(builders)}, got {o.BACKBONE!r}")
        backbone_config = builders[o.BACKBONE](cfg)
    return OneFormerConfig(
        backbone_config=backbone_config, **labels, num_queries=o.NUM_OBJECT_QUERIES, hidden_dim=o.HIDDEN_DIM,
        conv_dim=o.CONVS_DIM, mask_dim=o.MASK_DIM, encoder_layers=o.ENC_LAYERS,
        encoder_feedforward_dim=o.ENC_DIM_FEEDFORWARD, decoder_layers=o.DEC_LAYERS, query_dec_layers=o.QUERY_DEC_LAYERS,
        num_attention_heads=o.NHEADS, dim_feedforward=o.DIM_FEEDFORWARD, dropout=o.DROPOUT,
        task_seq_len=o.TASK_SEQ_LEN, text_encoder_context_length=o.MAX_SEQ_LEN, text_encoder_width=o.TEXT_ENCODER_WIDTH,
        text_encoder_num_layers=o.TEXT_ENCODER_NUM_LAYERS, text_encoder_vocab_size=o.TEXT_ENCODER_VOCAB_SIZE,
        text_encoder_proj_layers=o.TEXT_ENCODER_PROJ_LAYERS, text_encoder_n_ctx=o.TEXT_ENCODER_N_CTX,
        **loss_settings(cfg))


def check_dims(config, source: str) -> None:
    """transformers keeps the transformer module's input projections (conv_dim -> hidden_dim) in a plain
    list, so they would be neither trained, saved nor moved to the GPU: only the identity case is usable.
    Its query projection also reads the mask features with conv_dim channels."""
    if config.conv_dim != config.hidden_dim or config.mask_dim != config.hidden_dim or config.enforce_input_proj:
        raise InstSynthError(source, f"CONVS_DIM ({config.conv_dim}) and MASK_DIM ({config.mask_dim}) must equal "
                                     f"HIDDEN_DIM ({config.hidden_dim}) and enforce_input_proj be off: transformers' "
                                     "OneFormer does not register the projection layers otherwise (they would stay "
                                     "random and untrained)")


def _class_rows(checkpoint_names: list[str], names: Sequence[str]) -> list[int] | None:
    """Rows of a checkpoint's class head for ``names`` (+ its no-object row), or None if one is missing."""
    lowered = [n.lower() for n in checkpoint_names]
    if not all(n.lower() in lowered for n in names):
        return None
    return [lowered.index(n.lower()) for n in names] + [len(checkpoint_names)]


def load_pretrained(source: str, cfg, names: Sequence[str]):
    """A OneFormer from a ``save_pretrained`` folder or hub id, with its class head mapped onto ``names``."""
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation

    try:
        ckpt_config = OneFormerConfig.from_pretrained(source)
        state = OneFormerForUniversalSegmentation.from_pretrained(source, config=ckpt_config).state_dict()
    except (OSError, ValueError) as exc:
        raise missing_weights_error(source, "MODEL.WEIGHTS (OneFormer)", exc) from None
    check_dims(ckpt_config, source)
    ckpt_names = [ckpt_config.id2label[i] for i in range(ckpt_config.num_labels)]
    config = copy.deepcopy(ckpt_config)
    config.update(dict(num_labels=len(names), id2label=dict(enumerate(names)),
                       label2id={n: i for i, n in enumerate(names)}, **loss_settings(cfg)))
    model = OneFormerForUniversalSegmentation(config)
    rows = _class_rows(ckpt_names, names)
    state.pop("criterion.empty_weight", None)  # class weights of the loss: from NUM_CLASSES and NO_OBJECT_WEIGHT
    for key in (CLASS_HEAD + "weight", CLASS_HEAD + "bias"):
        if rows is None:
            state.pop(key)
        else:
            state[key] = state[key][rows]
    if rows is None:
        log.warning("%s: its classes %s do not include all of %s; the class head starts from scratch",
                    source, ckpt_names, list(names))
    result = model.load_state_dict(state, strict=False)
    fresh = sorted({".".join(k.split(".")[:3]) for k in result.missing_keys if k != "criterion.empty_weight"})
    log.info("loaded OneFormer %s (%d classes -> %d)%s", source, len(ckpt_names), len(names),
             f"; newly initialised: {', '.join(fresh)}" if fresh else "")
    return model


# --------------------------------------------------------------------------- model
class OneFormer(nn.Module):
    """The shared model interface (see ``instsynth.modeling``) around ``OneFormerForUniversalSegmentation``."""

    loads_own_weights = True  # MODEL.WEIGHTS folders / hub ids are loaded by the builder
    backbone_prefix = "oneformer.model.pixel_level_module.encoder"  # parameters that get SOLVER.BACKBONE_MULTIPLIER
    every_parameter_gets_gradient = True  # DDP runs with find_unused_parameters=False

    def __init__(self, hf_model, tokenizer, names: Sequence[str], pixel_mean, pixel_std, size_divisibility: int = 32,
                 task: str = "instance", max_detections: int = 100, mask_threshold: float = 0.5,
                 score_threshold: float = 0.0):
        super().__init__()
        if task != "instance":
            raise InstSynthError("MODEL.ONE_FORMER.TASK", f"only 'instance' is supported, got {task!r}")
        self.oneformer = hf_model
        self.tokenizer = tokenizer
        self.class_names = tuple(names)
        self.task = task
        self.size_divisibility = size_divisibility
        self.max_detections, self.mask_threshold, self.score_threshold = max_detections, mask_threshold, score_threshold
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)
        config = hf_model.config
        self.num_texts = config.num_queries - config.text_encoder_n_ctx
        self.task_tokens = tokenize(tokenizer, [task_text(task)], config.task_seq_len)
        self.train(True)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def train(self, mode: bool = True):
        """Also switch transformers' ``is_training`` flags (dropout in the pixel decoder, text mapper)."""
        super().train(mode)
        for module in self.oneformer.modules():
            if hasattr(module, "is_training"):
                module.is_training = mode
        self.oneformer.config.is_training = mode
        return self

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the transformers model and its tokenizer (loadable with ``MODEL.WEIGHTS folder``)."""
        self.oneformer.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return Path(folder)

    # ------------------------------------------------------------------ inputs
    def preprocess(self, batched_inputs: list[dict]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalised images zero-padded to a common size divisible by ``size_divisibility``."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        sizes = [tuple(img.shape[-2:]) for img in images]
        d = max(self.size_divisibility, 1)
        h = -(-max(s[0] for s in sizes) // d) * d
        w = -(-max(s[1] for s in sizes) // d) * d
        batch = images[0].new_zeros((len(images), 3, h, w))
        for img, out in zip(images, batch):
            out[:, :img.shape[1], :img.shape[2]].copy_(img)
        return batch, sizes

    def targets(self, batched_inputs: list[dict], padded_hw: tuple[int, int]):
        """Mask labels (float, padded), class labels and tokenized text queries of a batch."""
        mask_labels, class_labels, texts = [], [], []
        for x in batched_inputs:
            inst = x["instances"]
            masks = inst["gt_masks"].to(self.device)
            padded = masks.new_zeros((masks.shape[0], *padded_hw), dtype=torch.float32)
            padded[:, :masks.shape[1], :masks.shape[2]] = masks.float()
            classes = inst["gt_classes"].to(self.device).long()
            mask_labels.append(padded)
            class_labels.append(classes)
            texts.append(tokenize(self.tokenizer, instance_texts(classes.tolist(), self.class_names, self.num_texts),
                                  self.oneformer.config.text_encoder_context_length))
        return mask_labels, class_labels, torch.stack(texts).to(self.device)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: list[dict]):
        pixel_values, sizes = self.preprocess(batched_inputs)
        task_inputs = self.task_tokens.to(self.device).expand(len(batched_inputs), -1)
        if not self.training:
            outputs = self.oneformer(pixel_values=pixel_values, task_inputs=task_inputs, output_auxiliary_logits=False)
            return [{"instances": self.instance_inference(cls, masks, size, pixel_values.shape[-2:],
                                                          (x["height"], x["width"]))}
                    for cls, masks, size, x in zip(outputs.class_queries_logits, outputs.masks_queries_logits, sizes,
                                                   batched_inputs)]
        mask_labels, class_labels, text_inputs = self.targets(batched_inputs, pixel_values.shape[-2:])
        outputs = self.oneformer(pixel_values=pixel_values, task_inputs=task_inputs, text_inputs=text_inputs)
        return self.losses(outputs, mask_labels, class_labels)

    def losses(self, outputs, mask_labels, class_labels) -> dict[str, torch.Tensor]:
        """transformers' weighted loss terms, final and per decoder layer (``loss_cross_entropy*`` are
        named ``loss_ce*`` as in FastInst)."""
        config = self.oneformer.config
        loss_dict = self.oneformer.get_loss_dict(
            masks_queries_logits=outputs.masks_queries_logits, class_queries_logits=outputs.class_queries_logits,
            contrastive_queries_logits=outputs.transformer_decoder_contrastive_queries, mask_labels=mask_labels,
            class_labels=class_labels, text_queries=outputs.text_queries,
            auxiliary_predictions=outputs.auxiliary_predictions,
            calculate_contrastive_loss=config.contrastive_temperature is not None)
        return {key.replace("loss_cross_entropy", "loss_ce"): value.reshape(()) for key, value in loss_dict.items()}

    @torch.no_grad()
    def instance_inference(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, image_size: tuple[int, int],
                           padded_size, output_size: tuple[int, int], chunk: int = 16) -> dict:
        """Top-k (query, class) pairs -> bool masks at ``output_size``, classes and scores."""
        num_classes = class_logits.shape[1] - 1
        probs = class_logits.float().softmax(-1)[:, :-1]
        k = min(self.max_detections, probs.numel())
        scores, index = probs.flatten().topk(k)
        classes, queries = index % num_classes, index // num_classes
        masks, mask_scores = [], []
        for start in range(0, k, chunk):  # bounded memory at full resolution
            logits = mask_logits[queries[start:start + chunk]].float()[None]
            logits = F.interpolate(logits, size=tuple(padded_size), mode="bilinear", align_corners=False)
            logits = logits[..., :image_size[0], :image_size[1]]
            prob = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)[0].sigmoid()
            binary = prob > self.mask_threshold
            masks.append(binary.cpu())
            mask_scores.append((prob * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1))
        if k:
            scores = scores * torch.cat(mask_scores)
        masks = torch.cat(masks) if masks else torch.zeros((0, *output_size), dtype=torch.bool)
        keep = (scores > self.score_threshold).cpu()
        return {"pred_masks": masks[keep], "pred_classes": classes.cpu()[keep], "scores": scores.float().cpu()[keep]}


# --------------------------------------------------------------------------- builder
def weights_model_type(source: str) -> str:
    """``model_type`` of the config saved with a folder / hub id (oneformer, resnet, swin, ...)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as exc:
        raise missing_weights_error(source, "MODEL.WEIGHTS (a OneFormer or an ImageNet backbone)", exc) from None


def build_hf_model(cfg, names: Sequence[str]):
    """(transformers model, tokenizer source or None): a OneFormer named by MODEL.WEIGHTS, or one built
    from HF_CONFIG / the keys, with the ImageNet backbone named by MODEL.WEIGHTS if it names one."""
    from transformers import OneFormerForUniversalSegmentation

    weights = cfg.MODEL.WEIGHTS
    backbone = None
    if is_pretrained_source(weights):
        model_type = weights_model_type(weights)
        if model_type == "oneformer":
            return load_pretrained(weights, cfg, names), weights
        backbone = pretrained_backbone(weights, cfg, model_type)
    config = oneformer_config(cfg, names, backbone.config if backbone is not None else None)
    check_dims(config, "MODEL.ONE_FORMER.CONVS_DIM")
    model = OneFormerForUniversalSegmentation(config)
    if backbone is not None:
        model.model.pixel_level_module.encoder.load_state_dict(backbone.state_dict())
        log.info("ImageNet backbone (%s) from %s", backbone.config.model_type, weights)
    return model, None


def build_tokenizer(cfg, weights_source: str | None, vocab_size: int):
    if cfg.MODEL.ONE_FORMER.TOKENIZER:
        tokenizer = load_tokenizer(cfg.MODEL.ONE_FORMER.TOKENIZER, "MODEL.ONE_FORMER.TOKENIZER")
    elif weights_source:
        tokenizer = load_tokenizer(weights_source, "the tokenizer of MODEL.WEIGHTS")
    else:
        tokenizer = builtin_tokenizer()
    if len(tokenizer) > vocab_size:
        raise InstSynthError("MODEL.ONE_FORMER.TEXT_ENCODER_VOCAB_SIZE", f"{vocab_size} is smaller than the "
                                                                         f"tokenizer's vocabulary ({len(tokenizer)})")
    return tokenizer


@register_model("OneFormer")
def build_oneformer(cfg) -> OneFormer:
    """OneFormer from the config (see the module docstring for how MODEL.WEIGHTS is used)."""
    names = class_names(cfg)
    hf_model, weights_source = build_hf_model(cfg, names)
    tokenizer = build_tokenizer(cfg, weights_source, hf_model.config.text_encoder_vocab_size)
    if not cfg.MODEL.ONE_FORMER.TOKENIZER and weights_source is None:
        unknown = sorted({w for n in names for w in n.lower().split()} - set(builtin_vocabulary()))
        if unknown:
            log.warning("class-name words %s are not in the built-in tokenizer's vocabulary; set "
                        "MODEL.ONE_FORMER.TOKENIZER to a CLIP tokenizer to tell them apart", unknown)
    return OneFormer(hf_model, tokenizer, names, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD,
                     cfg.MODEL.ONE_FORMER.SIZE_DIVISIBILITY, cfg.MODEL.ONE_FORMER.TASK, cfg.TEST.DETECTIONS_PER_IMAGE,
                     cfg.MODEL.ONE_FORMER.TEST.MASK_THRESHOLD, cfg.MODEL.ONE_FORMER.TEST.SCORE_THRESHOLD)
