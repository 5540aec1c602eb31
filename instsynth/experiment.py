"""``python -m instsynth.experiment --config EXP.yaml``: the command line of :mod:`instsynth.experiments`."""
from instsynth.cli.experiment import main

if __name__ == "__main__":
    main()
