"""The device side: device SDK over MQTT, fleet simulator, topic mapping (see issue 5)."""

from devices.sdk import ClientError, Device, Resync
from devices.simulate import SimStats, simulate

__all__: list[str] = ["ClientError", "Device", "Resync", "SimStats", "simulate"]
