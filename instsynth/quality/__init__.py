"""Quality of generated instances, one module per job: pixel (SSIM/PSNR/leak), fid (Inception features, FID),
clip (CLIP scorer), runs (a run read back and evaluated), gate (scores, threshold tables, pass/fail), mask_gate
(a trained segmenter's IoU) and sam_gate (SAM prompted with the box).

Quality of generated instances: pixel metrics, FID, CLIP scores and the quality gate.

Every generated sample is an RGB crop that must equal its source crop outside the instance mask
(contract 2). Measured per sample:

- ``ssim_in`` / ``psnr_in``: how much the instance changed (SSIM map and MSE over mask pixels);
- ``ssim_out`` / ``psnr_out``: the same outside the mask; a hard paste gives exactly 1 and ``inf``;
- ``mask_leak``: the fraction of the squared pixel change that lies outside the mask (0 = none);
- ``changed_fraction``: the fraction of mask pixels that changed by more than a few grey levels;
- ``clip_prompt``: CLIP cosine similarity of the sample and its prompt text ("a photo of a red car");
- ``clip_margin``: ``clip_prompt`` minus the best score of the other prompts of the class;
- ``clip_class_margin``: the CLIP class check: the score of the plain class prompt ("a photo of a car")
  minus the best score of the other classes' prompts (below 0: CLIP sees another class);
- ``clip_source``: CLIP image-image cosine similarity of the sample and its source crop;

and per run the FID between the generated samples and the source crops: 2048-d pool features of
Inception-v3 (torchvision's network; with pytorch-fid's ``pt_inception`` weights pytorch-fid's own FID
Inception blocks, so features match pytorch-fid's to float rounding), or a network described by ``config.json``.

Models load from a local path or a Hugging Face hub id; nothing is downloaded unless a hub id is
given, and with no network and no local copy the error says what to download and where.

In JSON files an infinite PSNR is written as the string ``"inf"`` (strict JSON has no infinity) and
an undefined value (an empty region) as ``null``.
"""
