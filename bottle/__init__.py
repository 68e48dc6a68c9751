"""bottle: run an AI coding agent in a microVM whose only way out is an audited egress proxy."""

from bottle.backend import Backend, Check, PreflightReport, labels, owned_slug
from bottle.errors import BottleError
from bottle.manifest import Manifest, load_manifest
from bottle.plan import BottlePlan

__all__ = [
    "Backend", "BottleError", "BottlePlan", "Check", "Manifest", "PreflightReport", "labels", "load_manifest",
    "owned_slug",
]  # fmt: skip
