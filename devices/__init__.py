"""How the host reaches a device: the Transport protocol, transports and the agent client.

This package never imports harness; harness builds on it.
"""
from devices.errors import (DeviceError, TransferError, LoadError, InferenceError,
                            MeasurementTimeout, DeviceLost, ThermalError, BadRequest,
                            AgentProtocolError)
from devices.transport import Transport, RemoteProcess
from devices.local import LocalTransport
from devices.agent_client import AgentClient

__all__ = ["DeviceError", "TransferError", "LoadError", "InferenceError", "MeasurementTimeout",
           "DeviceLost", "ThermalError", "BadRequest", "AgentProtocolError", "Transport",
           "RemoteProcess", "LocalTransport", "AgentClient"]
