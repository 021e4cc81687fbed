"""Background tasks: definitions, runs, the executor and the scheduler."""
