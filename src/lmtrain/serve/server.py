"""uvicorn serving the app on a socket already bound, until SIGINT or SIGTERM.

The first signal stops accepting connections, lets the requests in flight finish, and the
process exits 0; a second exits at once (status ``128 + signum``, as a run's second signal:
:func:`lmtrain.signals.exit_now`).
"""

from __future__ import annotations

import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from lmtrain.signals import exit_now, signal_name, write_stderr


class _Server(uvicorn.Server):
    """uvicorn's server with the stop above: its handler sets ``should_exit`` without
    recording the signal, so uvicorn does not raise it again after the drain (which would
    end a clean stop with status 143 or 130)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            exit_now(sig, " again")
        write_stderr(f"\n{signal_name(sig)}: stopping once the requests in flight have ended "
                     f"(send it again to exit at once)\n")
        self.should_exit = True


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` (bound; uvicorn listens on it) until stopped."""
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None)
    _Server(config).run(sockets=[sock])
