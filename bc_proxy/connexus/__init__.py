"""Connexus upstream: the HTTP client, token management, wire models and an emulator."""
