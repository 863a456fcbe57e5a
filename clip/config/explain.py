"""Documentation of the configuration: every key with its type, default and description
(`clip-pipeline config show --explain`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from clip.config.base import _check_uri, check_host_port
from clip.config.pipeline import PipelineConfig


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def iter_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every field of `model` and of its nested sections, depth first: (dotted key, field info)."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key, info
        if _is_section(info.annotation):
            yield from iter_fields(info.annotation, key + ".")


def missing_descriptions(model: type[BaseModel] = PipelineConfig) -> list[str]:
    """Dotted keys of the fields (nested sections included) that have no non-empty description."""
    return [key for key, info in iter_fields(model) if not (info.description or "").strip()]


_CONSTRAINTS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _type_name(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """A short human name of a field's type: `int > 0`, `'auto' | 'cpu'`, `str (path or s3:// URL) | null`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0], list(args[1:]))
    if origin is Literal:
        name = " | ".join(repr(a) for a in args)
    elif origin in (Union, UnionType):
        name = " | ".join(_type_name(a) for a in args)
    elif annotation is type(None):
        name = "null"
    elif annotation is Any:
        name = "any"
    elif origin is not None:
        name = f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    else:
        name = getattr(annotation, "__name__", str(annotation))
    bounds = []
    for item in metadata:
        for group in getattr(item, "metadata", None) or [item]:  # a nested Field(...) carries its own metadata
            for attr, symbol in _CONSTRAINTS:
                bound = getattr(group, attr, None)
                if bound is not None:
                    bounds.append(f"{symbol} {bound}")
        func = getattr(item, "func", None)
        if func is _check_uri:
            name += " (path or s3:// URL)"
        elif func is check_host_port:
            name = "host:port | null"
    return f"{name} {', '.join(bounds)}" if bounds else name


def _render(value: Any) -> str:
    """A value as it would be written after `--set key=` (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def explain_config(cfg: PipelineConfig | None = None) -> str:
    """Every dotted key, nested sections included: type, default, the current value where it differs, description."""
    cfg = cfg if cfg is not None else PipelineConfig()
    lines: list[str] = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, info in type(model).model_fields.items():
            key, value = f"{prefix}{name}", getattr(model, name)
            description = " ".join((info.description or "").split())
            if _is_section(info.annotation):
                lines.extend(["", f"{key}  [section]", f"    {description}"])
                walk(value, key + ".")
                continue
            default = _plain(info.get_default(call_default_factory=True))
            head = f"{key}  [{_type_name(info.annotation, info.metadata)}]  default: {_render(default)}"
            if _plain(value) != default:
                head += f"  current: {_render(_plain(value))}"
            lines.extend([head, f"    {description}"])

    walk(cfg, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _plain(value: Any) -> Any:
    """Models, tuples and nested containers as plain YAML-able data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
