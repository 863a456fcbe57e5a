"""Writing `key=value` overrides into a params file, the way `dvc exp run --set-param` does.

DVC tracks params.yaml, so an override that should make DVC rerun the stages it concerns has to be in that file.
`apply_overrides` checks the overrides against the typed config first (an unknown key or a bad value changes
nothing), then sets them with a round-trip YAML editor that keeps the file's comments, order and layout.
"""

from __future__ import annotations

from pathlib import Path

from clip.config import load_config, parse_override
from clip.storage import atomic_local_write


def apply_overrides(params_file: str | Path, overrides: list[str]) -> None:
    """Validate, then write each override into `params_file` (atomically; comments kept)."""
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
    import io

    out = io.StringIO()
    yaml.dump(data, out)
    text = out.getvalue().encode("utf-8")
    atomic_local_write(path, lambda handle: handle.write(text))
