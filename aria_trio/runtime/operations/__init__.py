"""Operations: Prometheus metrics and the websocket tap with its dashboard."""
