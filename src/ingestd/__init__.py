"""ingestd: an MQTT 3.1.1/5.0 broker that ingests device telemetry into PostgreSQL."""

__version__ = "0.1.0"
