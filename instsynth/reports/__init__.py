"""What a run reports to its user: the end-of-run summary (summary) and drawings (viz)."""
