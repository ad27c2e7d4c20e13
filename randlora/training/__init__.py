"""The training framework around the models, data and tasks: config checks and resolution
(``config``), the run folder (``folder``), checkpoints, callbacks, loggers, distributed strategies,
the preflight of a job's sources and the isolation of multirun jobs (``launch``)."""
