"""``python -m instsynth.copy_paste``: the command line of :mod:`instsynth.experiments.copy_paste`."""
from instsynth.experiments.copy_paste import main

if __name__ == "__main__":
    main()
