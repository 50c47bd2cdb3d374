"""Errors a user can act on."""


class UnsupportedModelError(RuntimeError):
    """The passes cannot prove the rewrite equivalent; the message names op, module path, source line and a fix."""
