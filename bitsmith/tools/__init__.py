"""The tools the CLI drives: describe (inspect), evaluate, run."""
