"""Undo: what a command created, removed again newest first when a later step fails or is interrupted."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import docker
import requests



def reason(exc: BaseException) -> str:
    """An exception as the few words that end a sentence; a lost connection's text is a nested repr."""
    if isinstance(exc, requests.exceptions.RequestException) and not isinstance(exc, docker.errors.DockerException):
        return "the Docker Engine stopped answering"
    return str(exc)


class Undo:
    """A stack of clean-up actions; `run` performs them newest first and cannot be interrupted."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], Any]]] = []

    def push(self, what: str, action: Callable[[], Any]) -> None:
        self._actions.append((what, action))

    def run(self) -> list[str]:
        """Undo everything; return what could not be undone (each with its reason)."""
        failed = []
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not strand resources
        try:
            while self._actions:
                what, action = self._actions.pop()
                try:
                    action()
                except Exception as exc:  # keep undoing the rest; report what is left
                    failed.append(f"{what} ({reason(exc)})")
        finally:
            signal.signal(signal.SIGINT, previous)
        return failed

    def leftovers(self, slug: str) -> str | None:
        """Undo everything; None if all of it went, else a sentence naming what is left and the fix."""
        left = self.run()
        if not left:
            return None
        return f"could not remove: {', '.join(left)}; `bottle down {slug}` removes them once that works again"
