"""Operations: what an operator watches a running daemon by.

``health`` is the heartbeat file and its check, ``metrics`` the Prometheus endpoint, ``notify``
systemd's readiness and watchdog notifications.
"""
