"""``python -m instsynth.summary``: the command line of :mod:`instsynth.reports.summary`."""
from instsynth.cli.summary import main

if __name__ == "__main__":
    main()
