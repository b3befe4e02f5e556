"""The shared slot: the layout of the array of doubles (one per worker) that a worker and its
supervisor share, and the exit codes a worker ends with. Both sides import these from here; the
worker writes the slot (``watcher.engine.worker``, ``watcher.engine.committer``), the supervisor
reads it to charge a crash or a timeout to the right task (``watcher.engine.supervisor``).
"""

from __future__ import annotations

# Slot layout (a shared array of doubles, one per worker). SEQ: the task being decoded and
# encoded, since STARTED. TAKEN: how many of the tasks sent to this worker it has started (it
# takes them in the order it got them); a taken task that is not in SEQ and has no result is
# waiting for the committer thread (at most committer.COMMIT_DEPTH of them). HALT: set by the
# supervisor when it stops handing out work (or by the worker itself when it is about to end
# after a failure); the worker finishes its current task and takes no other.
# COMMIT_STARTED: when the committer thread started committing its current group (IDLE: none);
# COMMIT_FROM, COMMIT_TO: that group, as positions in the order the tasks were taken (the first
# taken is 0; TO is one past the last); COMMIT_SEQ: the task whose outputs it is writing or
# publishing at this moment (IDLE in a step the group shares: syncing, a folder's fsync).
# COMMITTER_BEAT: when the committer thread last showed it runs (at least every BEAT seconds
# while it waits for work; 0: not started yet).
SEQ, STARTED, TAKEN, HALT = 0, 1, 2, 3
COMMIT_STARTED, COMMIT_FROM, COMMIT_TO, COMMIT_SEQ, COMMITTER_BEAT = 4, 5, 6, 7, 8
SLOT_SIZE = 9
BEAT = 1.0
IDLE = -1.0

EXIT_OK = 0
EXIT_INIT_FAILED = 3  # the worker could not even start: the supervisor stops, not respawns
EXIT_COMMIT_FAILED = 4  # a thread of the worker failed: it ended itself (respawned)
EXIT_TERMINATED = 5  # it stopped on SIGTERM, after finishing its task (respawned a tick later)
EXIT_MAIN_FAILED = 1  # its main thread raised (a bug, a transform that calls sys.exit)
EXIT_UNGUARDED_MAIN = 6  # it was re-running a main script that starts watcher (no __main__ guard)
