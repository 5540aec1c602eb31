"""Tiny randomly initialised diffusion pipelines of the real diffusers/transformers classes.

They let every generation backend run end to end offline, from disk, in seconds on a CPU: each
pipeline is built from small configs written out here, saved with ``save_pretrained`` and loaded back
by path exactly like a downloaded model. The CLIP tokenizer's vocabulary (the 256 byte-level symbols,
plain and word-final, plus the two special tokens; no merges) is written by the project, so nothing
is fetched from a hub. Images are 32x32 pixels (latents 16x16, VAE factor 2).

``python -m instsynth.testing.tiny_models OUT`` writes all of them to ``OUT/<name>/``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

TINY_NAMES = ("sd-inpaint", "sd", "sdxl", "gligen", "sdxl-inpaint", "flux-fill", "kandinsky-inpaint")
"""sd-inpaint: StableDiffusionInpaintPipeline (diffinpainting); sd / sdxl: StableDiffusionPipeline /
StableDiffusionXLPipeline (bld); gligen: StableDiffusionGLIGENPipeline (gligen); sdxl-inpaint /
flux-fill / kandinsky-inpaint: StableDiffusionXLInpaintPipeline / FluxFillPipeline /
KandinskyV22InpaintCombinedPipeline (diffusers)."""

IMAGE_SIZE = 32
TEXT_DIM = 32
_SCHEDULER_KW = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def tiny_tokenizer():
    """A CLIPTokenizer over single byte-level symbols (514 tokens), built without any download."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({s: len(vocab) for s in symbols})
    vocab.update({s + "</w>": len(vocab) for s in symbols})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_text_encoder(with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=514, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_t5_tokenizer():
    """A T5TokenizerFast over single characters (unigram, equal scores), built without any download."""
    import string

    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -2.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=200, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0))


def tiny_vae(**kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE, **kwargs)


def tiny_unet(in_channels: int = 4, cross_attention_dim: int = TEXT_DIM, **kwargs):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8, use_linear_projection=True, **kwargs)


def build_sd_inpaint():
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(), unet=tiny_unet(in_channels=9),
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_SCHEDULER_KW),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sd():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(), unet=tiny_unet(),
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_SCHEDULER_KW),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    time_dim = 8
    unet = tiny_unet(cross_attention_dim=2 * TEXT_DIM, addition_embed_type="text_time",
                     addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=TEXT_DIM + 6 * time_dim)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), text_encoder_2=tiny_text_encoder(with_projection=True),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **_SCHEDULER_KW))


def build_sdxl_inpaint():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline

    time_dim = 8
    unet = tiny_unet(in_channels=9, cross_attention_dim=2 * TEXT_DIM, addition_embed_type="text_time",
                     addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=TEXT_DIM + 6 * time_dim)
    return StableDiffusionXLInpaintPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), text_encoder_2=tiny_text_encoder(with_projection=True),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **_SCHEDULER_KW),
        requires_aesthetics_score=False)


def build_flux_fill():
    """FLUX.1 Fill's layout at toy size: packed latents (4 x 4 channels), masked-image latents and the
    2x2-patched pixel mask (4 x 2 x 2) make the transformer's 48 input channels (FLUX.1 Fill: 384)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel

    latent = 4
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=8 * latent + 4 * 2 * 2, out_channels=4 * latent,
                                         num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                         pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    return FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(use_quant_conv=False, use_post_quant_conv=False,
                                                                  shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(), text_encoder_2=tiny_t5_encoder(),
        tokenizer_2=tiny_t5_tokenizer(), transformer=transformer)


def build_kandinsky_inpaint():
    """Kandinsky 2.2 inpainting as AutoPipelineForInpainting loads it: the prior (CLIP text encoder ->
    PriorTransformer -> image embedding; a CLIP vision encoder for the zero image) combined with the
    decoder (a UNet conditioned on image embeddings, 4 latent + 4 masked-image + 1 mask channels, MoVQ)."""
    from diffusers import (DDIMScheduler, KandinskyV22InpaintCombinedPipeline, PriorTransformer, UnCLIPScheduler,
                           UNet2DConditionModel, VQModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    vision = CLIPVisionConfig(hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              image_size=28, patch_size=14, projection_dim=TEXT_DIM)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=9, out_channels=8, addition_embed_type="image",
        encoder_hid_dim=TEXT_DIM, encoder_hid_dim_type="image_proj", cross_attention_dim=32, class_embed_type=None,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32), layers_per_block=1,
        attention_head_dim=4, resnet_time_scale_shift="scale_shift", norm_num_groups=8)
    movq = VQModel(in_channels=3, out_channels=3, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=12,
                   block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                   up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
                   norm_num_groups=8, norm_type="spatial")
    return KandinskyV22InpaintCombinedPipeline(
        unet=unet, movq=movq,
        scheduler=DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        prior_prior=PriorTransformer(num_attention_heads=2, attention_head_dim=8, embedding_dim=TEXT_DIM,
                                     num_layers=1, num_embeddings=77),
        prior_image_encoder=CLIPVisionModelWithProjection(vision),
        prior_text_encoder=tiny_text_encoder(with_projection=True), prior_tokenizer=tiny_tokenizer(),
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample=True,
                                        clip_sample_range=10.0),
        prior_image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}))


def build_gligen():
    from diffusers import PNDMScheduler, StableDiffusionGLIGENPipeline

    return StableDiffusionGLIGENPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
        unet=tiny_unet(in_channels=9, attention_type="gated"),
        scheduler=PNDMScheduler(skip_prk_steps=True, **_SCHEDULER_KW),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


BUILDERS: dict[str, Callable] = {"sd-inpaint": build_sd_inpaint, "sd": build_sd, "sdxl": build_sdxl,
                                 "gligen": build_gligen, "sdxl-inpaint": build_sdxl_inpaint,
                                 "flux-fill": build_flux_fill, "kandinsky-inpaint": build_kandinsky_inpaint}


def build_tiny_model(name: str, out: str | Path, seed: int = 0) -> Path:
    """Build tiny pipeline ``name`` (one of TINY_NAMES) with seeded random weights and save it to ``out/name``.

    An existing complete folder (``model_index.json`` present) is reused.
    """
    import torch

    folder = Path(out) / name
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    BUILDERS[name]().save_pretrained(folder)
    return folder


def build_tiny_models(out: str | Path, names=TINY_NAMES) -> dict[str, Path]:
    """Build every tiny pipeline in ``names`` under ``out``; returns ``{name: folder}``."""
    return {name: build_tiny_model(name, out) for name in names}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the tiny random test pipelines to OUT/<name>/.")
    parser.add_argument("out", help="output folder (e.g. .tiny_models)")
    parser.add_argument("--names", default=",".join(TINY_NAMES), help=f"comma-separated subset of {TINY_NAMES}")
    args = parser.parse_args(argv)
    for name, folder in build_tiny_models(args.out, [n for n in args.names.split(",") if n]).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
