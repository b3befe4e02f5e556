"""Operations: what an operator watches a running daemon by.

``heartbeat`` is the daemon's once-a-second beat (and PID-1 reaping), ``health`` the heartbeat
file and its check, ``metrics`` the Prometheus endpoint, ``notify`` systemd's readiness and
watchdog notifications; ``webhooks`` the queue and thread that deliver each fate's document to
the ``sinks`` of ``[notify]`` (a webhook, a command).
"""
