"""SmartEdu Tutor Chat: the composition root, settings and the transport-agnostic chat core."""

__version__ = "0.1.0"
