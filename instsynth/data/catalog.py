"""``python -m instsynth.data.catalog add CATALOG NAME JSON IMAGE_ROOT`` / ``list`` (see :mod:`instsynth.cli.catalog`).

Also the Python name Detectron2 users look for: the registry's functions, defined in :mod:`instsynth.data.registry`.
"""
from instsynth.data.registry import (add_to_catalog, get_dataset_dicts, get_metadata, get_spec,  # noqa: F401
                                     register_coco_instances, register_dataset, registered_names)

if __name__ == "__main__":
    from instsynth.cli.catalog import main

    main()
