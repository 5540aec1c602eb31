"""``python -m instsynth.demo``: the command line of :mod:`instsynth.stages.demo_dataset`."""
from instsynth.stages.demo_dataset import main

if __name__ == "__main__":
    main()
