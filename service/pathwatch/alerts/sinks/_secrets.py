"""Reading secrets from the config, a file or an environment variable, never logging them."""

from __future__ import annotations

import os


def read_secret(value: str | None, file: str | None, env: str | None, where: str) -> list[str]:
    """Every secret given (value, file, env): several are allowed, for rotation."""
    out = []
    if value:
        out.append(value)
    if file:
        try:
            with open(file, encoding="utf-8") as fh:
                text = fh.read().strip()
        except OSError as exc:
            raise ValueError(f"{where}_file: cannot read {file}: {exc.strerror}") from exc
        if not text:
            raise ValueError(f"{where}_file: {file} is empty")
        out.append(text)
    if env:
        text = os.environ.get(env, "").strip()
        if not text:
            raise ValueError(f"{where}_env: environment variable {env} is not set or empty")
        out.append(text)
    return out
