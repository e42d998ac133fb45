"""The MQTT broker: connections, sessions, routing, retained messages."""
