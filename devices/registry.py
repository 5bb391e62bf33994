"""Device names to transports.

`local` (this machine) is built in; registered devices (devices.toml) come with the SSH and
ADB transports.
"""
from pathlib import Path

from devices.errors import BadRequest
from devices.local import LocalTransport
from devices.transport import Transport

BUILTIN_DEVICES = ("local",)


def open_transport(name: str, home: Path) -> Transport:
    """The transport for a device name; `home` is $HARNESS_HOME."""
    if name == "local":
        return LocalTransport(Path(home) / "devices" / "local", name="local")
    raise BadRequest(f"no device named {name!r}; known devices: {', '.join(BUILTIN_DEVICES)}",
                     fix="use device='local', or register the device first")
