"""``python -m instsynth.modeling.convert IN OUT [--to official]``: the command line of
:mod:`instsynth.modeling.weights` (see :mod:`instsynth.cli.convert`)."""
if __name__ == "__main__":
    from instsynth.cli.convert import main

    raise SystemExit(main())
