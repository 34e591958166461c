"""Bad input, said plainly: a pydantic ValidationError as one line per field, each naming the
field's path, what is wrong with the value and how to fix it."""

from __future__ import annotations

from pydantic import ValidationError

_STAGE_TAGS = {"quantize", "prune", "factorize", "distill", "nas_trial", "calibrate"}
_UNION_MEMBERS = {"int", "float", "str", "bool"}  # pydantic's loc of each member of a union


def field_path(loc: tuple[int | str, ...]) -> str:
    """('candidates', 0, 'plan', 1, 'quantize', 'linear') -> 'candidates[0].plan[1].linear'
    (the discriminator tag pydantic inserts after a union's index is left out)."""
    out = ""
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(previous, int) and part in _STAGE_TAGS:
            pass
        elif any(c in part for c in "[]=@ ") or not part.isidentifier():
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
        previous = part
    return out or "request"


def explain(exc: ValidationError) -> str:
    """Every error of `exc`, one per line: 'PATH: what is wrong (got VALUE); the fix'."""
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
        elif kind == "value_error":
            lines.append(f"{path}: {e['msg'].removeprefix('Value error, ')}")
        elif kind == "extra_forbidden":
            lines.append(f"{path}: unknown field; remove it (see the request's documented "
                         "fields: `recsqueeze run --help`, docs/)")
        else:
            lines.append(f"{path}: {e['msg']} (got {got!r})")
    return "\n".join(lines)
