"""Access: who is calling, API keys, quotas, the audit log, preferences, signed page tokens."""
