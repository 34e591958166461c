"""Bad input, said plainly: a pydantic ValidationError as one line per field, each naming the
field's path, what is wrong with the value and how to fix it."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ValidationError

_STAGE_KINDS = ("quantize", "prune", "factorize", "distill", "nas_trial")  # a plan's stages
_STAGE_TAGS = {*_STAGE_KINDS, "calibrate"}
_FAMILIES = ("dlrm", "two_tower", "sasrec", "custom")  # the ModelSpec union's tags
_SPEC_FIELDS = ("model", "student")  # fields holding a ModelSpec: its tag comes next
_UNION_MEMBERS = {"int", "float", "str", "bool"}  # pydantic's loc of each member of a union


def field_path(loc: tuple[int | str, ...]) -> str:
    """('candidates', 0, 'plan', 1, 'quantize', 'linear') -> 'candidates[0].plan[1].linear',
    ('model', 'sasrec', 'heads') -> 'model.heads' (the discriminator tag pydantic inserts
    after a union's place is left out)."""
    out = ""
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (isinstance(previous, int) and part in _STAGE_TAGS) or (
                previous in _SPEC_FIELDS and part in _FAMILIES):
            pass
        elif any(c in part for c in "[]=@ ") or not part.isidentifier():
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
        previous = part
    return out or "request"


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model an annotation holds (through Optional, tuples, unions) and whether
    it is a dict's value (the next path part is then a key, not a field)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict:
        inner, _ = _model_in(args[1]) if len(args) == 2 else (None, False)
        return inner, True
    for arg in args:
        inner, keyed = _model_in(arg)
        if inner is not None:
            return inner, keyed
    return None, False


def _union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """The members of a discriminated union (stage configs by their `kind` tag, model specs by
    their `family`)."""
    found: dict[str, type[BaseModel]] = {}
    for arg in typing.get_args(annotation):
        tag = next((key for key in ("kind", "family") if isinstance(arg, type) and
                    issubclass(arg, BaseModel) and key in arg.model_fields), None)
        if tag is not None:
            found[str(arg.model_fields[tag].default)] = arg
        else:
            found |= _union_members(arg)
    return found


def allowed_fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str] | None:
    """The field names of the model found at `loc` below `model`, or None if unknown."""
    cls: type[BaseModel] | None = model
    members: dict[str, type[BaseModel]] = {}
    skip_key = False
    for part in loc:
        if cls is None:
            return None
        if isinstance(part, int):
            continue
        if skip_key:
            skip_key = False
            continue
        if part in members:
            cls, members = members[part], {}
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        members = _union_members(field.annotation)
        cls, skip_key = _model_in(field.annotation)
    if cls is None:
        return None
    internal = getattr(cls, "FROM_DATASET", ())  # a model spec's fields filled from the data
    return sorted(name for name in cls.model_fields if name not in internal)


def explain(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """Every error of `exc`, one per line: 'PATH: what is wrong (got VALUE); the fix'. With
    `model` (the validated type), an unknown field's line lists the fields allowed there."""
    errors = []
    for e in exc.errors(include_url=False):
        loc = tuple(e["loc"])
        while loc and loc[-1] in _UNION_MEMBERS:  # one error per union, not one per member
            loc = loc[:-1]
        errors.append((loc, e))
    # a collection's own error that only echoes its items' errors ("at least 1 item after
    # validation") says nothing more; one error per field
    locs = [loc for loc, _ in errors]
    seen: set[tuple[object, ...]] = set()
    lines = []
    for loc, e in sorted(errors, key=lambda le: le[1]["type"] != "finite_number"):
        if loc in seen or (e["type"] == "too_short" and any(
                other[:len(loc)] == loc and other != loc for other in locs)):
            continue
        seen.add(loc)
        path, kind, got = field_path(loc), e["type"], e.get("input")
        if kind == "finite_number":
            lines.append(f"{path} must be a finite number (got {got}); NaN and Infinity are "
                         "not allowed: give a number")
        elif kind == "union_tag_not_found":  # a stage without its "kind"
            lines.append(f"{path}: no \"kind\"; set kind to one of {', '.join(_STAGE_KINDS)} "
                         f"(got {got!r})")
        elif kind == "model_family":  # ModelSpec's discriminator found no such family
            family = got.get("family") if isinstance(got, dict) else got
            lines.append(f"{path}.family: {family!r} is not a model family; set family to one "
                         f"of {', '.join(_FAMILIES)} (left out: dlrm)")
        elif kind == "value_error":
            lines.append(f"{path}: {e['msg'].removeprefix('Value error, ')}")
        elif kind == "extra_forbidden":
            allowed = allowed_fields(model, loc[:-1]) if model is not None else None
            fix = (f"allowed here: {', '.join(allowed)}" if allowed else
                   "see the request's documented fields: `recsqueeze run --help`, docs/")
            lines.append(f"{path}: unknown field; remove it or fix its name ({fix})")
        else:
            lines.append(f"{path}: {e['msg']} (got {got!r})")
    return "\n".join(lines)
