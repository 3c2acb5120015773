"""hostprep: harden the host of an internet-facing reverse proxy.

Data flow (one way): settings -> render (templates in rules/) -> model (frozen
Ruleset) -> plan (pure diff against what the kernel has) -> apply (the only code
that changes the host) -> status.  ``model``, ``render`` and ``plan`` never import
the modules that run commands (``runner``, ``backend``, ``nic``, ``apply``).
"""

__version__ = "0.1.0"
