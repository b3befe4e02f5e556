"""The engine: worker processes and the executors that hand them tasks.

``supervisor`` owns and reaps the local worker processes, ``worker`` is the loop each of them
runs, ``cluster`` runs the same tasks on a Dask cluster (its coordinator; ``clustertask`` is what
runs in the Dask workers, ``clusterlink``, ``clusterledger``, ``clustertimeouts`` and
``clusterfiles`` its connection, bookkeeping, timeouts and files). Batch and watch mode feed
these the same ``Task`` and read back the same ``Result``.
"""
