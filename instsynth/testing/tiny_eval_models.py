"""Tiny randomly initialised evaluation models for offline tests: CLIP and an Inception feature net.

Both are real classes (transformers ``CLIPModel`` / ``CLIPProcessor``, torchvision Inception
blocks) saved to a folder and loaded back by path exactly like real weights:

- :func:`build_tiny_clip` writes a character-level CLIP tokenizer (a vocab of single characters,
  no BPE merges), a 32x32 image processor and a 2-layer CLIP with 16-d embeddings;
- :func:`build_tiny_inception` writes ``config.json`` + ``model.safetensors`` for
  :func:`instsynth.quality.build_feature_network` (``tiny_inception``: 232-d features of 64x64 input).

Seeded, so the same call gives the same weights. The scores they give are meaningless, only finite.
CLI: ``python -m instsynth.testing.tiny_eval_models OUT`` writes ``OUT/clip`` and ``OUT/inception``.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKEN_CHARS = string.ascii_lowercase + string.digits + " .,'-!?"


def _write_char_vocab(folder: Path) -> dict[str, int]:
    """vocab.json (every character plain and word-final ``</w>``, BOS, EOS) and an empty merges.txt."""
    chars = [c for c in TOKEN_CHARS if c != " "]
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return vocab


def build_tiny_clip(out: str | Path, seed: int = 0) -> Path:
    """Save a tiny random CLIPModel + CLIPProcessor to ``out`` (returned); reuses a finished folder."""
    import tempfile

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = Path(out)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        vocab = _write_char_vocab(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab[BOS],
                         eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(out)
    model.save_pretrained(out)  # model.safetensors last: its presence marks a finished folder
    return out


def build_tiny_inception(out: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Inception feature net (config.json + model.safetensors) to ``out`` (returned)."""
    import torch
    from safetensors.torch import save_file

    from instsynth.core.io import write_json
    from instsynth.quality.fid import build_feature_network

    out = Path(out)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    config = {"architecture": "tiny_inception", "stem_channels": 16, "pool_features": 8, "input_size": 64}
    torch.manual_seed(seed)
    net = build_feature_network(config)
    for module in net.modules():  # like torchvision's Inception init: spread-out features, not ~constant
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.trunc_normal_(module.weight, std=0.1, a=-0.2, b=0.2)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    return out


def main(argv=None) -> None:
    """``python -m instsynth.testing.tiny_eval_models OUT``: write OUT/clip and OUT/inception."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random CLIP (OUT/clip) and Inception feature net "
                                                 "(OUT/inception) for offline demos and tests.")
    parser.add_argument("out", help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_clip(Path(args.out) / "clip", args.seed))
    print(build_tiny_inception(Path(args.out) / "inception", args.seed))


if __name__ == "__main__":
    main()
