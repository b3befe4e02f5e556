"""File-system ground rules: links never followed out of a folder, outputs written to a temp
file and published atomically, output names that fit.

``safefs`` opens and walks by descriptor, ``files`` stages and publishes outputs and sweeps
dead temps, ``naming`` chooses output names.
"""
