"""``ingestd bench``: a multi-process MQTT load generator built on the compiled codec.

The click command is :data:`ingestd.bench.command.bench`; :func:`ingestd.bench.runner.run`
runs one scenario from Python (tests) and returns a :class:`~ingestd.bench.runner.Result`.
Importing this package does not import the codec (workers do).
"""
