"""The engine: worker processes and the executors that hand them tasks.

``executor`` says what every executor is (the interface batch and watch drive, ``failure``);
``factory`` picks one. Local processes: ``supervisor`` (the ``Engine``: owns, feeds and reaps
the workers), ``handles`` (a worker as the supervisor sees it, and whether it is stuck),
``ledger`` (each task's one answer), ``helpers`` (the forkserver and resource tracker); in each
worker process ``worker`` (the loop), ``committer`` (the thread that writes outputs in groups),
``slot`` (what worker and supervisor share), ``lifetime`` (ending with the daemon), ``capture``
(native libraries' output), ``preload``. A Dask cluster: ``cluster`` (the ``DaskEngine``),
``clusterlink`` (the connection and its outages), ``clusterledger``, ``clusterfiles``,
``clustertimeouts`` and ``clustertask`` (what runs on the cluster's workers). ``runlock`` tells
which of this host's temp files nobody will finish.
"""
