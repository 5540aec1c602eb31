"""``python -m instsynth.copy_paste``: Simple Copy-Paste, the command line of :mod:`instsynth.experiments.copy_paste`."""
from instsynth.cli.copy_paste import main

if __name__ == "__main__":
    main()
