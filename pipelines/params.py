"""`key=value` overrides in a params file: for good (`apply_overrides`), or for one pipeline run (`one_off_overrides`).

DVC tracks params.yaml, so an override that should make DVC rerun the stages it concerns has to be in that file
while DVC looks. Both ways check the overrides against the typed config first (an unknown key or a bad value changes
nothing), then set them with a round-trip YAML editor that keeps the file's comments, order and layout.

- `apply_overrides`: written into the file, as `dvc exp run --set-param` does; every later run sees them.
- `one_off_overrides`: the file holds the overrides for the length of a block (one flow run, under the checkout
  lock) and is the user's own file again after it, also when the block raises. DVC sees the overridden values while
  the run's stages run and records them in dvc.lock; the next run then finds params.yaml differing from dvc.lock
  and reruns the stages whose sections the overrides touched, with the user's values: the one-off stays one-off.
  The user's file is kept in `state_dir` while the overrides are in place, so a run that was killed meanwhile
  (SIGKILL, a lost machine) leaves it there, and `restore_params` at the next run's start puts it back.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clip.config import load_config, parse_override
from clip.storage import atomic_local_write

USER_COPY = "params.user.yaml"  # the user's params file while a run's one-off overrides are in place
APPLIED_COPY = "params.applied.yaml"  # what the run wrote; present <=> the overrides may be in place


def overridden_text(params_file: str | Path, overrides: list[str]) -> bytes:
    """The params file's text with `overrides` set (comments and layout kept); ConfigError on a bad override."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    path = Path(params_file)
    load_config(path, overrides)  # ConfigError naming the key before anything is written
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.representer.add_representer(  # keep `null` spelled out, as people write it
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = yaml.load(path.read_text()) if path.exists() else None
    if data is None:
        data = CommentedMap()
    for override in overrides:
        keys, value = parse_override(override)
        node = data
        for key in keys[:-1]:
            if node.get(key) is None:
                node[key] = CommentedMap()
            node = node[key]
        node[keys[-1]] = value
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue().encode("utf-8")


def _write(path: Path, data: bytes) -> None:
    atomic_local_write(path, lambda handle: handle.write(data))


def apply_overrides(params_file: str | Path, overrides: list[str]) -> None:
    """Validate, then write each override into `params_file` for good (atomically; comments kept)."""
    _write(Path(params_file), overridden_text(params_file, overrides))


def restore_params(params_file: str | Path, state_dir: str | Path) -> str | None:
    """Put the user's params file back after a run's one-off overrides (`one_off_overrides`); idempotent, and a
    no-op when no overrides are in place. Returns a note for the log when there was something to say: the file
    was changed by someone else while the overrides were in place (kept as it is; the user's copy from before
    the run is kept beside it in `state_dir`)."""
    path, state = Path(params_file), Path(state_dir)
    user_copy, applied_copy = state / USER_COPY, state / APPLIED_COPY
    if not applied_copy.exists():
        user_copy.unlink(missing_ok=True)  # killed before its overrides were written: the file is untouched
        return None
    user = user_copy.read_bytes() if user_copy.exists() else None  # None: there was no params file
    current = path.read_bytes() if path.exists() else None
    note = None
    if current in (applied_copy.read_bytes(), user):
        if user is None:
            path.unlink(missing_ok=True)
        else:
            _write(path, user)
    else:  # edited while the run held it: never overwrite someone's edit
        kept = state / f"params.before-run-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        if user is not None:
            _write(kept, user)
        note = (f"{path} was changed while a run's one-off overrides were in place: kept as it is (it may still "
                f"hold those overrides); the file from before that run is {kept if user is not None else 'absent'}")
    applied_copy.unlink()  # first: without it a later restore only tidies up
    user_copy.unlink(missing_ok=True)
    return note


@contextmanager
def one_off_overrides(params_file: str | Path, overrides: list[str], state_dir: str | Path,
                      log: logging.Logger | logging.LoggerAdapter | None = None) -> Iterator[None]:
    """`params_file` holds `overrides` inside the block and the user's own file again after it (module docstring).
    A bad override raises ConfigError before the file is touched. Callers hold the
    checkout lock: one run's overrides at a time."""
    path, state = Path(params_file), Path(state_dir)
    stale = restore_params(path, state)  # a killed run's overrides first: never keep them as "the user's file"
    if stale and log is not None:
        log.warning("%s", stale)
    text = overridden_text(path, overrides)  # ConfigError here: nothing was written
    if path.exists():
        _write(state / USER_COPY, path.read_bytes())
    _write(state / APPLIED_COPY, text)  # the marker: from here on a restore is owed
    _write(path, text)
    try:
        yield
    finally:
        note = restore_params(path, state)
        if note and log is not None:
            log.warning("%s", note)
