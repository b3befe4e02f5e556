"""The few exception types of watcher, and the one map from failures to exit codes.

- ``WatcherError``: the root; anything else that escapes is a bug and is logged with its traceback.
- ``RejectedInput(reason)``: this input cannot be processed; report (or quarantine) it with
  ``reason`` and carry on with the others.
- ``ConfigError``: a configuration or argument is wrong; refused at start, naming the key at fault.
"""

from __future__ import annotations

from enum import IntEnum


class WatcherError(Exception):
    """Root of watcher's own exceptions."""


class ConfigError(WatcherError):
    """A bad setting: ``where`` names the file/pipeline/step/key at fault."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class RejectedInput(WatcherError):  # noqa: N818 - named for what happens to the input
    """This input cannot be processed; ``reason`` is a short stable slug (see REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


# Stable reason slugs, documented in the README; reports, logs and quarantine sidecars use them.
REASONS = {
    "missing": "the input does not exist (any more)",
    "permission-denied": "the input cannot be read",
    "not-a-file": "the input is not a regular file (directory, FIFO, socket, device)",
    "symlink": "the input is a symbolic link and links are not followed here",
    "hard-link": "the input has other hard links (its data may belong to a file elsewhere); "
                 "it was not opened",
    "path-too-long": "the input's name or path (or an output's, archive's or quarantine's made "
                     "from it) is longer than the file system allows",
    "too-large": "the input file is larger than max_file_size, or decoding and processing it "
                 "would need (or needed) more memory than max_worker_memory",
    "not-an-image": "no allowed decoder recognises the data",
    "format-not-allowed": "a real image, but its format is not in the allow-list",
    "truncated": "the image data ends early",
    "corrupt": "the decoder failed on the data",
    "decompression-bomb": "more pixels than the pixel limit",
    "transform-failed": "a transform raised an error on this image",
    "encode-failed": "the encoder could not write this image in the output format",
    "write-failed": "an output could not be written (output folder unwritable, disk full, ...)",
    "io-error": "reading the input failed at the system level (EIO, a network file system)",
    "internal-error": "an unexpected error in watcher itself (logged with its traceback)",
    "output-conflict": "a different file already holds the output name",
    "unsafe-output": "a link (or a file) stands where an output's folder should be, below the "
                     "output folder; nothing is written through it",
    "worker-crashed": "the worker process died while processing this input (twice)",
    "timeout": "processing took longer than the per-file timeout",
    "cancelled": "the run was interrupted before this input was processed",
    "gave-up": "a failure that was not the input's fault kept coming back; after the retry "
               "bound (count and age) the input was set aside with the last error",
}


# Not the input's fault: the daemon keeps the input and retries later instead of quarantining it.
TRANSIENT_REASONS = frozenset({"write-failed", "io-error"})

# Why the daemon retries an input: a failure not its own, a different file under a planned output
# name (new names are planned), or the input changed while it was processed ("changed").
RETRY_REASONS = TRANSIENT_REASONS | {"output-conflict", "changed"}

# What a quarantined input's reason can be: every reason but those retried (past the retry bound
# they end as gave-up), a vanished input (no quarantine) and a cancelled one (left for later).
QUARANTINE_REASONS = frozenset(REASONS) - RETRY_REASONS - {"missing", "cancelled"}


class ExitCode(IntEnum):
    """Process exit codes of the ``watcher`` command (documented in the README)."""

    OK = 0  # every input succeeded (or was skipped by the conflict policy)
    SOME_FAILED = 1  # the run completed, but at least one input failed
    USAGE = 2  # bad command line or configuration: nothing was processed
    INTERNAL = 3  # a bug or an environment failure (workers cannot start)
    INTERRUPTED = 130  # SIGINT/SIGTERM: stopped early, running tasks drained
