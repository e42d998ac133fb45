"""The MQTT broker: channels, sessions, registry, routing, auth, retained messages, store."""
