"""File-system ground rules: links never followed out of a folder, outputs written to a temp
file and published atomically, output names that fit.

``safefs`` opens and walks by descriptor, ``staging`` stages and publishes outputs, ``durable``
makes them durable (fsync, syncfs), ``files`` names temp files and sweeps dead ones, ``naming``
chooses output names.
"""
