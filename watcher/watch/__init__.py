"""Watch mode: the inbox daemon.

``sources`` notices complete files arriving in the inbox, ``lifecycle`` claims them and carries
out each input's one fate (archive, delete, keep, quarantine), ``daemon`` wires intake, engine
and fates into the supervisor loop.
"""
