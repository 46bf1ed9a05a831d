"""ORM event receivers that capture source writes."""

from sa_dualwrite.listeners._capture import CaptureListeners, SessionState

__all__ = ["CaptureListeners", "SessionState"]
