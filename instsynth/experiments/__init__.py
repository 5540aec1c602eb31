"""Controlled experiments: the same model and schedule trained on several data arms, N seeds each.

    python -m instsynth.experiment --config configs/experiments/demo.yaml [--output DIR] [--arms a,b]
                                   [--prepare_only] [--table_only]

Arms (``kind``): ``baseline`` (the original train split), ``duplicate`` (original images repeated
to as many extra images as a synthetic arm adds: controls for seeing more images), ``copy_paste``
(Simple Copy-Paste of original instances, :mod:`instsynth.experiments.copy_paste`, as many new images) and
``instsynth`` (stage 1 -> generation -> quality gate -> integration -> label crops -> COCO, each stage
run through its command-line script with the arm's options as flags). Every arm trains on the
baseline train set plus its extra images and is tested on the original test split.

Layout of the output folder: ``data/<arm>/`` (each arm's extra Cityscapes tree and COCO files;
``data/baseline`` holds hard links of the original train/test splits), ``work/<hash>/`` (stage-1
crops and generated samples, shared by arms with the same selection and generation options),
``runs/<arm>/seed_<s>/`` (train_net.py output folders), ``results.md`` / ``results.json`` (the table).
Everything resumes: prepared arms (``data/<arm>/prepared.json``) are not rebuilt, finished runs
(``experiment_run.json``) are not retrained and interrupted ones continue from their last checkpoint.

Modules: config (the YAML), arms (each arm's data), runs (training), table (statistics), harness
(:func:`run_experiment`), copy_paste (the Simple Copy-Paste control), dataset (the dataset an experiment names).
"""
