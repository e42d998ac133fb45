"""MQTT protocol numbers for the Python layers (``ingestd.mqtt.constants``).

The one Python source of packet types, property ids and reason codes; the
Cython ``.pxd``/``.pyx`` files mirror them and ``tests/test_codec_constants.py``
fails when a copy disagrees.
"""
