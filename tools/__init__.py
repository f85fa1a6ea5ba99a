"""Entry points beside run.py that use the trainer: benchmarks, the tiny-model and demo-data builders, the launch check.

Run each as `python -m tools.<name>`; nothing under toolkit/, extensions/ or jobs/ imports from here."""
