"""Imaging: what happens to one image, in one process.

``formats`` declares the image formats (standard library only), ``codec`` decodes inputs under
limits (reading through ``inputfile``), ``colour`` brings pixels to a working mode and sRGB,
``encode`` encodes outputs, ``pipeline`` describes pipelines and runs a pipeline's steps (the
transforms of ``watcher.transforms``) over an image, ``processor`` turns a task into staged and
published outputs, and ``memory`` estimates and caps what a decode may use. Nothing here knows
about processes, folders being watched or fates.
"""
