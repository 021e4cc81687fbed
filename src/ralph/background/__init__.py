"""Background tasks: definitions, runs, their coordinator and units, the scheduler."""
