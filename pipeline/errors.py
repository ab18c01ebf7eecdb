"""Errors a user can cause and fix: the CLI prints them as one line, never a traceback."""


class PipelineError(Exception):
    """A mistake in the user's input or environment, reported as one clear line."""


class ShardSpecError(PipelineError):
    """A shard spec such as '0-999' or '3,7,10-12' that cannot be parsed."""


class ConfigError(PipelineError):
    """A run manifest or override that does not validate."""


class StorageError(PipelineError):
    """The storage root cannot be reached or read."""


class MissingInputError(PipelineError):
    """A shard's input from the previous stage is not committed."""


class RunDriftError(PipelineError):
    """Settings that would renumber the shards of an existing run."""


class SettingsChangedError(PipelineError):
    """A run that would replace committed units made with other settings (without --force)."""


class UnknownStageError(PipelineError):
    """A stage name that is not registered."""


class Preempted(BaseException):  # noqa: N818 - a signal, not an error
    """Raised in the main thread on SIGTERM/SIGUSR1 so the current shard aborts cleanly."""

    def __init__(self, signum: int):
        super().__init__(f"received signal {signum}")
        self.signum = signum


class ExecutorError(PipelineError):
    """A submission an executor cannot plan or that its cluster refuses (Ray: address, resources, job API)."""


class SlurmError(ExecutorError):
    """A submission that cannot be rendered or that sbatch refuses."""


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to at most `limit` characters, ending in '...' when it was cut (the full text is kept where it
    is recorded, e.g. the failure record)."""
    return text if len(text) <= limit else text[: max(0, limit - 3)].rstrip() + "..."
