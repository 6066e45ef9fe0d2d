"""policyd: a Postfix policy daemon that limits how many recipients each authenticated user can send."""

__version__ = "0.1.0"
