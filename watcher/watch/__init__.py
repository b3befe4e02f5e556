"""Watch mode: the inbox daemon.

``sources`` (scans, the stability tracker) and ``observer`` (the supervised watchdog observer)
notice complete files arriving in the inbox; ``claiming`` takes them out of it, ``moves`` carries
out each input's one fate (archive, delete, keep, quarantine), ``lifecycle`` holds the folders
(``layout`` their rules), requeue and the recovery of other instances' claims. The daemon's
parts: ``intake``, ``dispatch``, ``fates`` (and ``fatedoc``, each fate's notification document),
``signals`` and ``context`` (what they share);
``daemon`` wires them, with the engine and ``watcher.ops``, into the supervisor loop.
"""
