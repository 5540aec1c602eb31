"""``python -m instsynth.demo OUT``: the demo dataset, the command line of :mod:`instsynth.stages.demo_dataset`."""
from instsynth.cli.demo import main

if __name__ == "__main__":
    main()
