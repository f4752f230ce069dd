"""One error family, so the CLI can turn any expected failure into one clear line and exit 2.

Every message names the file and the tensor involved, says what was expected and what was
found, and, where there is one, the fix.
"""

from __future__ import annotations


class StarDistError(Exception):
    """Base of every error star_dist raises on purpose (bad input, bad config, failed merge)."""

    exit_code = 2


class ConfigError(StarDistError):
    """The merge config is invalid (unknown method, η out of range, no models, ...)."""


class InputError(StarDistError):
    """An input checkpoint or adapter is missing, corrupt, or does not fit the base."""


class OutputError(StarDistError):
    """The output folder cannot be used (not empty without --overwrite, not writable, ...)."""


class MergeError(StarDistError):
    """Merging a tensor failed (NaN or Inf met, a worker crashed past its retries, ...)."""


class DataError(MergeError):
    """An input's values cannot be merged (NaN or Inf, overflow of the output dtype).

    Found only while merging, but it is bad input all the same: the run undoes its writes,
    where a crash or an interruption keeps its finished shards for the resume.
    """


class ClusterError(StarDistError):
    """The Ray cluster cannot be reached or used."""


class VerifyError(StarDistError):
    """A model folder does not hold what its config.json describes (a missing, extra or
    mis-shaped tensor, tied weights stored twice), or a smoke test found it broken."""


class PublishError(StarDistError):
    """Uploading the output to the Hugging Face hub failed (no token, no rights, network)."""
