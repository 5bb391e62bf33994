"""How the host reaches a device: the Transport protocol, transports and the agent client.

This package never imports harness; harness builds on it.
"""
from devices.errors import (FixableError, DeviceError, TransferError, LoadError, InferenceError,
                            MeasurementTimeout, DeviceLost, ThermalError, BadRequest,
                            AgentProtocolError)
from devices.transport import DeviceControl, Transport, RemoteProcess
from devices.local import LocalTransport
from devices.agent_client import AgentClient

__all__ = ["FixableError", "DeviceError", "TransferError", "LoadError", "InferenceError",
           "MeasurementTimeout",
           "DeviceLost", "ThermalError", "BadRequest", "AgentProtocolError", "Transport",
           "DeviceControl", "RemoteProcess", "LocalTransport", "AgentClient"]

import logging as _logging

_logging.getLogger("devices").addHandler(_logging.NullHandler())
