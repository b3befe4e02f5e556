"""Imaging: what happens to one image, in one process.

``codec`` decodes inputs under limits and encodes outputs, ``pipeline`` runs a pipeline's steps
(the transforms of ``watcher.transforms``) over a decoded source and stages its outputs, and
``memory`` estimates and caps what a decode may use. Nothing here knows about processes,
folders being watched or fates.
"""
