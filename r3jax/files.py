"""Files that survive a crash: every result, config and log rewrite r3jax makes goes through
`write_text`, `write_bytes`, `write_json`, `write_jsonl`, `save_figure` or `write_with` (a temp file beside the target, then
`os.replace`, so a reader sees the old file or the new one, never half of one), and every file it
reads back goes through `read_json` or `open_safetensors`, which name the file and the way out when
it is broken."""
from __future__ import annotations

import json
import os
import secrets
import stat
from typing import Any, Callable, Iterable

from r3jax.errors import UnreadableFileError


def write_with(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(temp_path)` on a temp file in `path`'s folder, then renames it onto `path`,
    with the permissions the umask gives a new file whatever `write` did to them."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp_path = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # made as open() makes a file, so that the umask sets its permissions; kept through `write`,
    # since mkstemp's and safetensors' files are 0600: results and exported models that no one
    # else could read
    os.close(os.open(temp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    permissions = stat.S_IMODE(os.stat(temp_path).st_mode)
    try:
        write(temp_path)
        os.chmod(temp_path, permissions)
        os.replace(temp_path, path)
    except BaseException as error:
        os.unlink(temp_path)
        if isinstance(error, OSError) and error.filename is None:  # a full disk's error names no file
            raise OSError(error.errno, error.strerror, path) from error
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    def write(temp_path):
        with open(temp_path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    write_with(path, write)


def write_json(path: str, value: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(value, indent=indent))


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG (the format named here, since the temp file has no .png)."""
    write_with(path, lambda temp_path: fig.savefig(temp_path, dpi=dpi, format="png"))


def read_json(path: str, remedy: str) -> Any:
    """The JSON value in `path`; UnreadableFileError naming the file, what is wrong and `remedy`
    (what the user can do) when it is empty, cut short or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnreadableFileError(f"{path} cannot be read ({'empty' if not os.path.getsize(path) else error}), "
                                  f"perhaps cut short by a crash: {remedy}") from None


def open_safetensors(path: str, remedy: str):
    """`safetensors.safe_open(path)` for numpy; UnreadableFileError naming the file and `remedy`
    when it is cut short or not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, "numpy")
    except SafetensorError as error:
        raise UnreadableFileError(f"{path} cannot be read ({error}), perhaps cut short by a crash: {remedy}") from None


def cached_json(path: str, compute: Callable[[], Any], writer: bool = True) -> Any:
    """The JSON value stored at `path`, or `compute()`'s, stored there (by the `writer` process)
    unless it is None (a stopped computation)."""
    if os.path.exists(path):
        return read_json(path, "delete it to compute it again")
    value = compute()
    if value is not None and writer:
        write_json(path, value, indent=None)
    return value
