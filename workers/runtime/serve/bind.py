"""The serve port, checked before the model loads: uvicorn would only log a bind error after loading the model
and exit 3; this says it in one line first, naming the setting."""

from __future__ import annotations

import errno
import socket

from workers.errors import ConfigError


def port_free(host: str, port: int, setting: str) -> None:
    """ConfigError naming ``setting`` when ``host:port`` is taken or ``host`` is not an address of this
    machine. A port taken in between still gets uvicorn's line. Other bind failures (a privileged port
    without the right) are left to the server, after the settings' other checks."""
    if port == 0:
        return
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is free
            sock.bind((host, port))
    except socket.gaierror as exc:
        raise ConfigError("SCORING_SERVE__HOST", f"cannot listen on {host}: {exc.strerror or exc}") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(setting, f"cannot listen on {host}:{port}: {exc.strerror}") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError("SCORING_SERVE__HOST", f"cannot listen on {host}: {exc.strerror}") from None
