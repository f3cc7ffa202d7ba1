"""The device side: device SDK over MQTT, fleet simulator, topic mapping (see issue 5)."""

__all__: list[str] = []
