"""Error types. Every message names the file, tensor or field at fault."""


class EsmRayError(Exception):
    """Base class of the errors esm-ray reports to users (exit code 2 in the CLI)."""


class SpecError(EsmRayError):
    """The job spec is invalid (unknown key, bad value, missing field)."""


class InputError(EsmRayError):
    """An input model or data file is missing, unreadable or inconsistent."""


class OutputError(EsmRayError):
    """The output location cannot be written, or already holds a result."""
