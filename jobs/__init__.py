"""Ray Job entrypoints (`python -m jobs.merge --spec ...`) and example job specs."""
