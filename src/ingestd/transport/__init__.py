"""Network transports: sockets only (TCP, TLS, WebSocket); bytes in, bytes out to a channel."""
