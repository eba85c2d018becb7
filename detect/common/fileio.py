"""Small file helpers: atomic writes (temporary file, then rename), JSON, and the settings
markers that are every long job's one resume check (``check_settings``)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success, remove it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            # e.g. "[Errno 28] No space left on device" from a write: say which output failed
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, raising ``ValueError`` that names the file (and line/column) when malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line, flushed on return (logs: a killed run keeps every finished line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class SettingsMismatch(ValueError):
    """A job's folder holds work done with other settings; the message names the keys."""


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # as it reads back: tuples become lists, keys strings


def check_settings(path: str | os.PathLike, settings: dict, *, hint: str) -> bool:
    """False without a marker at ``path``, True if it records ``settings``, else ``SettingsMismatch``."""
    path = Path(path)
    if not path.is_file():
        return False
    record = read_json(path)
    previous = record.get("settings") if isinstance(record, dict) else None
    settings = _as_json(settings)
    if previous == settings:
        return True
    if not isinstance(previous, dict):
        raise SettingsMismatch(f"{path}: not a settings marker of ours; {hint}")
    differ = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
    shown = ", ".join(f"{k}: before {previous.get(k)!r}, now {settings.get(k)!r}" for k in differ)
    shown = shown if len(shown) <= 600 else shown[:600] + " ..."
    raise SettingsMismatch(f"{path.parent}: holds work done with other settings ({shown}); {hint}")


def write_settings(path: str | os.PathLike, settings: dict, **info: Any) -> None:
    """Write the marker ``{"settings": settings, **info}`` atomically (see ``check_settings``)."""
    write_json_atomic(path, {"settings": _as_json(settings), **info})


def start_or_resume(path: str | os.PathLike, settings: dict, *, hint: str) -> None:
    """``check_settings``, writing the marker when there is none."""
    if not check_settings(path, settings, hint=hint):
        write_settings(path, settings)

