"""Network transports feeding :class:`ingestd.broker.connection.MQTTConnection`."""
