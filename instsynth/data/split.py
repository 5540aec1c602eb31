"""``python -m instsynth.data.split IN.json``: a COCO / LVIS file into train and val by image; the command line of
:mod:`instsynth.data.coco_split` (see :mod:`instsynth.cli.split`)."""
if __name__ == "__main__":
    from instsynth.cli.split import main

    main()
