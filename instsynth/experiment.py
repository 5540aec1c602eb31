"""``python -m instsynth.experiment``: the command line of :mod:`instsynth.experiments.harness`."""
from instsynth.experiments.harness import main

if __name__ == "__main__":
    main()
